"""Training objective: icefall's warm-up of the simple/pruned loss weights, CTC, and the
weighted sum over exits; plus the running metrics that are logged per frame."""
from collections import defaultdict
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor
import torch.distributed as dist

from splitformer.model.asr_model import SAMPLES_PER_FRAME


def warmup_scales(batch_idx_train: int, warm_step: int, simple_loss_scale: float) -> Tuple[float, float]:
    """(simple, pruned) loss weights at this batch.

    Early on the pruned loss is unreliable (its ranges come from the still-random simple
    loss), so it starts at 0.1 while the simple loss starts at 1.0; both move linearly to
    their final values (``simple_loss_scale``, 1.0) by ``warm_step`` batches.
    """
    if warm_step <= 0 or batch_idx_train >= warm_step:
        return simple_loss_scale, 1.0
    frac = batch_idx_train / warm_step
    return 1.0 - frac * (1.0 - simple_loss_scale), 0.1 + 0.9 * frac


def fbank_frames(sup: Mapping[str, Tensor]) -> Tensor:
    """(B,) lengths in 10 ms frames whatever the input (a waveform model's batches count samples)."""
    return sup["num_frames"] if "num_frames" in sup else sup["num_samples"] // SAMPLES_PER_FRAME


def encoder_frames(feature_lens: Tensor) -> int:
    """Frames after the x4 front end, the unit icefall normalises logged losses by."""
    return int((((feature_lens - 7) // 2 + 1) // 2).clamp(min=1).sum().item())


def combine_losses(
    out: Mapping[int, Mapping[str, Tensor]],
    weights: Mapping[int, float],
    simple_scale: float,
    pruned_scale: float,
    ctc_scale: float,
) -> Tuple[Tensor, Dict[str, float]]:
    """Total loss (a sum over utterances) and its parts for logging, per exit."""
    total: Optional[Tensor] = None
    parts: Dict[str, float] = {}
    for e, w in weights.items():
        if e not in out:
            raise KeyError(f"the model returned no losses for exit {e} (it returned exits {sorted(out)})")
        losses = out[e]
        if "simple" in losses:
            loss = simple_scale * losses["simple"] + pruned_scale * losses["pruned"]
            parts[f"exit{e}/simple"] = float(losses["simple"].detach())
            parts[f"exit{e}/pruned"] = float(losses["pruned"].detach())
            if "ctc" in losses:  # even at scale 0: DDP expects a gradient for every head it saw used
                loss = loss + ctc_scale * losses["ctc"]
        else:  # a CTC-only model (the papers' baselines): CTC is the whole loss
            loss = losses["ctc"]
        if "ctc" in losses:
            parts[f"exit{e}/ctc"] = float(losses["ctc"].detach())
        parts[f"exit{e}/loss"] = float(loss.detach())
        total = w * loss if total is None else total + w * loss
    assert total is not None, "no exit to train"
    parts["loss"] = float(total.detach())
    return total, parts


class Metrics:
    """Sums of losses, frames and utterances; ``per_frame()`` gives what is logged."""

    COUNTS = ("frames", "utterances")

    def __init__(self) -> None:
        self.sums: Dict[str, float] = defaultdict(float)

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)

    def __iadd__(self, other: "Metrics") -> "Metrics":
        self.add(other.sums)
        return self

    def per_frame(self) -> Dict[str, float]:
        frames = max(self.sums.get("frames", 0.0), 1.0)
        return {k: v / frames for k, v in self.sums.items() if k not in self.COUNTS}

    def all_reduce(self, device: torch.device) -> "Metrics":
        """Sum over ranks (every rank must call it, with the same keys)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        # Union of the keys of all ranks: a rank whose batches were all skipped has none.
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self.sums))
        keys = sorted(set().union(*gathered))
        t = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        out = Metrics()
        out.add(dict(zip(keys, t.tolist())))
        return out

    def summary(self, keys: Optional[Iterable[str]] = None) -> str:
        pf = self.per_frame()
        keys = list(keys) if keys is not None else sorted(pf)
        body = ", ".join(f"{k}={pf[k]:.4g}" for k in keys if k in pf)
        return f"{body} (per frame over {int(self.sums.get('frames', 0))} frames)"
