"""Dynamic exit selection (Wright et al. 2023): climb the exits and stop at the first one whose
outputs look confident enough.

Criteria, computed over the utterance's valid frames on the posteriors of an exit: its CTC head's
(``--exit-scorer ctc``) or its transducer's along the greedy path, blank included (``transducer``):

- ``entropy``: mean frame entropy (nats) of the posteriors; exit when it is **below** the threshold.
  Threshold 0 never exits early (entropy >= 0), so it gives the last exit; threshold +inf gives the first.
- ``confidence``: mean over frames of the max posterior (in [1/V, 1]); exit when it is **above** the
  threshold. Threshold 0 gives the first exit, threshold >= 1 (or +inf) the last.
- ``posterior``: paper 1's (Wright et al., and the authors' ``util/beam_infer.py``): the posterior of the
  best hypothesis among the N-best of a CTC prefix beam search at that exit, i.e. a softmax over the
  N-best scores; exit when it is **above** the threshold. 0 gives the first exit, >= 1 the last.
- ``fixed``: never exits early (use ``--exit-layer`` to pick the exit).

The last exit always stops. The decision at an exit depends only on that exit's output, so a sweep
over thresholds can be simulated exactly from one pass that reads every exit (:func:`simulate`).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

STRATEGIES = ("fixed", "entropy", "confidence", "posterior")
SCORED = ("entropy", "confidence", "posterior")  # the strategies that read a score at each exit


def mean_entropy(log_probs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probs -> (B,) mean entropy over each utterance's frames (0 for empty ones).

    A posterior of exactly 0 (log-prob -inf) adds 0, its limit, not ``0 * -inf = NaN``: a NaN score
    would never stop the climb, and would do so silently.
    """
    p = log_probs.exp()
    ent = -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(-1)  # (B, T)
    return _masked_mean(ent, lens)


def mean_max_posterior(log_probs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probs -> (B,) mean over frames of the largest posterior (1 for empty ones)."""
    conf = log_probs.max(-1).values.exp()
    out = _masked_mean(conf, lens)
    return torch.where(lens > 0, out, torch.ones_like(out))


def nbest_posterior(log_probs: torch.Tensor, lens: torch.Tensor, nbest: int = 4, blank_id: int = 0) -> torch.Tensor:
    """(B, T, V) CTC log-probs -> (B,) posterior of the best of the ``nbest`` prefix-beam hypotheses,
    exp(s_1 - logsumexp(s_1..s_N)) (1 for an empty utterance, whose only hypothesis is the empty one)."""
    from splitformer.decoding.search import ctc_prefix_beam_nbest

    return _share_of_best(ctc_prefix_beam_nbest(log_probs, lens, beam=nbest, blank_id=blank_id))


SCORERS = ("ctc", "transducer")


def _share_of_best(nbests) -> torch.Tensor:
    """Per utterance, exp(s_1 - logsumexp(s)) over its N-best scores (best first)."""
    out = []
    for hyps in nbests:
        scores = torch.tensor([h.log_prob for h in hyps], dtype=torch.float64)
        out.append(math.exp(float(scores[0] - torch.logsumexp(scores, 0))))
    return torch.tensor(out, dtype=torch.float64)


def model_exit_scores(model, enc: torch.Tensor, enc_lens: torch.Tensor, exit_layer: int, scorer: str = "ctc",
                      nbest: int = 4, strategies: Sequence[str] = SCORED) -> Dict[str, torch.Tensor]:
    """(B,) score of each criterion in ``strategies`` at one exit, read from that exit's outputs.

    ``scorer="ctc"`` reads the exit's CTC head; ``"transducer"`` reads the transducer itself: the joiner's
    per-frame posteriors over blank and the tokens along the greedy path (entropy, confidence), and the
    N-best of its modified beam search (posterior). The transducer is what decodes, so its confidence is
    the one that says whether this exit's answer is good; the CTC head is a cheaper, weaker proxy.
    """
    from splitformer.decoding.search import greedy_search_with_posteriors, modified_beam_nbest

    if scorer not in SCORERS:
        raise ValueError(f"unknown exit scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    out: Dict[str, torch.Tensor] = {}
    if scorer == "ctc":
        lp = model.ctc_log_probs(enc, exit_layer)
    else:
        proj = model.project_encoder(enc, exit_layer)
        lp = None
        if any(s in strategies for s in ("entropy", "confidence")):
            _, lp = greedy_search_with_posteriors(model, proj, enc_lens)
    for s in strategies:
        if s == "posterior" and scorer == "transducer":
            out[s] = _share_of_best(modified_beam_nbest(model, proj, enc_lens, nbest))
        else:
            out[s] = exit_score(s, lp, enc_lens, nbest, model.blank_id)
    return out


def _masked_mean(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T) ``x`` over each row's first ``lens`` frames; what padding holds (even NaN) is ignored."""
    mask = torch.arange(x.size(1), device=x.device).unsqueeze(0) < lens.to(x.device).unsqueeze(1)
    return torch.where(mask, x, torch.zeros_like(x)).sum(1) / lens.to(x.device).clamp(min=1)


def exit_score(strategy: str, log_probs: torch.Tensor, lens: torch.Tensor, nbest: int = 4, blank_id: int = 0) -> torch.Tensor:
    if strategy == "entropy":
        return mean_entropy(log_probs, lens)
    if strategy == "confidence":
        return mean_max_posterior(log_probs, lens)
    if strategy == "posterior":
        return nbest_posterior(log_probs, lens, nbest, blank_id)
    raise ValueError(f"exit strategy {strategy!r} has no score; choose one of {', '.join(SCORED)}")


def stops(strategy: str, score: float, threshold: float) -> bool:
    if strategy == "entropy":
        return score < threshold
    if strategy in ("confidence", "posterior"):
        return score > threshold
    if strategy == "fixed":
        return False
    raise ValueError(f"unknown exit strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def choose_exit(strategy: str, threshold: float, scores: Sequence[float]) -> int:
    """Index of the first exit whose score stops the climb; the last exit otherwise."""
    for i, s in enumerate(scores):
        if stops(strategy, s, threshold):
            return i
    return len(scores) - 1


def parse_threshold(text: str) -> float:
    t = text.strip().lower()
    if t in ("inf", "+inf", "infinity"):
        return math.inf
    return float(t)


@dataclass
class UttTrace:
    """What one pass over every exit tells about one utterance."""

    cut_id: str
    duration: float
    ref: List[str]
    hyps: List[List[str]]  # per exit
    # per exit, for the criteria the pass was asked to score (empty for the others)
    entropy: List[float] = field(default_factory=list)
    confidence: List[float] = field(default_factory=list)
    posterior: List[float] = field(default_factory=list)

    def scores(self, strategy: str) -> List[float]:
        """This utterance's score at every exit under ``strategy``."""
        if strategy not in SCORED:
            raise ValueError(f"exit strategy {strategy!r} has no score; choose one of {', '.join(SCORED)}")
        out = getattr(self, strategy)
        if len(out) != len(self.hyps):
            raise ValueError(f"the pass that made this trace did not score {strategy!r}")
        return out


def simulate(
    traces: Sequence[UttTrace], strategy: str, threshold: float, exits: Sequence[int], macs_per_second: Sequence[float]
) -> Tuple[List[Tuple[str, List[str], List[str]]], Dict[str, float]]:
    """The results a dynamic-exit run with this threshold gives, read off full traces.

    Returns the (id, ref, hyp) results and stats: mean exit layer and mean encoder compute
    (MACs per second of audio, over the layers that run up to each utterance's exit).
    """
    results = []
    layers = []
    macs = 0.0
    dur = 0.0
    for tr in traces:
        i = choose_exit(strategy, threshold, tr.scores(strategy))
        results.append((tr.cut_id, tr.ref, tr.hyps[i]))
        layers.append(exits[i])
        macs += macs_per_second[i] * tr.duration
        dur += tr.duration
    stats = {
        "mean_exit_layer": sum(layers) / max(len(layers), 1),
        "macs_per_second": macs / dur if dur > 0 else 0.0,
    }
    return results, stats


def sweep_thresholds(traces: Sequence[UttTrace], strategy: str, points: int = 24) -> List[float]:
    """0, +inf and up to ``points`` thresholds between quantiles of the scores seen, so the curve
    spans first exit to last exit. Thresholds sit half-way between two distinct observed scores,
    never on one, so that float noise (e.g. from padding in a batch) cannot flip a decision."""
    return thresholds_between([s for tr in traces for s in tr.scores(strategy)], points)


def thresholds_between(scores: Sequence[float], points: int) -> List[float]:
    """0, +inf and up to ``points`` thresholds half-way between consecutive distinct ``scores``, spread over
    their quantiles (see :func:`sweep_thresholds`)."""
    vals = sorted(set(float(s) for s in scores if not math.isnan(s)))
    qs = {0.0, math.inf}
    if len(vals) > 1:
        for k in range(points):
            i = min(len(vals) - 2, round(k * (len(vals) - 2) / max(points - 1, 1)))
            qs.add((vals[i] + vals[i + 1]) / 2)
    return sorted(qs)


def pick_under_budget(rows: Sequence[Dict[str, float]], budget: float) -> Dict[str, float]:
    """The row (threshold, wer, cost) with the lowest WER among those whose cost is within ``budget``;
    the cheaper one on a tie. Raises ValueError naming the cheapest reachable cost when none fits."""
    fits = [r for r in rows if r["cost"] <= budget]
    if not fits:
        cheapest = min(r["cost"] for r in rows)
        raise ValueError(f"no threshold meets the budget {budget:.6g}: the cheapest reachable cost is {cheapest:.6g} "
                         "(every utterance at the first exit)")
    return min(fits, key=lambda r: (r["wer"], r["cost"]))


def iter_model_exits(model, features: torch.Tensor, feature_lens: torch.Tensor) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """(exit_layer, enc_out, enc_lens) one exit at a time; layers above the last one read are never
    run when the model offers ``iter_exits`` (stop iterating to stop computing)."""
    if hasattr(model, "iter_exits"):
        yield from model.iter_exits(features, feature_lens)
        return
    # Without an incremental encoder, climb with max_exit: exact, but re-runs the lower layers.
    for layer in model.exits:
        layer_out, out, lens = model.encode_exits(features, feature_lens, max_exit=layer)[-1]
        yield layer_out, out, lens
