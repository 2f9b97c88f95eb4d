"""The one place where the trainer meets the other parts (data, tokenizer, optimizer,
checkpoint I/O, averaging).  Keeping the calls here makes the loop independent of
their constructors' details."""
import argparse
from pathlib import Path
from typing import Any, Dict

from torch import nn


def build_datamodule(args: argparse.Namespace):
    from splitformer.data.datamodule import AsrDataModule

    return AsrDataModule(args)


def bpe_model_path(args: argparse.Namespace) -> Path:
    """``--bpe-model``, or ``<manifest-dir>/../lang_bpe_<N>/bpe.model`` with the corpus's BPE size,
    where ./prepare.sh writes it."""
    if getattr(args, "bpe_model", None):
        return Path(args.bpe_model)
    from splitformer.data.recipes import get_dataset

    vocab = get_dataset(args.dataset).default_vocab_size
    return Path(args.manifest_dir).parent / f"lang_bpe_{vocab}" / "bpe.model"


def build_tokenizer(args: argparse.Namespace):
    from splitformer.data.tokenizer import Tokenizer

    return Tokenizer(bpe_model_path(args))


def train_cuts(dm, tokenizer):
    """Training cuts without those the model cannot learn from (too short for their transcript,
    longer than --max-cut-duration); the data module logs each one it leaves out."""
    from splitformer.model.config import encoder_output_frames

    return dm.filter_cuts(dm.train_cuts(), tokenizer, subsampled_length=lambda t: encoder_output_frames(dm.args, t))


def set_feature_stats(model: nn.Module, dm) -> None:
    """Give the model's FeatureNorm the training set's statistics (a no-op with --feature-norm none)."""
    if getattr(model, "feature_norm", None) is None:
        return
    from splitformer.data.normalization import global_feature_stats

    mean, std = global_feature_stats(dm.train_cuts())
    model.feature_norm.set_stats(mean, std)


def train_loader(dm, cuts, world_size: int, rank: int, seed: int):
    return dm.train_dataloader(cuts, sampler_state_dict=None, world_size=world_size, rank=rank, seed=seed)


def valid_loader(dm):
    return dm.valid_dataloader(dm.dev_cuts())


def sampler_of(dl):
    """The sampler behind a loader (it carries the epoch and the position in it)."""
    s = getattr(dl, "sampler", None)
    if s is not None and hasattr(s, "state_dict") and hasattr(s, "set_epoch"):
        return s
    raise TypeError(f"cannot find the Lhotse sampler of {type(dl).__name__}")


def build_optimizer(model: nn.Module, args: argparse.Namespace):
    """ScaledAdam over named parameters (so clipping messages can name the culprit).

    Frozen parameters (a backbone's feature encoder) are left out. A pretrained backbone's parameters form a
    group of their own, at ``--backbone-lr-scale`` times the learning rate and without ScaledAdam's bounds on
    tensor size and scalar values: those suit weights trained from scratch, not ones that come with their
    own scale."""
    from splitformer.model.hf_encoder import backbone_parameters
    from splitformer.optim import ScaledAdam

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_backbone = {n for n, _ in backbone_parameters(model)}
    if not in_backbone:
        return ScaledAdam(trainable, lr=args.base_lr, clipping_scale=2.0)
    groups = [
        {"named_params": [(n, p) for n, p in trainable if n not in in_backbone]},
        {"named_params": [(n, p) for n, p in trainable if n in in_backbone],
         "lr": args.base_lr * args.backbone_lr_scale, "param_max_rms": float("inf"), "scalar_max": float("inf")},
    ]
    return ScaledAdam([g for g in groups if g["named_params"]], lr=args.base_lr, clipping_scale=2.0)


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
