"""The one place where the trainer meets the other parts (data, tokenizer, optimizer,
checkpoint I/O, averaging).  Keeping the calls here makes the loop independent of
their constructors' details."""
import argparse
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn


def build_datamodule(args: argparse.Namespace):
    from splitformer.data.datamodule import AsrDataModule

    return AsrDataModule(args)


def build_tokenizer(args: argparse.Namespace):
    from splitformer.data.tokenizer import Tokenizer

    bpe = getattr(args, "bpe_model", None)
    if not bpe:
        from pathlib import Path
        from splitformer.data.recipes import get_dataset

        vocab = getattr(args, "vocab_size_bpe", None) or get_dataset(args.dataset).default_vocab_size
        bpe = Path(getattr(args, "data_dir", "data")) / f"lang_bpe_{vocab}" / "bpe.model"
    return Tokenizer(bpe)


def train_cut_durations(dm) -> Iterable[Tuple[str, float]]:
    return ((c.id, float(c.duration)) for c in dm.train_cuts())


def train_loader(dm):
    return dm.train_dataloaders(dm.train_cuts())


def valid_loader(dm):
    return dm.valid_dataloaders(dm.dev_cuts())


def sampler_of(dl):
    """The Lhotse sampler behind a loader (it carries the epoch and the position in it)."""
    s = getattr(dl, "sampler", None)
    if s is not None and hasattr(s, "state_dict") and hasattr(s, "set_epoch"):
        return s
    s = getattr(getattr(dl, "dataset", None), "sampler", None)
    if s is not None:
        return s
    raise TypeError(f"cannot find the Lhotse sampler of {type(dl).__name__}")


def build_optimizer(model: nn.Module, args: argparse.Namespace):
    """ScaledAdam over named parameters (so clipping messages can name the culprit)."""
    from splitformer.optim import ScaledAdam

    return ScaledAdam(list(model.named_parameters()), lr=args.base_lr, clipping_scale=2.0)


def build_scheduler(optimizer, args: argparse.Namespace):
    from splitformer.optim import Eden

    return Eden(optimizer, args.lr_batches, args.lr_epochs, warmup_batches=args.warmup_batches)


def make_average(model: nn.Module) -> nn.Module:
    from splitformer.averaging import make_averaged_model

    return make_averaged_model(model)


def update_average(model: nn.Module, model_avg: nn.Module, batch_idx_train: int, average_period: int) -> None:
    from splitformer.averaging import update_averaged_model

    update_averaged_model(model_avg, model, average_period, batch_idx_train)


def save(path, **state: Any) -> None:
    from splitformer.checkpoint import save_checkpoint

    save_checkpoint(path, **state)


def load(path, required_keys=("model",)) -> Dict[str, Any]:
    from splitformer.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location="cpu", required_keys=required_keys)


def check_architecture(saved: Dict[str, Any], current: Dict[str, Any], path) -> None:
    from splitformer.checkpoint import check_architecture as check
    from splitformer.model.config import ARCH_KEYS

    # Only the flags that shape the weights must agree (dropout or loss weights may change on resume).
    check(saved, current, keys=[k for k in ARCH_KEYS if k in saved or k in current], path=path)


def load_model_state(model: nn.Module, state_dict, path) -> None:
    from splitformer.checkpoint import load_model_state as load_state

    load_state(model, state_dict, path=path)


def checkpoint_error():
    from splitformer.checkpoint import CheckpointError

    return CheckpointError


def get_rng_state() -> Any:
    from splitformer.checkpoint import get_rng_state as g

    return g()


def set_rng_state(state: Any) -> None:
    from splitformer.checkpoint import set_rng_state as s

    s(state)


def remove_old_checkpoints(exp_dir, keep_last_k: int) -> None:
    from splitformer.checkpoint import remove_old_checkpoints as r

    r(exp_dir, keep_last_k)


def set_rnnt_backend(name: str) -> None:
    from splitformer.losses import set_backend

    set_backend(name)
