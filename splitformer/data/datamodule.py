"""Lhotse data loading for training and decoding (the icefall `AsrDataModule` pattern).

Batches are `K2SpeechRecognitionDataset(return_cuts=True)` dicts: `inputs` (B, T, 80) float,
`supervisions` with `text`, `num_frames`, `cut`, ... A waveform model (``--encoder hf``, ``args.input_kind``
"waveform") gets (B, S) 16 kHz samples and `num_samples` instead, read from the cuts' recordings. In training batches, `sampler_state` is the
sampler's state right after that batch was drawn: save it with a checkpoint and pass it back as
`train_dataloader(..., sampler_state_dict=...)` to resume exactly after the last batch trained on
(the sampler object itself runs ahead of training by the DataLoader's prefetched batches).
"""
from __future__ import annotations

import argparse
import copy
import logging
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from lhotse import CutSet, Fbank, FbankConfig, load_manifest_lazy
from lhotse.dataset import (
    AudioSamples,
    CutMix,
    DynamicBucketingSampler,
    K2SpeechRecognitionDataset,
    OnTheFlyFeatures,
    PrecomputedFeatures,
    SimpleCutSampler,
    SpecAugment,
)
from lhotse.utils import compute_num_frames
from torch.utils.data import DataLoader

from splitformer.data import use_soundfile_for_sphere
from splitformer.data.recipes import get_dataset
from splitformer.utils import str2bool

log = logging.getLogger(__name__)
FRAME_SHIFT = 0.01  # seconds, lhotse Fbank default (100 frames per second)


def input_lens(sup: Dict[str, Any]) -> torch.Tensor:
    """(B,) input lengths of a batch's supervisions: fbank frames, or samples for a waveform model."""
    return sup["num_frames"] if "num_frames" in sup else sup["num_samples"]


def input_strategy(kind: str = "fbank", on_the_fly: bool = False):
    """Lhotse's input strategy for a model's input: the precomputed fbank (or fbank computed while loading),
    or the recordings' samples for a waveform model."""
    if kind == "waveform":
        use_soundfile_for_sphere()  # the recordings are read now, not only at feature extraction
        return AudioSamples()
    if on_the_fly:
        return OnTheFlyFeatures(Fbank(FbankConfig(num_mel_bins=80)))
    return PrecomputedFeatures()


def frames_after_subsampling(num_frames: int) -> int:
    """Encoder output length for T input frames: Conv2dSubsampling ((T-7)//2) then the final x2 downsampling."""
    return ((num_frames - 7) // 2 + 1) // 2


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int = 0) -> int:
    """The seed of one training batch's random draws (augmentation): a function of where the batch is in the
    run, not of which data-loader worker makes it or what that worker made before."""
    import numpy as np

    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, batch_index, rank]).generate_state(1)[0])


class _StatefulSampler(torch.utils.data.Sampler):
    """Yields (cuts, sampler state after these cuts, the batch's seed), so that each batch carries its own resume
    point, and its random draws are the same however many workers there are and after a resume."""

    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.batch_index = 0  # batches yielded in this epoch (restored by load_state_dict)
        self._resumed = False

    def __iter__(self) -> Iterator[Tuple[CutSet, Dict[str, Any], int]]:
        if not self._resumed:
            self.batch_index = 0
        self._resumed = False
        s = self.sampler
        for cuts in s:
            seed = batch_seed(int(getattr(s, "seed", 0)), int(s.epoch), self.batch_index, int(getattr(s, "rank", 0)))
            self.batch_index += 1
            yield cuts, self.state_dict(), seed

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.sampler.state_dict(), splitformer_batch_index=self.batch_index)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        sd = copy.deepcopy(sd)  # lhotse consumes the dict it is given
        self.batch_index = int(sd.pop("splitformer_batch_index", 0))
        self._resumed = True
        self.sampler.load_state_dict(sd)

    def __getattr__(self, name: str):  # anything else (epoch, diagnostics, ...) is the lhotse sampler's
        if "sampler" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["sampler"], name)


class _WithSamplerState(torch.utils.data.Dataset):
    """Makes a batch under its own seed (``random``, numpy and torch, restored afterwards): the cut transforms
    and SpecAugment draw the same for a batch in a worker or in the main process, first time or after a resume,
    and the main process's own random stream (dropout) is left as it was."""

    def __init__(self, dataset: K2SpeechRecognitionDataset):
        self.dataset = dataset

    def __getitem__(self, item: Tuple[CutSet, Dict[str, Any], int]) -> Dict[str, Any]:
        import numpy as np

        cuts, state, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's (dropout on a GPU) is left alone
            for t in getattr(self.dataset, "cut_transforms", None) or []:
                if hasattr(t, "rng"):  # lhotse transforms with a generator of their own (CutMix: MUSAN mixing)
                    t.rng = random.Random(seed)
            try:
                batch = self.dataset[cuts]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        batch["sampler_state"] = state
        return batch


class SwapVariants:
    """Cut transform: with probability ``p`` a training cut is replaced by one of its prepared variants.

    Variants (``./prepare.sh --variants true``: ``<split>-narrowband``, ``<split>-trimmed``) keep the
    cut's id and transcript and carry their own features, so the swap costs nothing at load time. It draws
    from ``random``, which each training batch seeds from its place in the run (``batch_seed``).
    """

    def __init__(self, variants: Dict[str, List[Any]], p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"--variant-prob must be in [0, 1], got {p}")
        self.variants = variants
        self.p = p

    def __call__(self, cuts: CutSet) -> CutSet:
        out = []
        for c in cuts:
            choices = self.variants.get(c.id)
            if choices and random.random() < self.p:
                c = random.choice(choices)
            out.append(c)
        return CutSet.from_cuts(out)


class AsrDataModule:
    """Cut loading, filtering and DataLoaders for one corpus under `--manifest-dir`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.info = get_dataset(args.dataset)
        use_soundfile_for_sphere()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Data", "Which cuts to load and how to batch/augment them")
        g.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"),
                       help="where ./prepare.sh put <dataset>_cuts_<split>.jsonl.gz (with features)")
        g.add_argument("--dataset", type=str, default="an4",
                       help="an4 | librispeech | mini_librispeech | tedlium3 (see splitformer/data/recipes.py)")
        g.add_argument("--max-duration", type=float, default=200.0,
                       help="seconds of audio per batch (summed over its cuts)")
        g.add_argument("--bucketing-sampler", type=str2bool, default=True,
                       help="DynamicBucketingSampler (similar durations per batch) instead of SimpleCutSampler")
        g.add_argument("--num-buckets", type=int, default=30, help="buckets of the bucketing sampler")
        g.add_argument("--shuffle", type=str2bool, default=True, help="shuffle training cuts every epoch")
        g.add_argument("--drop-last", type=str2bool, default=False,
                       help="drop incomplete training batches; with bucketing that is one per bucket, which on a "
                            "corpus as small as AN4 (30 buckets of ~75 s) loses most of the data")
        g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
        g.add_argument("--enable-spec-aug", type=str2bool, default=True, help="SpecAugment on training features")
        g.add_argument("--spec-aug-time-warp-factor", type=int, default=0,
                       help="SpecAugment time warp; 0 turns it off (the default: it is slow on CPU), icefall uses 80")
        g.add_argument("--enable-musan", type=str2bool, default=False, help="mix MUSAN noise into training cuts")
        g.add_argument("--musan-cuts", type=Path, default=Path("data/fbank/musan_cuts.jsonl.gz"),
                       help="MUSAN cuts (with features unless --on-the-fly-feats) for --enable-musan")
        g.add_argument("--on-the-fly-feats", type=str2bool, default=False,
                       help="compute fbank from audio while loading instead of using the precomputed features")
        g.add_argument("--train-variants", type=str, default="",
                       help="comma list of prepared variants of the training split (narrowband, trimmed: "
                            "./prepare.sh --variants true) that a training cut may be swapped for")
        g.add_argument("--variant-prob", type=float, default=0.3,
                       help="probability that a training cut is swapped for one of its --train-variants")
        g.add_argument("--max-cut-duration", type=float, default=20.0,
                       help="training cuts longer than this many seconds are left out")

    # ---- cuts --------------------------------------------------------------------------------
    def _load(self, split: str) -> CutSet:
        path = Path(self.args.manifest_dir) / f"{self.info.name}_cuts_{split}.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: run ./prepare.sh --dataset {self.info.name} (or fix --manifest-dir)"
            )
        log.info("loading %s", path)
        return load_manifest_lazy(path)

    def train_cuts(self) -> CutSet:
        parts = [self._load(s) for s in self.info.train_splits]
        if len(parts) == 1:
            return parts[0]
        # interleave the parts in proportion to their sizes, so that every stretch of the stream
        # looks like the whole training set (what the bucketing sampler's shuffle buffer sees)
        sizes = [sum(1 for _ in p) for p in parts]
        return CutSet.mux(*parts, weights=sizes)

    def train_variants(self) -> Dict[str, List[Any]]:
        """cut id -> its variants, from ``<dataset>_cuts_<train split>-<variant>.jsonl.gz``."""
        names = [v.strip() for v in getattr(self.args, "train_variants", "").split(",") if v.strip()]
        out: Dict[str, List[Any]] = {}
        for v in names:
            for split in self.info.train_splits:
                path = Path(self.args.manifest_dir) / f"{self.info.name}_cuts_{split}-{v}.jsonl.gz"
                if not path.is_file():
                    raise FileNotFoundError(f"{path} not found: --train-variants {v} needs "
                                            f"./prepare.sh --dataset {self.info.name} --variants true")
                for c in load_manifest_lazy(path):
                    out.setdefault(c.id, []).append(c)
        if out:
            log.info("training variants %s for %d cuts, swapped in with probability %.2f", names, len(out),
                     self.args.variant_prob)
        return out

    def dev_cuts(self) -> CutSet:
        return self._load(self.info.dev_split)

    def test_cuts(self) -> Dict[str, CutSet]:
        return {s: self._load(s) for s in self.info.test_splits}

    def filter_cuts(
        self,
        cuts: CutSet,
        tokenizer=None,
        max_duration: Optional[float] = None,
        rejected_file: Optional[Path] = None,
        subsampled_length: Callable[[int], int] = frames_after_subsampling,
    ) -> CutSet:
        """Leave out cuts the model cannot train on; log how many and which.

        Too short: fewer than 1 encoder frame after subsampling, or (with a tokenizer) fewer encoder
        frames than tokens, which the transducer loss cannot align. Too long: over `max_duration`
        seconds (default `--max-cut-duration`). Eager cut sets are filtered at once and the dropped ids
        written to `rejected_file` if given; lazy ones are filtered as they are read, each drop logged.
        """
        max_duration = self.args.max_cut_duration if max_duration is None else max_duration

        def reason(c) -> Optional[str]:
            if max_duration is not None and max_duration > 0 and c.duration > max_duration:
                return f"duration {c.duration:.2f} s > --max-cut-duration {max_duration}"
            t = c.num_frames if c.has_features else compute_num_frames(c.duration, FRAME_SHIFT, c.sampling_rate)
            t_sub = subsampled_length(t)
            if t_sub < 1:
                return f"{t} frames give {t_sub} after subsampling"
            if tokenizer is not None:
                n_tok = len(tokenizer.encode([c.supervisions[0].text])[0])
                if t_sub < n_tok:
                    return f"{t_sub} frames after subsampling < {n_tok} tokens"
            return None

        if cuts.is_lazy:
            def keep(c) -> bool:
                r = reason(c)
                if r is not None:
                    log.warning("leaving out cut %s: %s", c.id, r)
                return r is None
            return cuts.filter(keep)

        kept, dropped = [], []
        for c in cuts:
            r = reason(c)
            (kept if r is None else dropped).append(c if r is None else (c.id, r))
        log.info("filter_cuts: kept %d of %d cuts, left out %d", len(kept), len(cuts), len(dropped))
        for cid, r in dropped:
            log.info("left out %s: %s", cid, r)
        if rejected_file is not None:
            Path(rejected_file).parent.mkdir(parents=True, exist_ok=True)
            Path(rejected_file).write_text("".join(f"{cid}\t{r}\n" for cid, r in dropped))
        return CutSet.from_cuts(kept)

    # ---- loaders -----------------------------------------------------------------------------
    def _input_strategy(self):
        return input_strategy(getattr(self.args, "input_kind", "fbank"), self.args.on_the_fly_feats)

    def _sampler(self, cuts: CutSet, shuffle: bool, drop_last: bool, world_size: int, rank: int, seed: int):
        num_buckets = self.args.num_buckets
        if not cuts.is_lazy:  # a small in-memory set: no more buckets than pairs of cuts
            num_buckets = min(num_buckets, len(cuts) // 2)
        if self.args.bucketing_sampler and num_buckets >= 2:
            with warnings.catch_warnings():  # its advice about lazy manifests does not apply to small sets
                warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
                return DynamicBucketingSampler(
                    cuts, max_duration=self.args.max_duration, shuffle=shuffle, num_buckets=num_buckets,
                    drop_last=drop_last, world_size=world_size, rank=rank, seed=seed,
                )
        return SimpleCutSampler(
            cuts, max_duration=self.args.max_duration, shuffle=shuffle, drop_last=drop_last,
            world_size=world_size, rank=rank, seed=seed,
        )

    def train_dataloader(
        self,
        cuts: CutSet,
        sampler_state_dict: Optional[Dict[str, Any]] = None,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 42,
    ) -> DataLoader:
        """Shuffled, augmented batches; `world_size`/`rank` shard the batches for DDP."""
        transforms: List[Callable] = []
        variants = self.train_variants()
        if variants:
            transforms.append(SwapVariants(variants, self.args.variant_prob))
        if self.args.enable_musan:
            musan = Path(self.args.musan_cuts)
            if not musan.is_file():
                raise FileNotFoundError(f"--enable-musan needs {musan} (MUSAN cuts); give --musan-cuts")
            log.info("MUSAN noise mixing from %s", musan)
            transforms.append(CutMix(cuts=load_manifest_lazy(musan), p=0.5, snr=(10, 20), preserve_id=True, seed=seed))
        input_transforms: List[Callable] = []
        if self.args.enable_spec_aug and getattr(self.args, "input_kind", "fbank") == "waveform":
            log.warning("--enable-spec-aug is for fbank input: off for this waveform model (its backbone masks "
                        "time steps itself, as its config's mask_time_prob says)")
        elif self.args.enable_spec_aug:
            input_transforms.append(
                SpecAugment(
                    time_warp_factor=self.args.spec_aug_time_warp_factor,
                    num_frame_masks=10,
                    features_mask_size=27,
                    num_feature_masks=2,
                    frames_mask_size=100,
                    max_frames_mask_fraction=0.15,
                )
            )
        dataset = K2SpeechRecognitionDataset(
            cut_transforms=transforms,
            input_transforms=input_transforms,
            input_strategy=self._input_strategy(),
            return_cuts=True,
        )
        sampler = self._sampler(cuts, self.args.shuffle, self.args.drop_last, world_size, rank, seed)
        wrapped = _StatefulSampler(sampler)
        if sampler_state_dict is not None:
            log.info("restoring the training sampler state")
            wrapped.load_state_dict(sampler_state_dict)
        return DataLoader(
            _WithSamplerState(dataset),
            sampler=wrapped,
            batch_size=None,
            num_workers=self.args.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),  # lets train.py's non_blocking copies overlap
        )

    def _eval_dataloader(self, cuts: CutSet) -> DataLoader:
        dataset = K2SpeechRecognitionDataset(input_strategy=self._input_strategy(), return_cuts=True)
        sampler = self._sampler(cuts, shuffle=False, drop_last=False, world_size=1, rank=0, seed=0)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=self.args.num_workers,
                          pin_memory=torch.cuda.is_available())

    def valid_dataloader(self, cuts: CutSet) -> DataLoader:
        return self._eval_dataloader(cuts)

    def test_dataloader(self, cuts: CutSet) -> DataLoader:
        return self._eval_dataloader(cuts)
