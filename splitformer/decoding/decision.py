"""The dynamic-exit decision, in numpy alone: frame scores, the stop rule and the exit choice.

PyTorch decoding (``decoding/exits.py``, the streaming decoder, the server) and the torch-free ONNX example
(``examples/onnx_decode.py``) all decide with these functions, so that a deployment stops where the
evaluation said it would. Nothing here imports torch.

Criteria, over an utterance's (or a chunk's) valid frames of one exit's posteriors:

- ``entropy``: mean frame entropy (nats); stop when it is **below** the threshold.
- ``confidence``: mean over frames of the largest posterior; stop when it is **above** the threshold.
- ``posterior``: the share of the best of an N-best list, ``exp(s_1 - logsumexp(s_1..s_N))``
  (Wright et al. 2023); stop when it is **above** the threshold. Needs N >= 2 (one hypothesis is always
  sure of itself).

Defined values, the same everywhere, so that no score is ever NaN (a NaN compares false and would climb
to the top silently):

- a posterior of exactly 0 adds 0 entropy (the limit of ``p log p``), not ``0 * -inf``;
- N-best scores that are all ``-inf`` say nothing: posterior ``1/N``;
- nothing to score (zero frames; or, with ``count_blank=False``, zero frames whose best symbol is a token):
  the value of a uniform posterior, ``log V`` / ``1/V`` / ``1/N`` (**uncertain**), or with
  ``tokenless="confident"`` the value of a certain one, ``0`` / ``1`` / ``1``;
- ``tokenless="uncertain"`` (utterances): an exit whose best path holds no token at all (every frame's best
  symbol is blank) is scored as uncertain, whatever its posteriors: a low exit that heard nothing is not
  evidence that there is nothing to hear, and stopping there would give an empty transcript at once.
  ``tokenless="confident"`` (chunks of a stream): a chunk of silence is normal, its words come later.

With these values the extreme thresholds keep their meaning: entropy 0 / confidence >= 1 / posterior >= 1
never stop early (the last exit); entropy +inf / confidence 0 / posterior 0 always stop at the first exit.
"""
import math
from typing import Dict, Optional, Sequence, Union

import numpy as np

STRATEGIES = ("fixed", "entropy", "confidence", "posterior")
SCORED = ("entropy", "confidence", "posterior")
FRAME_SCORED = ("entropy", "confidence")
TOKENLESS = ("uncertain", "confident")

Thresholds = Union[float, Sequence[float], np.ndarray]


def check_strategy(strategy: str, scored: bool = True) -> None:
    known = SCORED if scored else STRATEGIES
    if strategy not in known:
        raise ValueError(f"exit strategy {strategy!r} has no score; choose one of {', '.join(known)}" if scored and
                         strategy in STRATEGIES else f"unknown exit strategy {strategy!r}; choose one of {', '.join(known)}")


def check_nbest(strategy: str, nbest: int) -> None:
    """The posterior of a 1-best list is always 1: refuse it rather than silently never climbing."""
    if strategy == "posterior" and nbest < 2:
        raise ValueError(f"the posterior criterion normalises over an N-best list; N = {nbest} makes it always 1 "
                         "(use --exit-nbest 2 or more)")


def frame_scores(log_probs: np.ndarray, lens: Sequence[int], blank_id: int = 0, count_blank: bool = True,
                 tokenless: str = "uncertain") -> Dict[str, np.ndarray]:
    """(B, T, V) log-posteriors and (B,) valid frames -> ``{"entropy": (B,), "confidence": (B,)}`` (float64).

    ``count_blank=False`` averages over the frames whose best symbol is a token only. What padding holds
    (even NaN) is never read."""
    if tokenless not in TOKENLESS:
        raise ValueError(f"tokenless must be one of {', '.join(TOKENLESS)}, got {tokenless!r}")
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 3:
        raise ValueError(f"frame_scores expects (B, T, V) log-posteriors, got shape {lp.shape}")
    B, T, V = lp.shape
    lens = np.asarray(lens, dtype=np.int64).reshape(B)
    valid = np.arange(T)[None, :] < lens[:, None]
    safe = np.where(valid[..., None], lp, 0.0)  # padding (possibly NaN) replaced before any arithmetic
    p = np.exp(safe)
    with np.errstate(invalid="ignore"):
        ent = -np.where(p > 0, p * safe, 0.0).sum(-1)  # (B, T)
    conf = p.max(-1)
    token = valid & (safe.argmax(-1) != blank_id) if V > 0 else np.zeros_like(valid)
    use = valid if count_blank else token
    n = use.sum(1)
    out_e = np.where(use, ent, 0.0).sum(1) / np.maximum(n, 1)
    out_c = np.where(use, conf, 0.0).sum(1) / np.maximum(n, 1)
    unsure_e, unsure_c = math.log(max(V, 1)), 1.0 / max(V, 1)
    nothing = n == 0
    if tokenless == "uncertain":
        nothing = nothing | ~token.any(1)
        fill_e, fill_c = unsure_e, unsure_c
    else:
        fill_e, fill_c = 0.0, 1.0
    return {"entropy": np.where(nothing, fill_e, out_e), "confidence": np.where(nothing, fill_c, out_c)}


def share_of_best(scores: Sequence[float], nbest: Optional[int] = None) -> float:
    """``exp(s_1 - logsumexp(s))`` of N-best log-scores, best first; ``1/N`` when every score is -inf (and 1
    for a list of one). ``nbest``: the N the list was asked for (the uniform value's N when fewer came back)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("an N-best list needs at least one hypothesis")
    if not np.isfinite(s.max()):
        if np.isnan(s).any() or s.max() > 0:
            raise ValueError(f"N-best scores must be log-probabilities, got {s.tolist()}")
        return 1.0 / max(s.size, nbest or 0, 1)
    top = s.max()
    return float(math.exp(s[0] - (top + math.log(np.exp(s - top).sum()))))


def nbest_posterior(nbests: Sequence[Sequence[float]], empty_best: Sequence[bool], nbest: int,
                    tokenless: str = "uncertain") -> np.ndarray:
    """(B,) posterior of each utterance's best hypothesis from its N-best scores (best first).

    ``empty_best``: whether that utterance's best hypothesis holds no token (uncertain under
    ``tokenless="uncertain"``, see the module's docstring)."""
    if tokenless not in TOKENLESS:
        raise ValueError(f"tokenless must be one of {', '.join(TOKENLESS)}, got {tokenless!r}")
    out = np.array([share_of_best(s, nbest) for s in nbests], dtype=np.float64)
    if tokenless == "uncertain" and len(out):
        out = np.where(np.asarray(empty_best, dtype=bool), 1.0 / max(nbest, 1), out)
    return out


def stops(strategy: str, scores: Union[float, np.ndarray], thresholds: Thresholds) -> np.ndarray:
    """Whether each score stops the climb (strict comparisons: a score equal to its threshold climbs on).
    ``fixed`` never stops. ``thresholds``: one for all, or one per score."""
    check_strategy(strategy, scored=False)
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if strategy == "fixed":
        return np.zeros(np.broadcast(s, t).shape, dtype=bool)
    if np.isnan(s).any():
        raise ValueError(f"a {strategy} score is NaN: the scores of this module are never NaN, so the input was")
    return s < t if strategy == "entropy" else s > t


def choose_exits(strategy: str, threshold: Thresholds, scores: np.ndarray) -> np.ndarray:
    """(N,) index of the first exit whose score stops the climb, the last exit otherwise.

    ``scores``: (N, E-1), each utterance's score at every exit but the last (which always stops and is
    therefore never scored); the result is in 0..E-1."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"choose_exits expects (N, E-1) scores, got shape {s.shape}")
    n, e = s.shape
    if e == 0:
        return np.zeros(n, dtype=np.int64)
    t = np.asarray(threshold, dtype=np.float64)
    stop = stops(strategy, s, t[:, None] if t.ndim == 1 else t)
    return np.where(stop.any(1), stop.argmax(1), e).astype(np.int64)


def thresholds_between(scores: Sequence[float], points: Optional[int] = None) -> np.ndarray:
    """Sorted thresholds that reach every distinct behaviour of a criterion on ``scores``: 0, +inf, and the
    mid-points between consecutive distinct scores (never a score itself, so float noise cannot flip a
    decision). ``points``: at most this many mid-points, spread over the quantiles (None: all of them)."""
    vals = np.unique(np.asarray([s for s in scores if not math.isnan(s)], dtype=np.float64))
    mids = (vals[:-1] + vals[1:]) / 2 if vals.size > 1 else np.zeros(0)
    if points is not None and mids.size > points:
        mids = mids[np.unique(np.round(np.linspace(0, mids.size - 1, points)).astype(np.int64))]
    return np.unique(np.concatenate([[0.0, math.inf], mids]))
