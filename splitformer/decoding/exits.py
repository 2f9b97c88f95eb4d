"""Dynamic exit selection (Wright et al. 2023) for PyTorch models: read an exit, score it, and keep the
traces from which a sweep over thresholds is simulated exactly.

The decision itself (frame scores, the stop rule, the exit choice, their defined values for empty outputs
and ``-inf`` scores) is :mod:`splitformer.decoding.decision`, in numpy, shared with the torch-free ONNX
example. Here the exits' posteriors are read from the model:

- ``--exit-scorer ctc``: the exit's CTC head (entropy, confidence over its frames; posterior: the N-best of
  a CTC prefix beam search);
- ``--exit-scorer transducer``: the joiner's posteriors over blank and the tokens along the greedy path
  (entropy, confidence), or the N-best of its modified beam search (posterior). The transducer is what
  decodes, so its confidence says whether this exit's answer is good; the CTC head is a cheaper proxy.

When the scoring pass is the decoding search itself (greedy decoding read by the transducer scorer, CTC
greedy decoding by the CTC scorer, a beam search of width N read by the posterior of that N-best), the
hypotheses of an exit that stops come from it: the search does not run twice. The last exit always stops,
so it is never scored.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from splitformer.decoding import decision
from splitformer.decoding.decision import thresholds_between

STRATEGIES = decision.STRATEGIES
SCORED = decision.SCORED
SCORERS = ("ctc", "transducer")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def exit_score(strategy: str, log_probs: torch.Tensor, lens: torch.Tensor, nbest: int = 4, blank_id: int = 0,
               count_blank: bool = True, tokenless: str = "uncertain") -> torch.Tensor:
    """(B,) float64 score of (B, T, V) log-posteriors under ``strategy`` (posterior: of a CTC prefix beam's
    N-best), computed by :mod:`decision`."""
    decision.check_strategy(strategy)
    if strategy == "posterior":
        return nbest_posterior(log_probs, lens, nbest, blank_id, tokenless)
    scores = decision.frame_scores(_np(log_probs), lens.tolist(), blank_id, count_blank, tokenless)
    return torch.from_numpy(scores[strategy])


def posterior_of(nbests, nbest: int, tokenless: str = "uncertain") -> torch.Tensor:
    """(B,) posterior of the best of each N-best list of :class:`~splitformer.decoding.search.Hyp`."""
    decision.check_nbest("posterior", nbest)
    return torch.from_numpy(decision.nbest_posterior([[h.log_prob for h in hyps] for hyps in nbests],
                                                     [not hyps[0].tokens for hyps in nbests], nbest, tokenless))


def nbest_posterior(log_probs: torch.Tensor, lens: torch.Tensor, nbest: int = 4, blank_id: int = 0,
                    tokenless: str = "uncertain") -> torch.Tensor:
    """(B,) posterior of the best of the ``nbest`` CTC prefix-beam hypotheses."""
    from splitformer.decoding.search import ctc_prefix_beam_nbest

    decision.check_nbest("posterior", nbest)
    return posterior_of(ctc_prefix_beam_nbest(log_probs, lens, beam=nbest, blank_id=blank_id), nbest, tokenless)


def stops(strategy: str, score: float, threshold: float) -> bool:
    """Whether one score stops the climb (:func:`decision.stops`)."""
    return bool(decision.stops(strategy, score, threshold))


def parse_threshold(text: str) -> float:
    t = text.strip().lower()
    if t in ("inf", "+inf", "infinity"):
        return math.inf
    return float(t)


@dataclass
class ExitReader:
    """How a dynamic decode reads an exit: the criteria to score, from which posteriors, and the search whose
    hypotheses it will want there (to take them from the scoring pass when that pass is the search)."""

    strategies: Tuple[str, ...]
    scorer: str = "ctc"
    nbest: int = 4
    method: str = "greedy_search"
    beam: int = 4
    count_blank: bool = True

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown exit scorer {self.scorer!r}; choose one of {', '.join(SCORERS)}")
        for s in self.strategies:
            decision.check_strategy(s)
            decision.check_nbest(s, self.nbest)

    def gives_hyps(self) -> bool:
        """Whether :meth:`read` returns the decoding method's hypotheses (no search needed at a stopping exit)."""
        frame = any(s in decision.FRAME_SCORED for s in self.strategies)
        post = "posterior" in self.strategies and self.beam == self.nbest
        if self.scorer == "ctc":
            return (self.method == "ctc_greedy_search" and frame) or (self.method == "ctc_prefix_beam_search" and post)
        return (self.method == "greedy_search" and frame) or (self.method == "modified_beam_search" and post)

    @torch.no_grad()
    def read(self, model, enc: torch.Tensor, enc_lens: torch.Tensor, exit_layer: int
             ) -> Tuple[Dict[str, np.ndarray], Optional[list]]:
        """(B,) float64 scores per criterion at this exit, and the decoding method's hypotheses when the
        scoring pass computed them (see :meth:`gives_hyps`), else None."""
        from splitformer.decoding.search import (ctc_greedy_search, ctc_prefix_beam_nbest,
                                                 greedy_search_with_posteriors, modified_beam_nbest)

        out: Dict[str, np.ndarray] = {}
        hyps = None
        lens = enc_lens.tolist()
        frame = [s for s in self.strategies if s in decision.FRAME_SCORED]
        if self.scorer == "ctc":
            lp = model.ctc_log_probs(enc, exit_layer)
            if frame:
                scores = decision.frame_scores(_np(lp), lens, model.blank_id, self.count_blank)
                out.update({s: scores[s] for s in frame})
                if self.method == "ctc_greedy_search":
                    hyps = ctc_greedy_search(lp, enc_lens, model.blank_id)
            if "posterior" in self.strategies:
                nb = ctc_prefix_beam_nbest(lp, enc_lens, self.nbest, model.blank_id)
                out["posterior"] = posterior_of(nb, self.nbest).numpy()
                if self.method == "ctc_prefix_beam_search" and self.beam == self.nbest:
                    hyps = [n[0] for n in nb]
        else:
            proj = model.project_encoder(enc, exit_layer)
            if frame:
                greedy, path = greedy_search_with_posteriors(model, proj, enc_lens)
                scores = decision.frame_scores(_np(path), lens, model.blank_id, self.count_blank)
                out.update({s: scores[s] for s in frame})
                if self.method == "greedy_search":
                    hyps = greedy
            if "posterior" in self.strategies:
                nb = modified_beam_nbest(model, proj, enc_lens, self.nbest)
                out["posterior"] = posterior_of(nb, self.nbest).numpy()
                if self.method == "modified_beam_search" and self.beam == self.nbest:
                    hyps = [n[0] for n in nb]
        return out, hyps


def model_exit_scores(model, enc: torch.Tensor, enc_lens: torch.Tensor, exit_layer: int, scorer: str = "ctc",
                      nbest: int = 4, strategies: Sequence[str] = SCORED, count_blank: bool = True
                      ) -> Dict[str, torch.Tensor]:
    """(B,) score of each criterion in ``strategies`` at one exit (see :class:`ExitReader`)."""
    scores, _ = ExitReader(tuple(strategies), scorer, nbest, count_blank=count_blank).read(model, enc, enc_lens,
                                                                                          exit_layer)
    return {s: torch.from_numpy(v) for s, v in scores.items()}


@torch.no_grad()
def reader_macs(model, reader: ExitReader, seconds: float = 10.0) -> Dict[int, float]:
    """MACs per second of audio that ``reader`` spends scoring each exit but the last (the last is never
    scored: 0), counted with ``torch.utils.flop_counter`` on the model's dummy input of ``seconds``, as the
    encoder's MACs are (summary.encoder_macs_per_second). Python work (a CTC prefix beam's bookkeeping) has
    no MACs; its time is in the real-time factors."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    out: Dict[int, float] = {}
    try:
        x, x_lens = model.dummy_input(seconds)
        for e, enc, lens in model.iter_exits(x, x_lens):
            if e == model.exits[-1]:
                out[e] = 0.0
                break
            counter = FlopCounterMode(display=False)
            with counter:
                reader.read(model, enc, lens, e)
            out[e] = counter.get_total_flops() / 2 / seconds
    finally:
        model.train(was_training)
    return out


@dataclass
class Traces:
    """What one pass over every exit tells about N utterances, as arrays, from which any threshold's dynamic
    decode is simulated exactly (a decision depends only on that exit's output).

    ``hyps[i][e]``: utterance i's words at exit e; ``errors``: (N, E) word errors of those; ``ref_words``: (N,);
    ``scores[s]``: (N, E-1) score of criterion s at every exit but the last; ``seconds``: (N, E) measured time
    per exit, split as ``encoder`` (the blocks up to it), ``scorer`` (reading it) and ``search`` (the search there
    when the scoring pass did not give its hypotheses), each batch's time shared by duration."""

    cut_ids: List[str]
    refs: List[List[str]]
    hyps: List[List[List[str]]]
    durations: np.ndarray
    errors: np.ndarray
    ref_words: np.ndarray
    scores: Dict[str, np.ndarray]
    encoder_seconds: np.ndarray
    scorer_seconds: np.ndarray
    search_seconds: np.ndarray

    def criterion(self, strategy: str) -> np.ndarray:
        if strategy not in self.scores:
            raise ValueError(f"the pass that made these traces did not score {strategy!r}")
        return self.scores[strategy]

    def simulate(self, strategy: str, threshold: float, exits: Sequence[int], encoder_macs: Sequence[float],
                 scorer_macs: Sequence[float]) -> Dict[str, object]:
        """A dynamic decode with this threshold, read off the traces: its chosen exits, WER, mean exit layer,
        MACs per second (``encoder_macs``: the encoder up to each exit; plus ``scorer_macs``: the criterion at
        every exit visited, the last one excepted) and
        real-time factor (the same, measured, plus the search at the chosen exit)."""
        idx = decision.choose_exits(strategy, threshold, self.criterion(strategy))
        n = np.arange(len(idx))
        enc = np.asarray(encoder_macs, dtype=np.float64)  # up to each exit, as summary.exit_macs counts them
        scr = np.concatenate([[0.0], np.cumsum(np.asarray(scorer_macs, dtype=np.float64)[:-1])])
        paid = enc[idx] + scr[np.minimum(idx + 1, len(exits) - 1)]  # scored: every exit visited, the last excepted
        dur = self.durations.sum()
        t_enc = np.cumsum(self.encoder_seconds, 1)[n, idx]
        t_scr = np.concatenate([np.zeros((len(idx), 1)), np.cumsum(self.scorer_seconds, 1)], 1)
        t = t_enc + t_scr[n, np.minimum(idx + 1, len(exits) - 1)] + self.search_seconds[n, idx]
        return dict(exit_index=idx, wer=100.0 * self.errors[n, idx].sum() / max(int(self.ref_words.sum()), 1),
                    mean_exit_layer=float(np.asarray(exits)[idx].mean()) if len(idx) else 0.0,
                    macs_per_second=float((paid * self.durations).sum() / dur) if dur > 0 else 0.0,
                    rtf=float(t.sum() / dur) if dur > 0 else 0.0)

    def results(self, index: np.ndarray) -> List[Tuple[str, List[str], List[str]]]:
        return [(c, r, h[i]) for c, r, h, i in zip(self.cut_ids, self.refs, self.hyps, index.tolist())]


def sweep_thresholds(traces: Traces, strategy: str, points: Optional[int] = 24) -> List[float]:
    """0, +inf and up to ``points`` thresholds between the scores seen (all of them with None), so the curve
    spans first exit to last exit; never on a score, so float noise cannot flip a decision."""
    return thresholds_between(traces.criterion(strategy).ravel().tolist(), points).tolist()


def pick_under_budget(rows: Sequence[Dict[str, float]], budget: float) -> Dict[str, float]:
    """The row (threshold, wer, cost) with the lowest WER among those whose cost is within ``budget``;
    the cheaper one on a tie. Raises ValueError naming the cheapest reachable cost when none fits."""
    fits = [r for r in rows if r["cost"] <= budget]
    if not fits:
        cheapest = min(r["cost"] for r in rows)
        raise ValueError(f"no threshold meets the budget {budget:.6g}: the cheapest reachable cost is {cheapest:.6g} "
                         "(every utterance at the first exit)")
    return min(fits, key=lambda r: (r["wer"], r["cost"]))
