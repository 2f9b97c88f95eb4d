"""Guards that keep a long run alive or stop it with a clear reason: bad batches, OOM and
batch-size checks."""
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Sequence

import torch


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to change."""


@dataclass
class BatchInfo:
    cut_ids: List[str]
    total_duration: float
    longest_id: str
    longest_duration: float

    def describe(self) -> str:
        ids = ", ".join(self.cut_ids[:20]) + (" ..." if len(self.cut_ids) > 20 else "")
        return (f"{len(self.cut_ids)} cuts, {self.total_duration:.1f} s in total, longest "
                f"{self.longest_id} ({self.longest_duration:.2f} s); cut ids: {ids}")


def batch_info(batch: Dict[str, Any]) -> BatchInfo:
    cuts = batch["supervisions"].get("cut", []) if "supervisions" in batch else []
    ids = [c.id for c in cuts]
    durs = [float(c.duration) for c in cuts]
    if not durs:
        return BatchInfo(ids, 0.0, "?", 0.0)
    i = max(range(len(durs)), key=durs.__getitem__)
    return BatchInfo(ids, sum(durs), ids[i], durs[i])


@dataclass
class BadBatchGuard:
    """Counts skipped batches; raises once more than ``max_bad`` were seen."""

    max_bad: int
    count: int = 0
    log: List[str] = field(default_factory=list)

    def record(self, batch_idx_train: int, reason: str, cut_ids: Sequence[str]) -> None:
        self.count += 1
        ids = ", ".join(cut_ids[:20]) + (" ..." if len(cut_ids) > 20 else "")
        msg = f"batch {batch_idx_train}: {reason}; skipped (bad batch {self.count}); cut ids: {ids}"
        self.log.append(msg)
        logging.warning(msg)
        if self.count > self.max_bad:
            raise TrainingError(
                f"stopping: {self.count} batch(es) with a non-finite loss or gradient, more than "
                f"--max-bad-batches {self.max_bad}. Last: {msg}. Lower the learning rate, try "
                f"--use-fp16 false, or run --print-diagnostics / --inf-check to find the module that diverges."
            )


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def check_max_duration(durations: Iterable[tuple], max_duration: float, what: str) -> None:
    """Fail before training if some cut cannot fit in any batch.

    Lhotse samplers would otherwise drop or oddly batch such cuts; we want to know up front.
    ``durations`` yields ``(cut_id, duration)``.
    """
    longest_id, longest = None, 0.0
    too_long = 0
    total = 0
    for cid, d in durations:
        total += 1
        if d > longest:
            longest_id, longest = cid, d
        if d > max_duration:
            too_long += 1
    if too_long:
        raise TrainingError(
            f"--max-duration {max_duration} s is shorter than {too_long} of {total} cuts in {what} "
            f"(the longest, {longest_id}, lasts {longest:.2f} s). Raise --max-duration above {longest:.2f} "
            f"or filter long cuts when preparing the data."
        )


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True
