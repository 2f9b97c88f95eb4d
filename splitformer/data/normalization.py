"""Global mean/variance statistics of the training features, for the model's ``FeatureNorm``.

Log-mel fbank from lhotse sits around -8 with a spread of ~3.6 and per-bin offsets of several units;
a small model trained on a small corpus spends many of its few updates learning that offset. The
statistics are computed once, before the first update, and stored in the model (as buffers), so that
decoding, pretrained.py and the ONNX export apply the very same numbers.
"""
from __future__ import annotations

import itertools
import logging
from typing import Iterable, Tuple

import torch

log = logging.getLogger(__name__)


def global_feature_stats(cuts: Iterable, max_cuts: int = 2000, min_std: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-bin (mean, std) over every frame of the first ``max_cuts`` cuts that carry features.

    Sums run in float64, so that a corpus of many frames does not lose precision; ``std`` is floored
    at ``min_std`` (a constant bin would otherwise be divided by zero).
    """
    total = sq = None
    frames = 0
    used = 0
    for cut in itertools.islice(cuts, max_cuts):
        if not getattr(cut, "has_features", False):
            continue
        f = torch.as_tensor(cut.load_features(), dtype=torch.float64)
        if total is None:
            total, sq = f.sum(0), (f * f).sum(0)
        else:
            total, sq = total + f.sum(0), sq + (f * f).sum(0)
        frames += f.shape[0]
        used += 1
    if total is None or frames == 0:
        raise ValueError("global_feature_stats: no cut with precomputed features; run ./prepare.sh (fbank stage) "
                         "or train with --feature-norm none")
    mean = total / frames
    std = (sq / frames - mean * mean).clamp(min=0.0).sqrt().clamp(min=min_std)
    log.info("feature statistics from %d cuts (%d frames): mean %.2f, std %.2f (averaged over bins)",
             used, frames, float(mean.mean()), float(std.mean()))
    return mean.float(), std.float()
