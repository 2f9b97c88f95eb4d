"""CTC loss over batch-first log-probs and Python token lists, reporting infeasible utterances."""
import logging
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def ctc_infeasible(log_probs_lens: Tensor, targets: List[List[int]]) -> int:
    """How many utterances no CTC path can emit: fewer frames than tokens plus repeated neighbours
    (each repeat needs a blank between its two copies)."""
    n = 0
    for t, seq in zip(log_probs_lens.tolist(), targets):
        repeats = sum(1 for a, b in zip(seq[:-1], seq[1:]) if a == b)
        n += int(t < len(seq) + repeats)
    return n


def ctc_loss(
    log_probs: Tensor,
    log_probs_lens: Tensor,
    targets: List[List[int]],
    blank: int = 0,
    reduction: str = "sum",
) -> Tuple[Tensor, int]:
    """CTC loss of log_probs (B,T,V) against token lists; returns ``(loss, num_inf)``.

    An utterance whose transcript cannot fit in its frames (or whose only paths have -inf scores) has an
    infinite loss; it is left out of the loss and its gradient is zero (zero_infinity), but ``num_inf``
    says how many there were so that the caller can log it instead of silently training on less data.
    reduction: "sum" (icefall's choice), "mean" (over utterances) or "none" ((B,), inf entries as 0).
    """
    if log_probs.ndim != 3 or log_probs.shape[0] != len(targets):
        raise ValueError(f"log_probs must be (B,T,V) with B = len(targets) = {len(targets)}; "
                         f"got {tuple(log_probs.shape)}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction should be 'none' | 'mean' | 'sum', got {reduction!r}")
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        log_probs = log_probs.float()
    device = log_probs.device
    flat = torch.tensor([tok for seq in targets for tok in seq], dtype=torch.int64, device=device)
    target_lens = torch.tensor([len(seq) for seq in targets], dtype=torch.int64, device=device)
    input_lens = log_probs_lens.to(device=device, dtype=torch.int64)
    if len(targets) and int(input_lens.max()) > log_probs.shape[1]:
        raise ValueError(f"log_probs_lens max {int(input_lens.max())} exceeds T = {log_probs.shape[1]}")
    args = (log_probs.transpose(0, 1), flat, input_lens, target_lens)
    per_utt = F.ctc_loss(*args, blank=blank, reduction="none", zero_infinity=False)
    inf = ~torch.isfinite(per_utt)
    num_inf = int(inf.sum())
    if num_inf:
        # Recompute so that the infinite ones also get a zero (not nan) gradient.
        logging.debug(f"ctc_loss: {num_inf} of {len(targets)} utterances have infinite loss")
        per_utt = F.ctc_loss(*args, blank=blank, reduction="none", zero_infinity=True)
    if reduction == "none":
        return per_utt, num_inf
    total = per_utt.sum()
    return (total / max(len(targets), 1) if reduction == "mean" else total), num_inf
