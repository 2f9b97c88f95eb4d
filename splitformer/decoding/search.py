"""Search algorithms over one exit's output, in plain torch (no k2).

Transducer searches take the *projected* encoder output of an exit (``model.project_encoder``)
and use ``model.decoder`` / ``model.project_decoder`` / ``model.joiner``; CTC searches take the
exit's CTC log-probs (``model.ctc_log_probs``). Every search returns one :class:`Hyp` per
utterance with its token ids and the log-probability it maximised, so that searches can be
compared on their own objective.

Both transducer searches emit at most one symbol per frame (icefall's ``max_sym_per_frame=1``),
so greedy and beam search explore the same lattice and their scores are comparable.

Every search can also go on from where it stopped (``*_continue``, with its state per utterance), so that a
stream is decoded chunk by chunk with the same result as the whole utterance at once; the states are
immutable values, so a tentative step (a dynamic exit's scoring pass) can be kept or dropped.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

METHODS = ("greedy_search", "modified_beam_search", "ctc_greedy_search", "ctc_prefix_beam_search")
CTC_METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search")


@dataclass
class Hyp:
    tokens: List[int]
    log_prob: float


def _initial_context(context_size: int, blank_id: int) -> List[int]:
    # Training feeds [blank] + y with zero left-padding; negative ids embed to zero, so this matches.
    return [-1] * (context_size - 1) + [blank_id]


def _decoder_proj(model: nn.Module, contexts: List[List[int]], device: torch.device) -> torch.Tensor:
    """Projected decoder output (N, J) for N token contexts of length context_size."""
    y = torch.tensor(contexts, dtype=torch.int64, device=device)
    return model.project_decoder(model.decoder(y, need_pad=False)).squeeze(1)


def _silent_tokens(model: nn.Module) -> set:
    """Tokens a transducer search does not emit (nor feed to the decoder): blank, and <unk> as in icefall and
    sherpa-onnx."""
    unk = getattr(model, "unk_id", None)
    return {model.blank_id} | ({unk} if unk is not None else set())


@torch.no_grad()
def greedy_search(model: nn.Module, enc_proj: torch.Tensor, enc_lens: torch.Tensor) -> List[Hyp]:
    """Batched transducer greedy search, one symbol per frame at most.

    enc_proj: (B, T, J) projected encoder output; enc_lens: (B,). Frames past an utterance's
    length are skipped for that utterance only.
    """
    return greedy_search_with_posteriors(model, enc_proj, enc_lens)[0]


@dataclass(frozen=True)
class GreedyState:
    """Where a transducer greedy search stands: tokens so far, the decoder's context, the path's log-prob."""

    tokens: Tuple[int, ...]
    context: Tuple[int, ...]
    log_prob: float = 0.0

    def hyp(self) -> Hyp:
        return Hyp(list(self.tokens), self.log_prob)


def greedy_start(model: nn.Module) -> GreedyState:
    return GreedyState((), tuple(_initial_context(model.decoder.context_size, model.blank_id)))


@torch.no_grad()
def greedy_search_with_posteriors(
    model: nn.Module, enc_proj: torch.Tensor, enc_lens: torch.Tensor
) -> Tuple[List[Hyp], torch.Tensor]:
    """:func:`greedy_search`, and the joiner's (B, T, V) log-posteriors over blank and the tokens at each
    frame of the greedy path (zeros past an utterance's length): what the transducer exit scorer reads."""
    states, path = greedy_continue(model, enc_proj, enc_lens, [greedy_start(model)] * enc_proj.shape[0])
    return [s.hyp() for s in states], path


@torch.no_grad()
def greedy_continue(
    model: nn.Module, enc_proj: torch.Tensor, enc_lens: torch.Tensor, states: Sequence[GreedyState]
) -> Tuple[List[GreedyState], torch.Tensor]:
    """Greedy search over (B, T, J) more frames from ``states``: the new states and the path's (B, T, V)
    log-posteriors (zeros past an utterance's length)."""
    B, T, _ = enc_proj.shape
    device = enc_proj.device
    silent = torch.tensor(sorted(_silent_tokens(model)), device=device)
    tokens: List[List[int]] = [list(s.tokens) for s in states]
    scores = torch.tensor([s.log_prob for s in states], dtype=torch.float64)
    path = torch.zeros(B, T, model.vocab_size, device=device)
    if B == 0:
        return [], path
    contexts = torch.tensor([list(s.context) for s in states], dtype=torch.int64, device=device)  # (B, cs)
    dec = model.project_decoder(model.decoder(contexts, need_pad=False)).squeeze(1)  # (B, J)
    lens = enc_lens.to(device)
    for t in range(min(T, int(lens.max()))):
        idx = (lens > t).nonzero().flatten()
        logits = model.joiner(enc_proj[idx, t], dec[idx])  # (A, V)
        logp = logits.float().log_softmax(-1)
        path[idx, t] = logp.to(path.dtype)
        best_lp, best = logp.max(-1)
        scores[idx.cpu()] += best_lp.double().cpu()
        emit = ~torch.isin(best, silent)
        if bool(emit.any()):  # most frames emit nothing: the Python work is per emitted token
            rows, toks = idx[emit], best[emit]
            contexts[rows] = torch.cat([contexts[rows, 1:], toks.unsqueeze(1)], dim=1)
            dec[rows] = model.project_decoder(model.decoder(contexts[rows], need_pad=False)).squeeze(1)
            for r, k in zip(rows.tolist(), toks.tolist()):
                tokens[r].append(k)
    ctx = contexts.tolist()
    return [GreedyState(tuple(tokens[b]), tuple(ctx[b]), float(scores[b])) for b in range(B)], path


@torch.no_grad()
def modified_beam_search(
    model: nn.Module, enc_proj: torch.Tensor, enc_lens: torch.Tensor, beam: int = 4
) -> List[Hyp]:
    """Transducer beam search with one symbol per frame (icefall's modified_beam_search).

    Each hypothesis is a token sequence with the log-sum of the alignments that reached it; at
    every frame each utterance keeps its ``beam`` best (hypothesis, token) extensions, and
    extensions that land on the same token sequence are merged with log-add.
    """
    return [nbest[0] for nbest in modified_beam_nbest(model, enc_proj, enc_lens, beam)]


Beam = Dict[Tuple[int, ...], float]  # token sequence, the initial context first -> log-prob


def beam_start(model: nn.Module, context: Optional[Sequence[int]] = None) -> Beam:
    """A beam of one: the utterance start, or (``context``) a hypothesis that ends with these tokens."""
    if context is None:
        context = _initial_context(model.decoder.context_size, model.blank_id)
    return {tuple(context): 0.0}


def beam_nbest(model: nn.Module, beam: Beam) -> List[Hyp]:
    """A beam's hypotheses, best first, without their initial context."""
    cs = model.decoder.context_size
    return [Hyp(list(ys[cs:]), lp) for ys, lp in sorted(beam.items(), key=lambda kv: -kv[1])]


@torch.no_grad()
def modified_beam_nbest(
    model: nn.Module, enc_proj: torch.Tensor, enc_lens: torch.Tensor, beam: int = 4
) -> List[List[Hyp]]:
    """The final beam of :func:`modified_beam_search` per utterance, best first."""
    start = beam_start(model)
    beams = modified_beam_continue(model, enc_proj, enc_lens, [start] * enc_proj.shape[0], beam)
    return [beam_nbest(model, b) for b in beams]


@torch.no_grad()
def modified_beam_continue(
    model: nn.Module, enc_proj: torch.Tensor, enc_lens: torch.Tensor, beams: Sequence[Beam], beam: int = 4
) -> List[Beam]:
    """:func:`modified_beam_search` over (B, T, J) more frames, from ``beams`` (one per utterance)."""
    B, T, _ = enc_proj.shape
    silent = _silent_tokens(model)
    cs = model.decoder.context_size
    device = enc_proj.device
    beams = list(beams)
    lens = enc_lens.tolist()
    for t in range(T):
        active = [b for b in range(B) if t < lens[b]]
        if not active:
            break
        flat: List[Tuple[int, Tuple[int, ...], float]] = []
        for b in active:
            flat.extend((b, ys, lp) for ys, lp in beams[b].items())
        dec = _decoder_proj(model, [list(ys[-cs:]) for _, ys, _ in flat], device)  # (N, J)
        frame_idx = torch.tensor([b for b, _, _ in flat], device=device)
        logp = model.joiner(enc_proj[frame_idx, t], dec).float().log_softmax(-1)  # (N, V)
        V = logp.size(-1)
        hyp_lp = torch.tensor([lp for _, _, lp in flat], dtype=torch.float64, device=device)
        total = (logp.double() + hyp_lp.unsqueeze(-1)).cpu()
        start = 0
        for b in active:
            n = len(beams[b])
            block = total[start:start + n].reshape(-1)
            k = min(beam, block.numel())
            top_lp, top_idx = block.topk(k)
            new: Dict[Tuple[int, ...], float] = {}
            for lp, i in zip(top_lp.tolist(), top_idx.tolist()):
                ys = flat[start + i // V][1]
                tok = i % V
                if tok not in silent:
                    ys = ys + (tok,)
                old = new.get(ys)
                new[ys] = lp if old is None else _logaddexp(old, lp)
            beams[b] = new
            start += n
    return beams


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


@dataclass(frozen=True)
class CtcGreedyState:
    """A CTC best path so far: its tokens, the last frame's label (repeats collapse across chunks), log-prob."""

    tokens: Tuple[int, ...] = ()
    last: int = -1
    log_prob: float = 0.0

    def hyp(self) -> Hyp:
        return Hyp(list(self.tokens), self.log_prob)


@torch.no_grad()
def ctc_greedy_search(log_probs: torch.Tensor, lens: torch.Tensor, blank_id: int = 0) -> List[Hyp]:
    """Best path: frame-wise argmax, repeats collapsed, blanks removed. Score = best path log-prob."""
    return [s.hyp() for s in ctc_greedy_continue(log_probs, lens, [CtcGreedyState()] * log_probs.size(0), blank_id)]


@torch.no_grad()
def ctc_greedy_continue(log_probs: torch.Tensor, lens: torch.Tensor, states: Sequence[CtcGreedyState],
                        blank_id: int = 0) -> List[CtcGreedyState]:
    """:func:`ctc_greedy_search` over (B, T, V) more frames, from ``states``."""
    best_lp, best = log_probs.max(-1)
    out = []
    for b, n in enumerate(lens.tolist()):
        path = [states[b].last] + best[b, :n].tolist()
        tokens = list(states[b].tokens) + [k for i, k in enumerate(path[1:], 1)
                                           if k != blank_id and path[i - 1] != k]
        out.append(CtcGreedyState(tuple(tokens), path[-1], states[b].log_prob + float(best_lp[b, :n].double().sum())))
    return out


@torch.no_grad()
def ctc_prefix_beam_search(
    log_probs: torch.Tensor, lens: torch.Tensor, beam: int = 4, blank_id: int = 0
) -> List[Hyp]:
    """CTC prefix beam search: each prefix carries the log-prob of all alignments ending in
    blank (pb) and in its last token (pnb); the score is log(pb + pnb), i.e. the label
    sequence's probability summed over the alignments kept in the beam.

    At each frame the candidate tokens are the ``beam`` most likely ones plus each prefix's last
    token (so that the "repeat collapses" path is never pruned).
    """
    return [nbest[0] for nbest in ctc_prefix_beam_nbest(log_probs, lens, beam, blank_id)]


Prefixes = Dict[Tuple[int, ...], Tuple[float, float]]  # label prefix -> (log p ending in blank, in its last label)
CTC_START: Prefixes = {(): (0.0, -math.inf)}


def prefix_nbest(prefixes: Prefixes) -> List[Hyp]:
    final = sorted(((_logaddexp(pb, pnb), k) for k, (pb, pnb) in prefixes.items()), key=lambda sk: -sk[0])
    return [Hyp(list(k), score) for score, k in final]


@torch.no_grad()
def ctc_prefix_beam_nbest(
    log_probs: torch.Tensor, lens: torch.Tensor, beam: int = 4, blank_id: int = 0
) -> List[List[Hyp]]:
    """The final beam of :func:`ctc_prefix_beam_search` per utterance, best first (at most ``beam``
    hypotheses): what paper 1's posterior exit criterion normalises over."""
    starts = [CTC_START] * log_probs.size(0)
    return [prefix_nbest(p) for p in ctc_prefix_beam_continue(log_probs, lens, starts, beam, blank_id)]


@torch.no_grad()
def ctc_prefix_beam_continue(
    log_probs: torch.Tensor, lens: torch.Tensor, states: Sequence[Prefixes], beam: int = 4, blank_id: int = 0
) -> List[Prefixes]:
    """:func:`ctc_prefix_beam_search` over (B, T, V) more frames, from each utterance's prefixes."""
    out = []
    cand_k = min(beam, log_probs.size(-1))
    for b, n in enumerate(lens.tolist()):
        lp = log_probs[b, :n].double().cpu()
        top = lp.topk(cand_k, dim=-1).indices.tolist()
        rows = lp.tolist()
        ninf = -math.inf
        prefixes: Prefixes = dict(states[b])
        for t in range(n):
            row = rows[t]
            nxt: Dict[Tuple[int, ...], List[float]] = {}

            def add(key: Tuple[int, ...], which: int, value: float) -> None:
                cur = nxt.setdefault(key, [ninf, ninf])
                cur[which] = _logaddexp(cur[which], value)

            for prefix, (pb, pnb) in prefixes.items():
                tot = _logaddexp(pb, pnb)
                add(prefix, 0, tot + row[blank_id])
                cands = set(top[t])
                if prefix:
                    cands.add(prefix[-1])
                cands.discard(blank_id)
                for c in cands:
                    if prefix and c == prefix[-1]:
                        add(prefix, 1, pnb + row[c])  # repeat without blank collapses
                        add(prefix + (c,), 1, pb + row[c])  # blank in between: a new token
                    else:
                        add(prefix + (c,), 1, tot + row[c])
            ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam]
            prefixes = {k: (v[0], v[1]) for k, v in ranked}
        out.append(prefixes)
    return out


def search_input(model: nn.Module, method: str, enc_out: torch.Tensor, exit_layer: int) -> torch.Tensor:
    """What ``method`` searches at an exit: its CTC log-probs, or its encoder output projected for the joiner.
    Every exit's input has the same last dimension, so the inputs of several exits batch into one search."""
    if method in CTC_METHODS:
        return model.ctc_log_probs(enc_out, exit_layer)
    if method in METHODS:
        return model.project_encoder(enc_out, exit_layer)
    raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")


def search(model: nn.Module, method: str, x: torch.Tensor, lens: torch.Tensor, beam: int = 4) -> List[Hyp]:
    """Runs ``method`` over :func:`search_input`'s output (of one exit, or of several batched together)."""
    if method == "ctc_greedy_search":
        return ctc_greedy_search(x, lens, model.blank_id)
    if method == "ctc_prefix_beam_search":
        return ctc_prefix_beam_search(x, lens, beam, model.blank_id)
    if method == "greedy_search":
        return greedy_search(model, x, lens)
    if method == "modified_beam_search":
        return modified_beam_search(model, x, lens, beam)
    raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")


def run_search(
    model: nn.Module, method: str, enc_out: torch.Tensor, enc_lens: torch.Tensor, exit_layer: int, beam: int = 4
) -> List[Hyp]:
    """Decodes one exit's encoder output with ``method``."""
    return search(model, method, search_input(model, method, enc_out, exit_layer), enc_lens, beam)
