"""Turning checkpoints into a model for decoding: architecture from the stored flags, weights
from one epoch, an average of epochs, or the running average training keeps (``model_avg``)."""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from splitformer.model.asr_model import AsrModel


class DecodeSetupError(RuntimeError):
    """Something the user must fix (paths, flags, checkpoints); the message says what."""


def load_checkpoint_file(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DecodeSetupError(f"checkpoint {path} does not exist")
    try:
        from splitformer.checkpoint import load_checkpoint
    except ImportError:  # checkpoint I/O not installed yet: same safe load
        load_checkpoint = None
    try:
        if load_checkpoint is not None:
            ckpt = load_checkpoint(path)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # CheckpointError, pickle errors, truncated files
        raise DecodeSetupError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise DecodeSetupError(f"{path} is not a Splitformer checkpoint (expected a dict, got {type(ckpt).__name__})")
    return ckpt


def model_state(ckpt: Dict[str, Any], path: Path, key: str = "model") -> Dict[str, torch.Tensor]:
    if key in ckpt and isinstance(ckpt[key], dict):
        return ckpt[key]
    if key == "model" and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise DecodeSetupError(f"{path} has no {key!r} entry (keys: {', '.join(sorted(ckpt)) or 'none'})")


def _average(states: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = v.double().clone()
            for s in states[1:]:
                acc += s[k].double()
            out[k] = (acc / len(states)).to(v.dtype)
        else:  # integer buffers (counts): keep the latest
            out[k] = states[-1][k]
    return out


def averaged_state(exp_dir: Path, epoch: int, avg: int, use_averaged_model: bool) -> Dict[str, torch.Tensor]:
    """Weights to decode with.

    - ``avg == 1`` without ``use_averaged_model``: ``epoch-E.pt``'s ``model``.
    - ``avg > 1``: the plain average of ``model`` over epochs E-A+1..E.
    - ``use_averaged_model`` (icefall's method): the running average ``model_avg`` restricted to the
      batches between the end of epoch E-A and the end of epoch E,
      ``(avg_E * n_E - avg_{E-A} * n_{E-A}) / (n_E - n_{E-A})`` with ``n`` = ``batch_idx_train``.
      When epoch E-A does not exist (E-A = 0), ``epoch-E.pt``'s ``model_avg`` itself is used.
    """
    exp_dir = Path(exp_dir)
    if epoch < 1 or avg < 1:
        raise DecodeSetupError(f"--epoch and --avg must be >= 1 (got {epoch}, {avg})")
    end_path = exp_dir / f"epoch-{epoch}.pt"
    if not use_averaged_model:
        first = epoch - avg + 1
        if first < 1:
            raise DecodeSetupError(f"--avg {avg} needs epochs {first}..{epoch}, but epochs start at 1")
        paths = [exp_dir / f"epoch-{e}.pt" for e in range(first, epoch + 1)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DecodeSetupError(f"missing checkpoints: {', '.join(missing)}")
        if len(paths) == 1:
            return model_state(load_checkpoint_file(paths[0]), paths[0])
        try:
            from splitformer.checkpoint import average_checkpoints
        except ImportError:
            average_checkpoints = None
        if average_checkpoints is not None:
            try:
                return average_checkpoints(paths)
            except Exception as e:
                raise DecodeSetupError(f"cannot average {', '.join(map(str, paths))}: {e}") from e
        return _average([model_state(load_checkpoint_file(p), p) for p in paths])

    end = load_checkpoint_file(end_path)
    avg_end = model_state(end, end_path, "model_avg")
    start_epoch = epoch - avg
    if start_epoch < 1:
        return avg_end
    start_path = exp_dir / f"epoch-{start_epoch}.pt"
    start = load_checkpoint_file(start_path)
    avg_start = model_state(start, start_path, "model_avg")
    n_end, n_start = int(end.get("batch_idx_train", 0)), int(start.get("batch_idx_train", 0))
    if n_end <= n_start:
        raise DecodeSetupError(
            f"batch_idx_train does not grow from {start_path} ({n_start}) to {end_path} ({n_end}); cannot use --use-averaged-model"
        )
    out = {}
    for k, v in avg_end.items():
        if v.is_floating_point():
            out[k] = ((v.double() * n_end - avg_start[k].double() * n_start) / (n_end - n_start)).to(v.dtype)
        else:
            out[k] = v
    return out


def checkpoint_args(ckpt: Dict[str, Any], path: Path) -> argparse.Namespace:
    """The model flags stored in a checkpoint, completed with today's defaults for flags added since."""
    from splitformer.model.config import default_model_args

    stored = ckpt.get("args")
    if not isinstance(stored, dict):
        raise DecodeSetupError(f"{path} holds no model flags ('args'); it was not written by splitformer/train.py")
    args = default_model_args()
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
