"""From a training directory to what export writes: the model with its averaged weights, and pretrained.pt."""
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from torch import Tensor

from splitformer.export.common import ExportError
from splitformer.model.asr_model import AsrModel


def model_from_args(stored: Mapping[str, Any]) -> Tuple[AsrModel, Dict[str, Any]]:
    """Rebuild the architecture from a checkpoint's ``args`` dict; flags unknown to this version are ignored
    with a warning (the strict state-dict load then tells whether they mattered)."""
    from splitformer.model.config import build_model, default_model_args

    stored = dict(stored)
    vocab = stored.pop("vocab_size", None)
    if not vocab:
        raise ExportError("the checkpoint's args have no vocab_size; it was not written by splitformer/train.py")
    probe = default_model_args()
    unknown = sorted(k for k in stored if not hasattr(probe, k))
    if unknown:
        logging.warning("ignoring checkpoint flags unknown to this version: %s", ", ".join(unknown))
    known = {k: v for k, v in stored.items() if hasattr(probe, k) and k != "preset"}
    args = default_model_args(preset=stored.get("preset"), **known)
    model = build_model(args, int(vocab))
    return model, dict(vars(args))


def load_for_export(exp_dir: Path, epoch: int = 0, iteration: int = 0, avg: int = 1, use_averaged_model: bool = False
                    ) -> Tuple[AsrModel, Dict[str, Any], Dict[str, Tensor]]:
    """(model in eval mode with the averaged weights, its flags, the float32 state dict) for decode's
    ``--epoch/--iter/--avg/--use-averaged-model`` conventions."""
    from splitformer.averaging import load_averaged_state
    from splitformer.checkpoint import CheckpointError, find_checkpoints, load_checkpoint, load_model_state

    exp_dir = Path(exp_dir)
    if iteration > 0:
        found = find_checkpoints(exp_dir, iteration=iteration)
        if not found:
            raise ExportError(f"no checkpoint-B.pt with B <= {iteration} in {exp_dir}")
        last = found[0]
    else:
        last = exp_dir / f"epoch-{epoch}.pt"
    try:
        stored = load_checkpoint(last, required_keys=("args",))["args"]
        state = load_averaged_state(exp_dir, epoch=epoch, iteration=iteration, avg=avg, use_averaged_model=use_averaged_model)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    model, args = model_from_args(stored)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        load_model_state(model, state, path=last)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    model.eval()
    return model, args, model.state_dict()


def save_pretrained(path: Path, state: Mapping[str, Tensor], args: Mapping[str, Any]) -> Path:
    """``pretrained.pt``: the (averaged) weights and the model flags, loadable with ``weights_only=True``."""
    from splitformer.checkpoint import plain_args, save_checkpoint
    from splitformer.model.config import MODEL_KEYS

    flags = plain_args(args, keys=MODEL_KEYS)
    save_checkpoint(path, model={k: v.detach().clone() for k, v in state.items()}, args=flags)
    return Path(path)
