"""Resuming: which checkpoint to read, and checks that it belongs to this run's model."""
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from splitformer.trainer import parts

REQUIRED = ("model", "optimizer", "scheduler", "args", "epoch", "batch_idx_train")


def resume_path(args) -> Optional[Path]:
    exp = Path(args.exp_dir)
    if args.start_batch > 0:
        return exp / f"checkpoint-{args.start_batch}.pt"
    if args.start_epoch > 1:
        return exp / f"epoch-{args.start_epoch - 1}.pt"
    return None


def load_resume_checkpoint(args) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """The checkpoint ``--start-batch``/``--start-epoch`` point at, after checking that it is
    a complete training checkpoint (``load_checkpoint`` already refuses truncated files,
    foreign files and pickles that would run code)."""
    path = resume_path(args)
    if path is None:
        return None, None
    error = parts.checkpoint_error()
    if not path.is_file():
        flag = f"--start-batch {args.start_batch}" if args.start_batch > 0 else f"--start-epoch {args.start_epoch}"
        raise error(f"Checkpoint {path}: no such file ({flag} resumes from it); check --exp-dir")
    required = REQUIRED + (("sampler", "rng") if args.start_batch > 0 else ())
    return parts.load(path, required_keys=required), path


def restore_model(model: nn.Module, ckpt: Mapping[str, Any], path: Path,
                  model_args: Optional[Mapping[str, Any]], key: str = "model") -> None:
    """Load weights, first comparing the architecture flags so that a mismatch is reported
    as flags (--encoder-dim 192 vs 256), not as a wall of tensor-shape errors."""
    if model_args is not None:
        parts.check_architecture(dict(ckpt.get("args") or {}), dict(model_args), path)
    parts.load_model_state(model, ckpt[key], path)
