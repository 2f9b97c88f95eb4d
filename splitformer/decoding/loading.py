"""Turning checkpoints into a model for decoding: architecture from the stored flags, weights
from one epoch, an average of epochs, or the running average training keeps (``model_avg``)."""
import argparse
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from splitformer.model.asr_model import AsrModel


class DecodeSetupError(RuntimeError):
    """Something the user must fix (paths, flags, checkpoints); the message says what."""


def load_checkpoint_file(path: Path) -> Dict[str, Any]:
    from splitformer.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, required_keys=())
    except CheckpointError as e:
        raise DecodeSetupError(str(e)) from e


def model_state(ckpt: Dict[str, Any], path: Path, key: str = "model") -> Dict[str, torch.Tensor]:
    if key in ckpt and isinstance(ckpt[key], dict):
        return ckpt[key]
    if key == "model" and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise DecodeSetupError(f"{path} has no {key!r} entry (keys: {', '.join(sorted(ckpt)) or 'none'})")


def averaged_state(exp_dir: Path, epoch: int, avg: int, use_averaged_model: bool, iteration: int = 0) -> Dict[str, torch.Tensor]:
    """Weights to decode with (splitformer.averaging.load_averaged_state, icefall's conventions).

    - ``--avg 1``: ``epoch-E.pt``'s ``model``; ``--avg A``: the plain average of ``model`` over
      epochs E-A+1..E.
    - ``--use-averaged-model``: the running average ``model_avg`` restricted to the batches between
      the end of epoch E-A and the end of epoch E,
      ``(avg_E * n_E - avg_{E-A} * n_{E-A}) / (n_E - n_{E-A})`` with ``n`` = ``batch_idx_train``;
      with A = E (no epoch 0) that is ``epoch-E.pt``'s ``model_avg`` itself.
    """
    from splitformer.averaging import load_averaged_state
    from splitformer.checkpoint import CheckpointError

    try:
        return load_averaged_state(exp_dir, epoch=epoch, iteration=iteration, avg=avg, use_averaged_model=use_averaged_model)
    except CheckpointError as e:
        raise DecodeSetupError(str(e)) from e


def checkpoint_args(ckpt: Dict[str, Any], path: Path) -> argparse.Namespace:
    """The model flags stored in a checkpoint, completed with today's defaults for flags added since."""
    from splitformer.model.config import default_model_args

    stored = ckpt.get("args")
    if not isinstance(stored, dict):
        raise DecodeSetupError(f"{path} holds no model flags ('args'); it was not written by splitformer/train.py")
    args = default_model_args()
    args.feature_norm = "none"  # checkpoints from before --feature-norm hold no statistics
    for k, v in stored.items():
        setattr(args, k, v)
    return args


def build_and_load(args: argparse.Namespace, state: Dict[str, torch.Tensor], vocab_size: Optional[int], source: str) -> AsrModel:
    """Builds the architecture the flags describe and loads ``state`` into it strictly; a
    checkpoint of another architecture gives an error naming it and what differs."""
    from splitformer.model.config import build_model

    try:
        model = build_model(args, vocab_size)
    except Exception as e:
        raise DecodeSetupError(f"cannot build the model described by {source}: {e}") from e
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def few(xs):
            return ", ".join(list(xs)[:5]) + (" ..." if len(xs) > 5 else "")
        raise DecodeSetupError(
            f"{source} does not match the model architecture its flags describe "
            f"(missing: {len(missing)} [{few(missing)}], unexpected: {len(unexpected)} [{few(unexpected)}], "
            f"shape mismatches: {few(mismatched) or 'none'}); was it trained with other --preset/model flags?"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def load_tokenizer(path: Path):
    """The BPE tokenizer of ``path``, or an error that says how to make it (decode.py and pretrained.py)."""
    if not Path(path).is_file():
        raise DecodeSetupError(f"BPE model {path} does not exist; run ./prepare.sh or pass --bpe-model")
    from splitformer.data.tokenizer import Tokenizer

    return Tokenizer(str(path))


def load_model(args: argparse.Namespace):
    """The architecture from the newest checkpoint used (``--epoch`` or ``--iter``), the weights averaged as
    ``--avg`` and ``--use-averaged-model`` say. Returns (model in eval mode, its flags)."""
    if args.iter > 0:
        last = args.exp_dir / f"checkpoint-{args.iter}.pt"
    elif args.epoch > 0:
        last = args.exp_dir / f"epoch-{args.epoch}.pt"
    else:
        raise DecodeSetupError("give --epoch E (>= 1) or --iter N (> 0)")
    ckpt = load_checkpoint_file(last)
    margs = checkpoint_args(ckpt, last)
    del ckpt
    state = averaged_state(args.exp_dir, args.epoch, args.avg, args.use_averaged_model, iteration=args.iter)
    return build_and_load(margs, state, getattr(margs, "vocab_size", None), str(last)), margs


def test_loader(manifest_dir: Path, dataset: str, split: str, max_duration: float, input_kind: str = "fbank",
                sort_by_duration: bool = False):
    """Batches of one test set in a fixed order (so that every run sees the same batches), in the input the
    model reads (``model.input_kind``); ``sort_by_duration``: longest first, so that a batch pads little.
    Returns (loader, cuts)."""
    from lhotse.dataset import K2SpeechRecognitionDataset, SimpleCutSampler

    from splitformer.data.datamodule import input_strategy

    cuts = test_cuts(manifest_dir, dataset, split)
    if sort_by_duration:
        cuts = cuts.sort_by_duration(ascending=False)
    sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False)
    ds = K2SpeechRecognitionDataset(input_strategy=input_strategy(input_kind), return_cuts=True)
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0)
    return loader, cuts


def test_sets(args: argparse.Namespace) -> list:
    """``--test-sets`` as a list, or the recipe's test sets."""
    if args.test_sets:
        return [s for s in args.test_sets.split(",") if s]
    from splitformer.data.recipes import get_dataset

    try:
        return list(get_dataset(args.dataset).test_splits)
    except ValueError as e:
        raise DecodeSetupError(str(e)) from None


def frame_ms(margs: argparse.Namespace) -> float:
    """Milliseconds per frame after the front end, the unit of --chunk-size (20 for conv2d, 40 for conv1d)."""
    return 40.0 if getattr(margs, "encoder_embed", "conv2d") == "conv1d" else 20.0


def apply_chunking(model: AsrModel, margs: argparse.Namespace, args: argparse.Namespace, streaming: bool = False
                   ) -> Dict[str, Any]:
    """Sets ``--chunk-size`` / ``--left-context-frames`` on the model (the chunk mask of every forward) and
    returns the fields that results entries record about them."""
    chunk, left = int(args.chunk_size), int(args.left_context_frames)
    try:
        model.set_chunking(chunk, left)
    except ValueError as e:
        raise DecodeSetupError(f"{e} ({frame_ms(margs):g} ms a frame for this model)") from None
    if chunk <= 0:
        return {}
    ms = frame_ms(margs)
    # an unlimited left context (-1, decode.py only: a stream's caches are finite) is recorded as None
    return dict(chunk_size=chunk, left_context_frames=left, chunk_ms=chunk * ms,
                left_context_ms=left * ms if left > 0 else None, streaming=streaming)


def test_cuts(manifest_dir: Path, dataset: str, split: str):
    """The prepared cuts (with features) of one test set."""
    from lhotse import CutSet

    path = Path(manifest_dir) / f"{dataset}_cuts_{split}.jsonl.gz"
    if not path.is_file():
        raise DecodeSetupError(f"test manifest {path} does not exist; run ./prepare.sh or pass --manifest-dir")
    return CutSet.from_file(path)
