"""Streaming decoding: many streams of unequal length, chunk by chunk, each chunk at an exit of its own.

:class:`StreamingDecoder` keeps up to ``max_streams`` streams in one batch. At every step each of them feeds
its next chunk (the fbank frames of ``chunk`` encoder frames plus the front end's look-ahead); streams that
end leave the batch and waiting ones take their places. A chunk climbs the blocks of an early-exit encoder:

- at a fixed exit (``exit_layer=k``) every chunk stops at k, and the blocks above never run;
- with ``exit_layer="all"`` every chunk runs every block, and each exit keeps a search of its own (one pass
  gives the result of every fixed exit);
- with a :class:`ChunkExitRule` (``--exit-strategy`` and its threshold) a chunk stops at the first exit whose
  criterion passes. The streams that stop leave the climb; the rest go on to the next block. The blocks a
  chunk did not reach record it as absent (see ``splitformer.model.streaming``), so the result equals the
  masked whole-utterance forward with those per-chunk exits (``EarlyExitEncoder.forward(chunk_exits=...)``).

The search (greedy, modified beam, CTC greedy or prefix beam) goes on from chunk to chunk whatever exit each
chunk took: the decoder and joiner are shared by all exits, each exit projects its own frames.

Costs: every stream counts the MACs it spent, from the per-chunk costs of :func:`chunk_costs`: the front end,
each block it ran, and the criterion at each exit where it was scored (the last exit is never scored).
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from splitformer.decoding import decision
from splitformer.decoding.exits import SCORED, SCORERS, exit_score, posterior_of, thresholds_between
from splitformer.decoding.search import (CTC_METHODS, CTC_START, METHODS, CtcGreedyState, GreedyState, Hyp, beam_nbest,
                                         beam_start, ctc_greedy_continue, ctc_prefix_beam_continue, greedy_continue,
                                         greedy_start, modified_beam_continue, prefix_nbest)
from splitformer.model.streaming import StreamingEncoder, StreamState


@dataclass
class Utterance:
    """What one stream decodes: its fbank frames (T, 80), as prepared or computed from audio."""

    cut_id: str
    feats: Tensor
    ref: List[str] = field(default_factory=list)
    duration: float = 0.0


def cut_utterances(cuts) -> Iterator[Utterance]:
    """The prepared features of lhotse cuts (what decode.py reads), one stream each, loaded as they are needed."""
    for cut in cuts:
        text = " ".join(s.text for s in cut.supervisions if s.text)
        yield Utterance(cut.id, torch.from_numpy(cut.load_features()), text.split(), float(cut.duration))


def stream_words(results: Sequence["StreamResult"], tokenizer, key: int) -> List[Tuple[str, List[str], List[str]]]:
    """(id, reference words, hypothesis words) of each stream, read at ``key`` (see :class:`StreamResult`)."""
    return [(r.cut_id, r.ref, tokenizer.decode(r.tokens[key]).split() if r.tokens[key] else []) for r in results]


def threshold_candidates(trace: Sequence["StreamResult"], strategy: str, points: int) -> List[float]:
    """Thresholds worth trying for ``strategy``, from the chunk scores an all-exit pass recorded: the two that
    stop every chunk at the first and at the last exit, and ``points - 2`` between quantiles of the scores."""
    return thresholds_between([v for r in trace for chunk in r.chunk_scores for v in chunk], max(points - 2, 1))


def budget_curve(make_decoder: Callable[[Optional[str], float], "StreamingDecoder"],
                 utterances: Callable[[], Iterable[Utterance]], audio_seconds: float, tokenizer, strategy: str,
                 points: int, bar: Optional[Callable[[str], Callable[[int], None]]] = None) -> List[Dict[str, float]]:
    """(threshold, wer, cost in MACs per second of audio) of ``points`` thresholds of ``strategy``, each decoded
    over ``utterances`` exactly as a run with it decodes (per-chunk decisions, costs counted the same way), so
    that a budget met here is met by the same procedure elsewhere. Candidates: quantiles of the chunk scores of
    one all-exit pass. ``make_decoder(exit_layer, threshold)`` gives the decoder ("all" for that pass, None for a
    per-chunk run); ``utterances()`` a fresh iterable each time; ``bar(desc)`` a progress callback."""
    import logging

    from splitformer.decoding.results import fmt_macs, word_error_rate

    trace = make_decoder("all", 0.0).decode(utterances(), progress=bar("scores") if bar else None)
    rows = []
    for t in threshold_candidates(trace, strategy, points):
        res = make_decoder(None, t).decode(utterances(), progress=bar(f"T={t:.4g}") if bar else None)
        wer, _ = word_error_rate(stream_words(res, tokenizer, 0))
        rows.append(dict(threshold=t, wer=wer, cost=sum(r.macs for r in res) / (audio_seconds or 1.0)))
        logging.info(f"{strategy} threshold {t:.6g}: WER {wer:.2f}% MACs/s {fmt_macs(rows[-1]['cost'])}")
    return rows


# ------------------------------------------------------------------------------------------ searches
class ExitSearch:
    """One decoding method that goes on chunk after chunk, reading each chunk at the exit it stopped at."""

    def __init__(self, model, method: str, beam: int = 4) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
        if method in CTC_METHODS and not model.use_ctc:
            raise ValueError(f"{method} needs a CTC head, but this model was trained without one")
        if method not in CTC_METHODS and not model.use_transducer:
            raise ValueError(f"{method} needs the transducer, but this model is CTC-only; use a ctc_* method")
        self.model = model
        self.method = method
        self.beam = beam

    @property
    def ctc(self) -> bool:
        return self.method in CTC_METHODS

    def start(self):
        m = self.method
        if m == "greedy_search":
            return greedy_start(self.model)
        if m == "modified_beam_search":
            return beam_start(self.model)
        return CtcGreedyState() if m == "ctc_greedy_search" else CTC_START

    def head(self, exit_layer: int, enc: Tensor) -> Tensor:
        """What the search reads from an exit's frames: CTC log-probs or the joiner's projection."""
        if self.ctc:
            return self.model.ctc_log_probs(enc, exit_layer)
        return self.model.project_encoder(enc, exit_layer)

    def step(self, head: Tensor, lens: Tensor, states: Sequence) -> List:
        m = self.method
        if m == "greedy_search":
            return greedy_continue(self.model, head, lens, states)[0]
        if m == "modified_beam_search":
            return modified_beam_continue(self.model, head, lens, states, self.beam)
        if m == "ctc_greedy_search":
            return ctc_greedy_continue(head, lens, states, self.model.blank_id)
        return ctc_prefix_beam_continue(head, lens, states, self.beam, self.model.blank_id)

    def hyp(self, state) -> Hyp:
        m = self.method
        if m in ("greedy_search", "ctc_greedy_search"):
            return state.hyp()
        best = beam_nbest(self.model, state) if m == "modified_beam_search" else prefix_nbest(state)
        return best[0]

    def greedy_view(self, state) -> GreedyState:
        """The transducer greedy state the best hypothesis so far stands for (what the transducer scorer
        continues from)."""
        if self.method == "greedy_search":
            return state
        toks = self.hyp(state).tokens
        cs = self.model.decoder.context_size
        ctx = (list(greedy_start(self.model).context) + toks)[-cs:]
        return GreedyState(tuple(toks), tuple(ctx))


# ------------------------------------------------------------------------------------------ exit rule
# A chunk whose best path holds no token is scored as its posteriors say: silence between words is normal in
# a stream, and its words come in later chunks (an utterance's exit, by contrast, climbs on; see decision.py).
CHUNK_TOKENLESS = "confident"


class ChunkExitRule:
    """``--exit-strategy`` and its threshold, decided per chunk from the chunk's frames at one exit.

    ``scorer="ctc"`` reads the exit's CTC head (entropy and confidence over the chunk's frames; posterior: the
    N-best of a CTC prefix beam over the chunk); ``"transducer"`` reads the transducer: the greedy path's
    posteriors over the chunk, from where the stream's best hypothesis stands (entropy, confidence), or the
    N-best of a modified beam search over the chunk from there (posterior). When the scoring pass is the
    search itself (greedy decoding read by the transducer scorer, CTC decoding by the CTC scorer), the
    search's result of a chunk that stops comes from that pass.
    """

    def __init__(self, model, strategy: str, threshold: float, scorer: str = "ctc", nbest: int = 4) -> None:
        if strategy not in SCORED:
            raise ValueError(f"a per-chunk exit needs --exit-strategy {'|'.join(SCORED)}, got {strategy!r}")
        if scorer not in SCORERS:
            raise ValueError(f"unknown exit scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if scorer == "ctc" and not model.use_ctc:
            raise ValueError("--exit-scorer ctc reads the CTC heads, but this model has none; use transducer")
        if scorer == "transducer" and not model.use_transducer:
            raise ValueError("--exit-scorer transducer needs the transducer, but this model is CTC-only")
        self.model = model
        self.strategy = strategy
        self.threshold = float(threshold)
        self.scorer = scorer
        self.nbest = nbest

    def score(self, exit_layer: int, enc: Tensor, lens: Tensor, search: ExitSearch, states: Sequence
              ) -> Tuple[Tensor, Optional[List]]:
        """(B,) scores of the chunk at this exit, and the search's states after the chunk where the scoring
        pass computed them (None otherwise)."""
        model = self.model
        if self.scorer == "ctc":
            lp = model.ctc_log_probs(enc, exit_layer)
            if self.strategy == "posterior":
                scores = posterior_of([prefix_nbest(p) for p in
                                       ctc_prefix_beam_continue(lp, lens, [CTC_START] * lp.size(0), self.nbest,
                                                                model.blank_id)], self.nbest, CHUNK_TOKENLESS)
            else:
                scores = exit_score(self.strategy, lp, lens, blank_id=model.blank_id, tokenless=CHUNK_TOKENLESS)
            reuse = search.step(lp, lens, states) if search.ctc and search.method == "ctc_greedy_search" else None
            return scores.double().cpu(), reuse
        proj = model.project_encoder(enc, exit_layer)
        views = [search.greedy_view(s) for s in states]
        if self.strategy == "posterior":
            starts = [beam_start(model, v.context) for v in views]
            beams = modified_beam_continue(model, proj, lens, starts, self.nbest)
            return posterior_of([beam_nbest(model, b) for b in beams], self.nbest, CHUNK_TOKENLESS), None
        new, path = greedy_continue(model, proj, lens, views)
        scores = exit_score(self.strategy, path, lens, blank_id=model.blank_id, tokenless=CHUNK_TOKENLESS)
        return scores.double().cpu(), (new if search.method == "greedy_search" else None)

    def stops(self, scores: Tensor, thresholds: Optional[Sequence[Optional[float]]] = None) -> Tensor:
        """Which chunks stop; ``thresholds``: one per chunk where streams set their own (None: the rule's)."""
        ts = [self.threshold if t is None else t for t in (thresholds or [None] * len(scores))]
        return torch.from_numpy(decision.stops(self.strategy, scores.double().numpy(), ts))


# ------------------------------------------------------------------------------------------ costs
@dataclass
class ChunkCosts:
    """MACs of one chunk of one stream: the front end (with input projection and downsampling), each block
    (attending to a full left context), and the criterion at each exit. ``seconds``: audio per chunk."""

    front: float
    blocks: List[float]
    scorer: List[float]
    seconds: float

    def fixed(self, block: int) -> float:
        """A chunk that runs the blocks up to ``block`` and is not scored (a fixed exit)."""
        return self.front + sum(self.blocks[: block + 1])

    def dynamic(self, block: int) -> float:
        """A chunk that climbed to ``block`` and stopped there: scored at every exit up to it (the last exit
        is never scored, its criterion costs 0)."""
        return self.fixed(block) + sum(self.scorer[: block + 1])


@torch.no_grad()
def chunk_costs(enc: StreamingEncoder, rule: Optional[ChunkExitRule] = None, search: Optional[ExitSearch] = None
                ) -> ChunkCosts:
    """Counts :class:`ChunkCosts` with ``torch.utils.flop_counter`` on one stream whose caches are full."""
    from torch.utils.flop_counter import FlopCounterMode

    model = enc.model

    def macs(fn: Callable[[], object]) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops() / 2

    state = enc.init_state(1)
    state.processed.fill_(enc.left)
    for part in state.parts:  # every cache slot filled: the steady state of a long stream
        if part and part[0].dtype == torch.bool:
            part[0].fill_(True)
    feats = torch.zeros(1, enc.input_frames, model.feature_dim)
    remaining = torch.tensor([10 ** 9])
    h, lens = enc.front_step(feats, state, remaining)
    seconds = enc.shift / 100.0
    if not enc.early_exit:
        front = macs(lambda: enc.front_step(feats, enc.init_state(1), remaining))
        return ChunkCosts(front, [macs(lambda: enc.encode(h, lens, state.select(torch.tensor([0]))))], [0.0], seconds)

    def front_all():
        hh, ll = enc.front_step(feats, enc.init_state(1), remaining)
        enc.prepare(hh, ll)

    front = macs(front_all)
    x, x_lens = enc.prepare(h, lens)
    blocks, scorer = [], []
    for b, e in enumerate(enc.exits):
        sub = state.select(torch.tensor([0]))
        blocks.append(macs(lambda: enc.block(b, x, x_lens, sub)))
        x, out = enc.block(b, x, x_lens, state)
        if rule is None or b == len(enc.exits) - 1:
            scorer.append(0.0)
        else:
            s = search or ExitSearch(model, "greedy_search" if model.use_transducer else "ctc_greedy_search")
            scorer.append(macs(lambda: rule.score(e, out, x_lens, s, [s.start()])))
    return ChunkCosts(front, blocks, scorer, seconds)


# ------------------------------------------------------------------------------------------ the decoder
@dataclass
class StreamResult:
    """What decoding one stream gave: token ids per exit read (key 0 for a fixed or dynamic run; every exit
    layer with ``exit_layer="all"``), the exit each chunk stopped at, and the MACs spent."""

    cut_id: str
    ref: List[str]
    duration: float
    tokens: Dict[int, List[int]]
    chunk_exits: List[int]
    macs: float = 0.0
    chunk_scores: List[List[float]] = field(default_factory=list)  # exit_layer="all" with a rule: per chunk, per exit


@dataclass
class _Live:
    utt: Utterance
    front_len: int  # front-end output frames of the whole stream
    num_chunks: int
    searches: Dict[int, object]
    chunk_exits: List[int] = field(default_factory=list)
    macs: float = 0.0
    scores: List[List[float]] = field(default_factory=list)
    threshold: Optional[float] = None  # this stream's own threshold (a live server's per-connection budget)


OPEN_ENDED = 10 ** 9  # front-end frames of a live stream whose end is not known yet


class StreamingDecoder:
    """Decodes utterances as live streams, ``max_streams`` at a time (see the module docstring).

    ``exit_layer``: an exit layer, ``"all"`` (every exit, one pass; with a ``rule``, each chunk's score at
    every exit is recorded too), or None with a ``rule`` (per-chunk dynamic exits); None without a rule is
    the last exit. ``timing`` collects seconds spent in the front
    end + encoder and in the heads and search, for real-time factors.
    """

    def __init__(self, model, chunk: int, left: int, method: str = "greedy_search", beam: int = 4,
                 exit_layer: Union[int, str, None] = None, rule: Optional[ChunkExitRule] = None,
                 max_streams: int = 64, costs: Optional[ChunkCosts] = None) -> None:
        self.model = model
        self.enc = StreamingEncoder(model, chunk, left)
        self.search = ExitSearch(model, method, beam)
        self.exits = list(model.exits)
        if exit_layer not in (None, "all") and rule is not None:
            raise ValueError("an exit strategy chooses the exit per chunk: give no fixed exit layer with it")
        if exit_layer not in (None, "all") and int(exit_layer) not in self.exits:
            raise ValueError(f"no exit after layer {exit_layer}; valid exits: {', '.join(map(str, self.exits))}")
        if not self.enc.early_exit and (rule is not None):
            raise ValueError("per-chunk exits need an early-exit encoder; this model has a single exit")
        self.all = exit_layer == "all"
        self.rule = rule
        self.top = self.exits.index(int(exit_layer)) if exit_layer not in (None, "all") else len(self.exits) - 1
        self.max_streams = max_streams
        self.costs = costs
        self.encoder_seconds = 0.0
        self.total_seconds = 0.0
        # with exit_layer "all": per exit, the seconds a fixed run to that exit would have spent (front end and
        # the blocks up to it; and its own search), so that each exit's real-time factor is its own
        self.exit_seconds: Dict[int, List[float]] = {e: [0.0, 0.0] for e in self.exits}

    # ---------------------------------------------------------------- driving
    @torch.no_grad()
    def decode(self, utterances: Iterable[Utterance], progress: Optional[Callable[[int], None]] = None
               ) -> List[StreamResult]:
        """Every utterance decoded as a stream; results in input order."""
        pending = iter(utterances)
        live: List[_Live] = []
        state: Optional[StreamState] = None
        results: Dict[str, StreamResult] = {}
        order: List[str] = []
        exhausted = False
        while True:
            if not exhausted and len(live) < self.max_streams:
                joined = []
                while len(live) + len(joined) < self.max_streams:
                    try:
                        utt = next(pending)
                    except StopIteration:
                        exhausted = True
                        break
                    order.append(utt.cut_id)
                    info = self._join(utt)
                    if info.num_chunks == 0:  # shorter than the front end's window: nothing to hear
                        results[utt.cut_id] = self._result(info)
                        if progress:
                            progress(1)
                        continue
                    joined.append(info)
                if joined:
                    fresh = self.enc.init_state(len(joined))
                    state = fresh if state is None or not live else StreamState.cat([state, fresh])
                    live += joined
            if not live:
                break
            self.step(live, state)
            done = [i for i, s in enumerate(live) if len(s.chunk_exits) >= s.num_chunks]
            if done:
                for i in done:
                    results[live[i].utt.cut_id] = self._result(live[i])
                keep = [i for i in range(len(live)) if i not in set(done)]
                live = [live[i] for i in keep]
                state = state.select(torch.tensor(keep, dtype=torch.long)) if keep else None
                if progress:
                    progress(len(done))
        return [results[c] for c in order]

    def front_frames(self, num_feats: int) -> int:
        """Encoder frames the front end makes of ``num_feats`` fbank frames (0 when they are fewer than the
        front end's window)."""
        return max(int(self.enc.front.output_lengths(torch.tensor([num_feats]))[0]), 0)

    def num_chunks(self, num_feats: int) -> int:
        """Chunks a stream of ``num_feats`` fbank frames runs, the last one padded."""
        return -(-self.front_frames(num_feats) // self.enc.chunk)

    def _join(self, utt: Utterance) -> _Live:
        searches = {e: self.search.start() for e in (self.exits if self.all else [0])}
        n = utt.feats.shape[0]
        return _Live(utt, self.front_frames(n), self.num_chunks(n), searches)

    def open(self, utt: Utterance) -> _Live:
        """A live stream whose frames keep coming (``utt.feats`` grows): it runs chunks while :meth:`step` is
        given it, until :meth:`close` tells it how many frames it has in all."""
        s = self._join(utt)
        s.front_len = s.num_chunks = OPEN_ENDED
        return s

    def close(self, s: _Live) -> None:
        """The live stream ``s`` has all its frames in ``s.utt.feats``: its last chunks are known now."""
        n = s.utt.feats.shape[0]
        s.front_len, s.num_chunks = self.front_frames(n), self.num_chunks(n)

    def tokens(self, s: _Live, key: int = 0) -> List[int]:
        """The best hypothesis of stream ``s`` so far."""
        return self.search.hyp(s.searches[key]).tokens

    def _result(self, s: _Live) -> StreamResult:
        """Token ids per exit read (key 0: the one search of a fixed or dynamic run)."""
        tokens = {e: self.tokens(s, e) for e in s.searches}
        return StreamResult(s.utt.cut_id, s.utt.ref, s.utt.duration, tokens, s.chunk_exits, s.macs, s.scores)

    # ---------------------------------------------------------------- one chunk of every live stream
    def _windows(self, live: Sequence[_Live]) -> Tuple[Tensor, Tensor]:
        enc = self.enc
        feats = []
        remaining = []
        for s in live:
            k = len(s.chunk_exits)
            start = k * enc.shift
            x = s.utt.feats[start: start + enc.input_frames]
            if x.shape[0] < enc.input_frames:
                x = torch.cat([x, x.new_zeros(enc.input_frames - x.shape[0], x.shape[1])])
            feats.append(x)
            remaining.append(s.front_len - k * enc.chunk)
        return torch.stack(feats), torch.tensor(remaining, dtype=torch.int64)

    def step(self, live: Sequence[_Live], state: StreamState) -> None:
        """One chunk of each live stream (``state`` holds them in the same order)."""
        t0 = time.perf_counter()
        feats, remaining = self._windows(live)
        feats = feats.to(next(self.model.parameters()).device)
        h, lens = self.enc.front_step(feats, state, remaining.to(feats.device))
        enc_time = time.perf_counter() - t0
        if not self.enc.early_exit:
            t1 = time.perf_counter()
            out, out_lens = self.enc.encode(h, lens, state)
            enc_time += time.perf_counter() - t1
            key = self.exits[-1] if self.all else 0
            self._search(live, range(len(live)), self.exits[-1], out, out_lens, key)
            self._record(live, range(len(live)), 0)
        else:
            enc_time += self._climb(live, state, h, lens, enc_time)
            self.enc.finish_chunk(state)
        self.encoder_seconds += enc_time
        self.total_seconds += time.perf_counter() - t0

    def _climb(self, live: Sequence[_Live], state: StreamState, h: Tensor, lens: Tensor, front: float) -> float:
        """The blocks, with streams leaving at their exits; returns the seconds spent in blocks. ``front``: the
        seconds this chunk's front end took (charged to every exit of an all-exit pass)."""
        enc = self.enc
        x, x_lens = enc.prepare(h, lens)
        climbing = torch.arange(len(live))
        spent = 0.0
        for b in range(self.top + 1):
            if len(climbing) == 0:  # every chunk stopped below: the rest record it as absent
                self._skip(b, state, None)
                continue
            t0 = time.perf_counter()
            if len(climbing) == len(live):
                x, out = enc.block(b, x, x_lens, state)
            else:
                sub = _select_part(state, b, climbing)
                x, out = enc.block(b, x, x_lens, sub)
                _assign_part(state, b, climbing, sub)
                ran = torch.zeros(len(live), dtype=torch.bool)
                ran[climbing] = True
                self._skip(b, state, (~ran).nonzero().flatten())
            spent += time.perf_counter() - t0
            e = self.exits[b]
            members = climbing.tolist()
            if self.all:
                if self.rule is not None and b < self.top:  # a trace: every chunk's score at every exit
                    scores, _ = self.rule.score(e, out, x_lens, self.search, [live[i].searches[e] for i in members])
                    for i, v in zip(members, scores.tolist()):
                        if b == 0:
                            live[i].scores.append([])
                        live[i].scores[-1].append(v)
                t1 = time.perf_counter()
                self._search(live, members, e, out, x_lens, key=e)
                self.exit_seconds[e][0] += front + spent
                self.exit_seconds[e][1] += front + spent + time.perf_counter() - t1
                if b == self.top:
                    self._record(live, members, b)
                continue
            if b == self.top:  # a fixed exit, or the top of a dynamic climb
                self._search(live, members, e, out, x_lens)
                self._record(live, members, b)
                break
            if self.rule is None:
                continue
            states = [live[i].searches[0] for i in members]
            scores, reuse = self.rule.score(e, out, x_lens, self.search, states)
            stop = self.rule.stops(scores, [live[i].threshold for i in members])
            if not bool(stop.any()):
                continue
            rows = stop.nonzero().flatten()
            done = [members[r] for r in rows.tolist()]
            if reuse is not None:  # the scoring pass was this chunk's search
                new = [reuse[r] for r in rows.tolist()]
            else:
                new = self.search.step(self.search.head(e, out[rows]), x_lens[rows], [states[r] for r in rows.tolist()])
            for i, st in zip(done, new):
                live[i].searches[0] = st
            self._record(live, done, b)
            keep = (~stop).nonzero().flatten()
            climbing = climbing[keep]
            x, x_lens = x[keep], x_lens[keep]
        return spent

    def _skip(self, block: int, state: StreamState, idx: Optional[Tensor]) -> None:
        if self.rule is None:
            return  # nothing ever reads the blocks above a fixed exit
        if idx is None:
            self.enc.skip(block, state)
            return
        sub = _select_part(state, block, idx)
        self.enc.skip(block, sub)
        _assign_part(state, block, idx, sub)

    def _record(self, live: Sequence[_Live], members: Sequence[int], block: int) -> None:
        """The chunk of these streams stopped at ``block`` (scored on the way when an exit rule climbs)."""
        cost = 0.0
        if self.costs is not None:
            cost = self.costs.dynamic(block) if self.rule is not None and not self.all else self.costs.fixed(block)
        for i in members:
            live[i].chunk_exits.append(self.exits[block] if self.enc.early_exit else self.exits[-1])
            live[i].macs += cost

    def _search(self, live: Sequence[_Live], members: Sequence[int], exit_layer: int, out: Tensor,
                lens: Tensor, key: int = 0) -> None:
        """Every member's search goes on over the chunk as ``exit_layer`` gives it."""
        head = self.search.head(exit_layer, out)
        new = self.search.step(head, lens, [live[i].searches[key] for i in members])
        for i, st in zip(members, new):
            live[i].searches[key] = st


def _select_part(state: StreamState, block: int, idx: Tensor) -> StreamState:
    """A state holding only block ``block``'s tensors of the streams at ``idx`` (the rest left out)."""
    parts: List[List[Tensor]] = [[] for _ in state.parts]
    parts[block] = [t.index_select(0, idx) for t in state.parts[block]]
    return StreamState(None, parts, state.processed.index_select(0, idx), state.chunks.index_select(0, idx))


def _assign_part(state: StreamState, block: int, idx: Tensor, sub: StreamState) -> None:
    for t, n in zip(state.parts[block], sub.parts[block]):
        t.index_copy_(0, idx, n)
