"""AsrDataModule on the prepared AN4: batches, filtering, DDP sharding, exact resume, augmentation."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import pytest
import torch
from lhotse import CutSet, fastcopy, load_manifest

from an4_fixture import VOCAB_SIZE
from splitformer.data.datamodule import AsrDataModule, frames_after_subsampling
from splitformer.data.tokenizer import Tokenizer


def make_dm(an4_data: Path, *extra: str) -> AsrDataModule:
    parser = argparse.ArgumentParser()
    AsrDataModule.add_arguments(parser)
    args = parser.parse_args(
        ["--manifest-dir", str(an4_data / "fbank"), "--num-workers", "0", "--max-duration", "60", *extra]
    )
    return AsrDataModule(args)


def batch_ids(batch) -> List[str]:
    return [c.id for c in batch["supervisions"]["cut"]]


def feats_by_id(batch):
    sup = batch["supervisions"]
    return {
        c.id: batch["inputs"][int(i), : int(n)]
        for c, i, n in zip(sup["cut"], sup["sequence_idx"], sup["num_frames"])
    }


def test_defaults_match_the_contract():
    parser = argparse.ArgumentParser()
    AsrDataModule.add_arguments(parser)
    a = parser.parse_args([])
    assert (a.manifest_dir, a.dataset, a.spec_aug_time_warp_factor) == (Path("data/fbank"), "an4", 0)
    assert a.bucketing_sampler and a.enable_spec_aug and not a.enable_musan and not a.on_the_fly_feats
    assert parser.parse_args(["--shuffle", "false"]).shuffle is False


def test_subsampled_length():
    assert [frames_after_subsampling(t) for t in (7, 8, 9, 10, 11, 100)] == [0, 0, 1, 1, 1, 23]


def test_train_batches_cover_every_cut(an4_data):
    torch.manual_seed(0)
    dm = make_dm(an4_data)
    cuts = dm.train_cuts()
    seen = []
    for batch in dm.train_dataloader(cuts, seed=3):
        x = batch["inputs"]
        sup = batch["supervisions"]
        assert x.ndim == 3 and x.shape[2] == 80 and x.dtype == torch.float32
        assert x.shape[0] == len(sup["text"]) == len(sup["cut"]) == sup["num_frames"].numel()
        assert int(sup["num_frames"].max()) == x.shape[1]
        assert sum(c.duration for c in sup["cut"]) <= 60 + 1e-6
        assert torch.isfinite(x).all()
        seen += batch_ids(batch)
    assert sorted(seen) == sorted(cuts.ids) and len(seen) == 847  # --dev-rule speakers


def test_valid_and_test_loaders_in_order(an4_data):
    dm = make_dm(an4_data, "--bucketing-sampler", "false")
    dev_ids = [i for b in dm.valid_dataloader(dm.dev_cuts()) for i in batch_ids(b)]
    assert sorted(dev_ids) == sorted(load_manifest(an4_data / "fbank" / "an4_cuts_dev.jsonl.gz").ids)
    tests = dm.test_cuts()
    assert sorted(tests) == ["dev", "test"]
    n = sum(len(b["supervisions"]["text"]) for b in dm.test_dataloader(tests["test"]))
    assert n == 130


def test_ddp_shards_are_disjoint(an4_data):
    dm = make_dm(an4_data, "--enable-spec-aug", "false", "--max-duration", "20")
    cuts = dm.train_cuts().subset(first=200).to_eager()
    shards = []
    for rank in (0, 1):
        ids = [i for b in dm.train_dataloader(cuts, world_size=2, rank=rank, seed=5) for i in batch_ids(b)]
        shards.append(set(ids))
    assert shards[0] and shards[1] and not (shards[0] & shards[1])
    assert len(shards[0] | shards[1]) > 0.8 * 200


@pytest.mark.parametrize("bucketing", ["true", "false"])
def test_exact_resume_from_batch_state(an4_data, bucketing):
    dm = make_dm(an4_data, "--bucketing-sampler", bucketing, "--enable-spec-aug", "false", "--max-duration", "20")
    cuts = dm.train_cuts().subset(first=150).to_eager()
    dl = dm.train_dataloader(cuts, seed=11)
    dl.sampler.set_epoch(2)
    full = [batch_ids(b) for b in dl]
    dl = dm.train_dataloader(cuts, seed=11)
    dl.sampler.set_epoch(2)
    it = iter(dl)
    for _ in range(4):
        state = next(it)["sampler_state"]
    resumed = dm.train_dataloader(cuts, sampler_state_dict=state, seed=11)
    rest = [batch_ids(b) for b in resumed]
    assert rest == full[4:]


def test_resume_is_exact_with_prefetching_workers(an4_data):
    dm = make_dm(an4_data, "--enable-spec-aug", "false", "--num-workers", "1")
    cuts = dm.train_cuts()
    dl = dm.train_dataloader(cuts, seed=7)
    batches = []
    for b in dl:
        batches.append((batch_ids(b), b["sampler_state"]))
        if len(batches) == 6:
            break
    # the worker prefetched beyond batch 3; the state carried by batch 3 still resumes at batch 4
    resumed = dm.train_dataloader(cuts, sampler_state_dict=batches[2][1], seed=7)
    nxt = next(iter(resumed))
    assert batch_ids(nxt) == batches[3][0]


def test_filter_drops_short_long_and_untrainable(an4_data, tmp_path):
    dm = make_dm(an4_data, "--max-cut-duration", "5")
    tok = Tokenizer(an4_data / f"lang_bpe_{VOCAB_SIZE}" / "bpe.model")
    cuts = load_manifest(an4_data / "fbank" / "an4_cuts_dev.jsonl.gz")
    long_cut = max(cuts, key=lambda c: c.duration)
    assert long_cut.duration > 5
    base = cuts[0]
    tiny = base.truncate(duration=0.13)  # 13 frames -> 2 after subsampling, "A" is 2 tokens: kept
    tiny = fastcopy(tiny, id="tiny", supervisions=[fastcopy(tiny.supervisions[0], duration=0.13, text="A")])
    assert len(tok.encode(["A"])[0]) == 2
    tinier = fastcopy(base.truncate(duration=0.08), id="tinier")  # 8 frames -> 0
    wordy = base.truncate(duration=0.3)  # 30 frames -> 6, but 20+ tokens
    wordy = fastcopy(wordy, id="wordy", supervisions=[fastcopy(wordy.supervisions[0], duration=0.3,
                                                                  text="A B C D E F G H I J K L")])
    test_cuts = CutSet.from_cuts([cuts[1], long_cut, tiny, tinier, wordy])
    out_file = tmp_path / "filtered.txt"
    kept = dm.filter_cuts(test_cuts, tokenizer=tok, rejected_file=out_file)
    assert sorted(kept.ids) == sorted([cuts[1].id, "tiny"])
    dropped = dict(l.split("\t") for l in out_file.read_text().splitlines())
    assert sorted(dropped) == sorted([long_cut.id, "tinier", "wordy"])
    assert "max-cut-duration" in dropped[long_cut.id] and "tokens" in dropped["wordy"]
    # without a tokenizer only the length rules apply
    assert "wordy" in dm.filter_cuts(test_cuts).ids
    # lazy cut sets are filtered as they are read
    lazy = dm.filter_cuts(dm.dev_cuts(), tokenizer=tok)
    assert long_cut.id not in set(lazy.ids) and len(list(lazy.ids)) > 90


def test_spec_augment_changes_training_features(an4_data):
    cuts = load_manifest(an4_data / "fbank" / "an4_cuts_dev.jsonl.gz").subset(first=8)
    plain = make_dm(an4_data, "--enable-spec-aug", "false", "--shuffle", "false", "--bucketing-sampler", "false")
    aug = make_dm(an4_data, "--shuffle", "false", "--bucketing-sampler", "false")
    torch.manual_seed(0)
    a = next(iter(plain.train_dataloader(cuts)))["inputs"]
    b = next(iter(aug.train_dataloader(cuts)))["inputs"]
    assert a.shape == b.shape and not torch.equal(a, b)
    # masks replace values; nothing is shifted in time when time warp is off (the default)
    same = (a == b).float().mean().item()
    assert 0.3 < same < 1.0


def test_on_the_fly_features_match_precomputed(an4_data):
    cuts = load_manifest(an4_data / "fbank" / "an4_cuts_test.jsonl.gz").subset(first=3)
    pre = make_dm(an4_data)
    otf = make_dm(an4_data, "--on-the-fly-feats", "true")
    a = next(iter(pre.test_dataloader(cuts)))
    b = next(iter(otf.test_dataloader(cuts)))
    assert batch_ids(a) == batch_ids(b)
    assert a["inputs"].shape == b["inputs"].shape
    # lilcom storage is lossy (in the log domain) but close
    diff = (a["inputs"] - b["inputs"]).abs()
    assert diff.mean().item() < 0.02 and diff.median().item() < 0.01


def test_musan_mixing(an4_data, tmp_path):
    # stand-in "noise" set: AN4 test cuts with their features, without supervisions
    noise = CutSet.from_cuts(fastcopy(c, supervisions=[]) for c in load_manifest(
        an4_data / "fbank" / "an4_cuts_test.jsonl.gz").subset(first=20))
    musan = tmp_path / "musan_cuts.jsonl.gz"
    noise.to_file(musan)
    cuts = load_manifest(an4_data / "fbank" / "an4_cuts_dev.jsonl.gz").subset(first=8)
    base = make_dm(an4_data, "--enable-spec-aug", "false", "--shuffle", "false", "--bucketing-sampler", "false")
    mixed = make_dm(an4_data, "--enable-spec-aug", "false", "--shuffle", "false", "--bucketing-sampler", "false",
                    "--enable-musan", "true", "--musan-cuts", str(musan))
    a = next(iter(base.train_dataloader(cuts)))
    b = next(iter(mixed.train_dataloader(cuts)))
    fa, fb = feats_by_id(a), feats_by_id(b)
    assert sorted(fa) == sorted(fb)  # ids preserved
    changed = [k for k in fa if fa[k].shape == fb[k].shape and not torch.allclose(fa[k], fb[k])]
    assert changed  # CutMix p=0.5: some of the 8 cuts got noise
    assert batch_ids(b) and b["inputs"].shape[2] == 80
    with pytest.raises(FileNotFoundError, match="musan"):
        make_dm(an4_data, "--enable-musan", "true", "--musan-cuts", str(tmp_path / "nope.jsonl.gz")).train_dataloader(cuts)


def test_a_batch_draws_from_its_own_seed_and_leaves_the_process_stream_alone():
    """_WithSamplerState: the cut transforms (python random, and a transform's own generator as lhotse's CutMix
    keeps) and the input transforms (torch) draw the same for the same batch seed, whatever was drawn before; the
    caller's random and torch streams come back as they were."""
    import random

    from splitformer.data.datamodule import _WithSamplerState

    class OwnRng:  # like CutMix: a generator of its own, created once
        rng = random.Random(0)

    class Dataset:
        cut_transforms = [OwnRng()]

        def __getitem__(self, cuts):
            return {"draws": (random.random(), self.cut_transforms[0].rng.random(),
                              float(torch.rand(())))}

    ds = _WithSamplerState(Dataset())
    random.seed(1)
    torch.manual_seed(1)
    expected_py, expected_torch = random.random(), float(torch.rand(()))
    random.seed(1)
    torch.manual_seed(1)
    a = ds[(None, {}, 123)]["draws"]
    ds[(None, {}, 7)]  # another batch in between
    b = ds[(None, {}, 123)]["draws"]
    assert a == b and a != ds[(None, {}, 7)]["draws"]
    assert random.random() == expected_py and float(torch.rand(())) == expected_torch
