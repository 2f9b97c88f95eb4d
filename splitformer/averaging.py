"""Running-average model (icefall's ``model_avg``) and averaging between checkpoints.

During training, every ``average_period`` batches::

    model_avg = model_avg * (1 - w) + model * w,   w = average_period / batch_idx_train

which makes ``model_avg`` the uniform average of the model over all updates so far (sampled
every ``average_period`` batches). Because it is a running *mean* since batch 0, the average
over an interval (start, end] follows from two checkpoints alone::

    avg(start, end] = (model_avg_end * b_end - model_avg_start * b_start) / (b_end - b_start)

which is what ``--use-averaged-model`` decodes with.
"""
import copy
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, MutableMapping

import torch
from torch import nn

from splitformer.checkpoint import (
    CheckpointError,
    PathLike,
    average_checkpoints,
    epoch_checkpoint_paths,
    find_checkpoints,
    load_checkpoint,
)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel/DataParallel."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def make_averaged_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` to hold the running average (float64 so that adding many
    small contributions does not lose precision), without gradients."""
    avg = copy.deepcopy(_unwrap(model)).to(torch.float64)
    for p in avg.parameters():
        p.requires_grad_(False)
    return avg


def average_state_dict(
    state_dict_1: MutableMapping[str, torch.Tensor],
    state_dict_2: Mapping[str, torch.Tensor],
    weight_1: float,
    weight_2: float,
) -> None:
    """In place: ``state_dict_1 = state_dict_1 * weight_1 + state_dict_2 * weight_2`` for floating
    tensors; other tensors (counters) are copied from ``state_dict_2``. Tensors that share
    storage (tied weights) are updated once."""
    seen = set()
    for k, v1 in state_dict_1.items():
        if k not in state_dict_2:
            raise KeyError(f"average_state_dict: {k} is missing from the second state dict")
        v2 = state_dict_2[k]
        key = (v1.data_ptr(), v1.dtype, tuple(v1.shape)) if v1.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        if v1.is_floating_point():
            v1.mul_(weight_1).add_(v2.to(device=v1.device, dtype=v1.dtype), alpha=weight_2)
        else:
            v1.copy_(v2)


@torch.no_grad()
def update_averaged_model(model_avg: nn.Module, model: nn.Module, average_period: int, batch_idx_train: int) -> None:
    """Fold the current ``model`` into ``model_avg`` with weight ``average_period / batch_idx_train``.

    Call it when ``batch_idx_train % average_period == 0`` (and > 0), as icefall does; the
    weight must not exceed 1.
    """
    if average_period <= 0 or batch_idx_train <= 0:
        raise ValueError(f"update_averaged_model: need average_period > 0 and batch_idx_train > 0, got {average_period}, {batch_idx_train}")
    weight = average_period / batch_idx_train
    if weight > 1.0:
        raise ValueError(
            f"update_averaged_model: average_period ({average_period}) > batch_idx_train ({batch_idx_train}); "
            "update only every average_period batches"
        )
    average_state_dict(_unwrap(model_avg).state_dict(), _unwrap(model).state_dict(), 1.0 - weight, weight)


def average_checkpoints_with_averaged_model(
    filename_start: PathLike, filename_end: PathLike, map_location: str = "cpu"
) -> "OrderedDict[str, torch.Tensor]":
    """The model averaged over the batches between two checkpoints, from their ``model_avg``
    and ``batch_idx_train``: ``(avg_end * b_end - avg_start * b_start) / (b_end - b_start)``."""
    start = load_checkpoint(filename_start, map_location=map_location, required_keys=("model_avg", "batch_idx_train"))
    end = load_checkpoint(filename_end, map_location=map_location, required_keys=("model_avg", "batch_idx_train"))
    b_start, b_end = int(start["batch_idx_train"]), int(end["batch_idx_train"])
    if b_end <= b_start:
        raise CheckpointError(
            f"Cannot average between {filename_start} (batch {b_start}) and {filename_end} (batch {b_end}): "
            "the second must be later than the first"
        )
    w_end = b_end / (b_end - b_start)
    avg = OrderedDict((k, v.clone()) for k, v in start["model_avg"].items())
    average_state_dict(avg, end["model_avg"], 1.0 - w_end, w_end)  # counters come from the end
    return avg


def load_averaged_state(
    exp_dir: PathLike, epoch: int = 0, iteration: int = 0, avg: int = 1, use_averaged_model: bool = False
) -> "OrderedDict[str, torch.Tensor]":
    """The model weights decode asks for with ``--epoch E``/``--iter N``, ``--avg A`` and
    ``--use-averaged-model`` (icefall's conventions):

    * ``--iter N --avg A``: the A newest ``checkpoint-B.pt`` with B <= N;
    * ``--epoch E --avg A``: ``epoch-(E-A+1).pt .. epoch-E.pt``;
    * with ``use_averaged_model``, the running average between the checkpoint just before that
      range and its last one (needs A+1 checkpoints), instead of A snapshots; with
      ``--epoch E --avg E`` that is ``epoch-E.pt``'s ``model_avg`` itself (it averages from batch 0).
    """
    exp_dir = Path(exp_dir)
    if iteration > 0:
        found = find_checkpoints(exp_dir, iteration=iteration)
        need = avg + 1 if use_averaged_model else avg
        if len(found) < need:
            raise CheckpointError(
                f"--iter {iteration} --avg {avg}{' --use-averaged-model' if use_averaged_model else ''} needs {need} "
                f"checkpoint-B.pt files with B <= {iteration} in {exp_dir}, found {len(found)}"
            )
        if use_averaged_model:
            return average_checkpoints_with_averaged_model(found[avg], found[0])
        return average_checkpoints(list(reversed(found[:avg])))
    if epoch <= 0:
        raise CheckpointError("Give --epoch E (>= 1) or --iter N (> 0) to pick checkpoints")
    if use_averaged_model:
        start = epoch - avg
        if start < 0:
            raise CheckpointError(f"--use-averaged-model with --epoch {epoch} --avg {avg}: --avg must be <= --epoch")
        if start == 0:  # the interval starts at batch 0: the running average itself
            end_path = exp_dir / f"epoch-{epoch}.pt"
            return OrderedDict(load_checkpoint(end_path, required_keys=("model_avg",))["model_avg"])
        paths = [exp_dir / f"epoch-{start}.pt", exp_dir / f"epoch-{epoch}.pt"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CheckpointError(f"Checkpoints needed for --use-averaged-model are missing: {', '.join(missing)}")
        return average_checkpoints_with_averaged_model(paths[0], paths[1])
    return average_checkpoints(epoch_checkpoint_paths(exp_dir, epoch, avg))
