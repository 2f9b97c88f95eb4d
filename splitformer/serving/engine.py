"""Live streams for the recognition server: audio that arrives in pieces, decoded chunk by chunk, every stream
with a chunk ready in one batch, each chunk at the exit its stream's criterion and budget choose.

One worker thread owns the model and every stream's features, state and search (:meth:`Engine.run`). A
connection only hands its :class:`LiveStream` audio and settings (a thread-safe inbox) and hears back through a
callback, so a client that misbehaves or vanishes costs the others nothing but its own chunks.

Streams are batched by what they run: a fixed exit, or per-chunk exits by one criterion (each stream with its own
threshold, from its budget). The decoding within a batch is streaming_decode.py's
(:meth:`StreamingDecoder.step`), so a stream alone gets streaming_decode.py's words for the same audio; batched
with others, the same up to float rounding.

A budget is a fraction of the last exit's compute per second of audio. It becomes a threshold through the
stream's criterion's *budget curve*: (threshold, WER, cost) measured on a dev set by decoding each candidate the
way the streams are decoded (:func:`~splitformer.decoding.streaming.budget_curve`); the threshold with the lowest
WER within the budget, or the cheapest one when none fits.
"""
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from splitformer.decoding.audio import NUM_BINS, SAMPLE_RATE, online_fbank
from splitformer.decoding.exits import SCORED, pick_under_budget
from splitformer.decoding.streaming import (OPEN_ENDED, ChunkCosts, ChunkExitRule, StreamingDecoder, Utterance,
                                            budget_curve, chunk_costs)
from splitformer.model.streaming import StreamState

Key = Tuple[str, object]  # ("fixed", exit layer) or ("dynamic", criterion)
POLL = 0.01  # seconds between the worker's looks at the streams while none has a chunk ready


class SettingsError(ValueError):
    """Settings a client asked for that this server cannot give; the message says what it can."""


@dataclass(frozen=True)
class Settings:
    """What one stream runs: a fixed ``exit_layer``, or per-chunk exits by ``strategy`` with a ``budget`` (a
    fraction of the last exit's compute) or a ``threshold``; ``endpoint``: close an utterance after a pause."""

    exit_layer: Optional[int] = None
    strategy: Optional[str] = None
    budget: Optional[float] = None
    threshold: Optional[float] = None
    endpoint: bool = True

    @property
    def key(self) -> Key:
        return ("fixed", self.exit_layer) if self.strategy is None else ("dynamic", self.strategy)


class Engine:
    """The model, its decoders (one per fixed exit and per criterion) and the live streams.

    ``curves``: per criterion, its budget curve on dev (see :meth:`calibrate`); a criterion without one takes
    thresholds only. ``batch_wait``: how long a ready chunk may wait for others to batch with (see :meth:`run`).
    ``endpoint_seconds``: a pause (chunks that add no token) after some words that ends an
    utterance; ``idle_seconds``: the same with no words yet (the utterance ends empty).
    """

    def __init__(self, model, tokenizer, chunk: int, left: int, method: str = "greedy_search", beam: int = 4,
                 scorer: str = "ctc", nbest: int = 4, max_batch: int = 64, endpoint_seconds: float = 1.2,
                 idle_seconds: float = 8.0, batch_wait: float = 0.1) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chunk, self.left = chunk, left
        self.method, self.beam, self.scorer, self.nbest = method, beam, scorer, nbest
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.endpoint_seconds, self.idle_seconds = endpoint_seconds, idle_seconds
        self.exits = list(model.exits)
        self.curves: Dict[str, List[Dict[str, float]]] = {}
        self._decoders: Dict[Key, StreamingDecoder] = {}
        self._costs: Dict[str, ChunkCosts] = {}
        self.streams: List["LiveStream"] = []
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.busy_seconds = 0.0
        self.chunks_run = 0
        self.steps = 0
        self.started = time.perf_counter()
        top = self.decoder(("fixed", self.exits[-1]))
        self.chunk_seconds = top.costs.seconds
        self.full_cost = top.costs.fixed(len(self.exits) - 1) / self.chunk_seconds  # MACs/s at the last exit
        self.early_exit = top.enc.early_exit

    # ------------------------------------------------------------------ decoders and budgets
    def _rule(self, strategy: str, threshold: float = 0.0) -> ChunkExitRule:
        return ChunkExitRule(self.model, strategy, threshold, self.scorer, self.nbest)

    def decoder(self, key: Key) -> StreamingDecoder:
        """The decoder streams of ``key`` run in (made once; per-chunk thresholds are the streams' own)."""
        if key not in self._decoders:
            kind, what = key
            self._decoders[key] = self._new_decoder(what if kind == "fixed" else None,
                                                    self._rule(what) if kind == "dynamic" else None)
        return self._decoders[key]

    def _new_decoder(self, exit_layer, rule: Optional[ChunkExitRule]) -> StreamingDecoder:
        """A decoder of this engine's chunking and search; its costs are counted once per kind (fixed, or each
        criterion: thresholds do not change what a criterion costs)."""
        dec = StreamingDecoder(self.model, self.chunk, self.left, self.method, self.beam, exit_layer, rule,
                               self.max_batch)
        cost_key = "fixed" if rule is None else rule.strategy
        if cost_key not in self._costs:
            self._costs[cost_key] = chunk_costs(dec.enc, rule, dec.search)
        dec.costs = self._costs[cost_key]
        return dec

    def calibrate(self, strategy: str, utterances: Sequence[Utterance], points: int = 8) -> List[Dict[str, float]]:
        """The budget curve of ``strategy`` on ``utterances`` (dev): each candidate threshold decoded as the
        streams are decoded, its WER and its MACs per second of audio."""
        self._check_strategy(strategy)
        audio = sum(u.feats.shape[0] for u in utterances) / 100.0
        rows = budget_curve(lambda layer, t: self._new_decoder(layer, self._rule(strategy, t)), lambda: utterances,
                            audio, self.tokenizer, strategy, points)
        self.curves[strategy] = rows
        return rows

    def _check_strategy(self, strategy: str) -> None:
        if strategy not in SCORED:
            raise SettingsError(f"unknown criterion {strategy!r}; choose one of {', '.join(SCORED)}")
        if not self.early_exit:
            raise SettingsError("this model has a single exit: per-chunk exits need an early-exit model")

    def resolve(self, settings: Settings) -> Tuple[Settings, Optional[float]]:
        """``settings`` checked, completed (the last exit when nothing is asked), and the threshold its chunks
        use (None for a fixed exit). Raises :class:`SettingsError` with what is valid."""
        if settings.strategy is None:
            exit_layer = self.exits[-1] if settings.exit_layer is None else settings.exit_layer
            if exit_layer not in self.exits:
                raise SettingsError(f"no exit after layer {exit_layer}; valid exits: {', '.join(map(str, self.exits))}")
            if settings.budget is not None or settings.threshold is not None:
                raise SettingsError("a budget or threshold needs a criterion (strategy: "
                                    f"{'|'.join(SCORED)}); a fixed exit spends what it spends")
            return replace(settings, exit_layer=exit_layer), None
        self._check_strategy(settings.strategy)
        if settings.exit_layer is not None:
            raise SettingsError("a criterion chooses the exit per chunk: give either exit or strategy, not both")
        if (settings.budget is None) == (settings.threshold is None):
            raise SettingsError("per-chunk exits need one of budget (a fraction of the last exit's compute, in "
                                "(0, 1]) or threshold")
        if settings.threshold is not None:
            if not math.isfinite(settings.threshold) and settings.threshold != math.inf:
                raise SettingsError(f"threshold must be a number, got {settings.threshold}")
            return settings, float(settings.threshold)
        return settings, self.threshold_for(settings.strategy, settings.budget)

    def threshold_for(self, strategy: str, budget: float) -> float:
        """The threshold of ``strategy`` whose dev WER is lowest within ``budget`` x the last exit's compute (the
        cheapest threshold when none fits)."""
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise SettingsError(f"budget is a fraction of the last exit's compute in (0, 1], got {budget!r}")
        rows = self.curves.get(strategy)
        if not rows:
            have = ", ".join(sorted(self.curves)) or "none"
            raise SettingsError(f"this server has no budget curve for {strategy!r} (calibrated: {have}); give a "
                                "threshold instead, or start the server with that criterion in --strategies")
        try:
            return float(pick_under_budget(rows, budget * self.full_cost)["threshold"])
        except ValueError:
            return float(min(rows, key=lambda r: r["cost"])["threshold"])

    # ------------------------------------------------------------------ streams
    def open(self, settings: Settings, publish: Callable[[dict], None], name: str = "") -> "LiveStream":
        """A new stream with checked ``settings``; ``publish`` is called (from the worker thread) with each result."""
        settings, threshold = self.resolve(settings)
        s = LiveStream(self, name or f"s{id(publish):x}", settings, threshold, publish)
        with self._lock:
            self.streams.append(s)
        self.wake.set()
        return s

    @property
    def active(self) -> int:
        with self._lock:
            return len(self.streams)

    def stats(self) -> Dict[str, float]:
        up = time.perf_counter() - self.started
        return dict(streams=self.active, busy_seconds=self.busy_seconds, uptime_seconds=up, chunks=self.chunks_run,
                    steps=self.steps, chunk_seconds=self.chunk_seconds, full_macs_per_second=self.full_cost)

    def run(self, stop: threading.Event) -> None:
        """The worker loop. A chunk that is ready waits up to ``batch_wait`` seconds for other streams' chunks to
        join its batch (unless every stream, or ``max_batch`` of them, is ready): streams speak out of step, and a
        batch of many chunks costs far less per chunk than one chunk alone."""
        first_ready: Optional[float] = None
        while not stop.is_set():
            ready, active = self.poll()
            if ready == 0:
                first_ready = None
                # looked at every POLL seconds, not at every message: a look takes in every stream's audio, and
                # with N clients sending 10 messages a second, one look per message would cost N^2 of them
                self.wake.wait(POLL if active else 0.5)
                self.wake.clear()
                continue
            now = time.perf_counter()
            first_ready = now if first_ready is None else first_ready
            left = self.batch_wait - (now - first_ready)
            if ready < min(active, self.max_batch) and left > 0:
                time.sleep(min(left, POLL))
                continue
            self.step()
            first_ready = None

    def poll(self) -> Tuple[int, int]:
        """Takes in what every stream was sent; returns (streams with a chunk ready, streams)."""
        t0 = time.perf_counter()
        with self._lock:
            streams = list(self.streams)
        ready = 0
        for s in streams:
            s.take_in()
            ready += not s.closed and (s.ready() or s.finished())
        self.busy_seconds += time.perf_counter() - t0
        return ready, len(streams)

    @torch.no_grad()
    def step(self) -> int:
        """Takes in what every stream was sent, then runs one chunk of every stream that has one ready (batched by
        what they run). Returns how many chunks ran."""
        t_start = time.perf_counter()
        with self._lock:
            streams = list(self.streams)
        groups: Dict[Key, List[LiveStream]] = {}
        for s in streams:
            s.take_in()
            if not s.closed and s.ready():
                groups.setdefault(s.settings.key, []).append(s)
        ran = 0
        for key, group in groups.items():
            dec = self.decoder(key)
            for i in range(0, len(group), self.max_batch):
                part = group[i: i + self.max_batch]
                try:
                    self._run(dec, part)
                except Exception as e:  # a model failure fails these streams, not the server
                    logging.exception("decoding failed")
                    for s in part:
                        s.fail(f"decoding failed: {type(e).__name__}: {e}")
                    continue
                ran += len(part)
                for s in part:
                    s.after_chunk(dec)
        for s in streams:
            if not s.closed and s.finished():
                s.finish(dec=self.decoder(s.settings.key))
        with self._lock:
            self.streams = [s for s in self.streams if not s.closed]
        self.chunks_run += ran
        self.steps += bool(ran)
        self.busy_seconds += time.perf_counter() - t_start  # features, decoding, results: all the worker does
        return ran

    @staticmethod
    def _run(dec: StreamingDecoder, part: Sequence["LiveStream"]) -> None:
        if len(part) == 1:
            dec.step([part[0].live], part[0].state)
            return
        state = StreamState.cat([s.state for s in part])
        dec.step([s.live for s in part], state)
        for s, own in zip(part, state.split()):
            s.state = own


class LiveStream:
    """One client's stream. The connection calls :meth:`feed`, :meth:`update`, :meth:`end` and :meth:`close`
    (any thread); everything else runs in the engine's worker thread.

    An utterance (a *segment*) ends at the client's ``end`` or, with ``endpoint`` on, after a pause; the stream
    then goes on with a fresh state and search from the next unread frame. Published messages:
    ``{"type": "partial", ...}`` after each chunk and ``{"type": "final", ..., "last": bool}`` per utterance.
    """

    def __init__(self, engine: Engine, name: str, settings: Settings, threshold: Optional[float],
                 publish: Callable[[dict], None]) -> None:
        self.engine = engine
        self.name = name
        self.settings = settings
        self.threshold = threshold
        self.publish = publish
        self.inbox: "queue.SimpleQueue[Tuple[str, object]]" = queue.SimpleQueue()
        self.fbank = online_fbank()
        self.frames_read = 0  # frames taken from the feature computer (all segments)
        self.feats = torch.zeros(0, NUM_BINS)
        self.samples = 0  # samples received
        self.segment = -1
        self.ended = False  # the worker has taken in the client's end: no more audio
        self.ended_by_client = False  # the connection has passed the end on (connection side)
        self.closed = False
        self.seg_macs = 0.0
        self.total_macs = 0.0
        self.total_chunks = 0
        self._new_segment(0)

    # ---------------------------------------------------------------- connection side (any thread)
    def feed(self, samples: np.ndarray) -> None:
        """16 kHz mono float samples in [-1, 1], as they arrive (the worker looks every ``POLL`` seconds)."""
        self.inbox.put(("audio", samples))

    def update(self, settings: Settings, threshold: Optional[float]) -> None:
        """New checked settings (see :meth:`Engine.resolve`), from the next chunk on."""
        self.inbox.put(("set", (settings, threshold)))
        self.engine.wake.set()

    def end(self) -> None:
        self.inbox.put(("end", None))
        self.engine.wake.set()

    def close(self) -> None:
        """The client is gone: drop the stream without a final result."""
        self.inbox.put(("close", None))
        self.engine.wake.set()

    # ---------------------------------------------------------------- worker side
    @property
    def chunks_done(self) -> int:
        return len(self.live.chunk_exits)

    def take_in(self) -> None:
        while True:
            try:
                what, value = self.inbox.get_nowait()
            except queue.Empty:
                break
            if what == "audio" and not self.ended:
                self.fbank.accept_waveform(SAMPLE_RATE, value)
                self.samples += len(value)
            elif what == "set":
                self.settings, self.threshold = value
                self.live.threshold = self.threshold
            elif what == "end" and not self.ended:
                self.fbank.input_finished()
                self.ended = True
            elif what == "close":
                self.closed = True
        ready = self.fbank.num_frames_ready
        if ready > self.frames_read:
            new = torch.from_numpy(np.stack([self.fbank.get_frame(i) for i in range(self.frames_read, ready)]))
            self.fbank.pop(ready - self.frames_read)
            self.frames_read = ready
            self.feats = torch.cat([self.feats, new.float()])
            self.live.utt.feats = self.feats
        if self.ended and self.live.num_chunks == OPEN_ENDED:
            self.engine.decoder(self.settings.key).close(self.live)

    def ready(self) -> bool:
        """Whether the next chunk can run: its frames (with the look-ahead) are in, or the stream has ended."""
        enc = self.engine.decoder(self.settings.key).enc
        k = self.chunks_done
        if self.ended:
            return k < self.live.num_chunks
        return self.feats.shape[0] >= k * enc.shift + enc.input_frames

    def finished(self) -> bool:
        return self.ended and self.chunks_done >= self.live.num_chunks

    def after_chunk(self, dec: StreamingDecoder) -> None:
        """Publishes what the chunk just run changed, and ends the utterance at a pause."""
        k = self.chunks_done
        self.total_chunks += 1
        spent = self.live.macs - self.seg_macs
        self.seg_macs = self.live.macs
        self.total_macs += spent
        tokens = dec.tokens(self.live)
        if len(tokens) != self._tokens:
            self._tokens, self._pause = len(tokens), 0.0
        else:
            self._pause += self.engine.chunk_seconds
        # the last sample the chunk's frames needed (frame j's 25 ms window ends 17.5 ms after j * 10 ms + 10 ms)
        last_frame = self.seg_start + (k - 1) * dec.enc.shift + dec.enc.input_frames - 1
        heard = min(self.samples, last_frame * 160 + 280)
        budget = self.settings.budget
        self.publish(dict(type="partial", segment=self.segment, chunk=k - 1, exit=self.live.chunk_exits[-1],
                          text=self._text(tokens), heard_samples=heard, threshold=self.threshold,
                          macs_per_second=self.total_macs / (self.total_chunks * self.engine.chunk_seconds),
                          budget_macs_per_second=None if budget is None else budget * self.engine.full_cost))
        if self.settings.endpoint and k < self.live.num_chunks:  # the audio's own pauses, however fast it came
            limit = self.engine.endpoint_seconds if tokens else self.engine.idle_seconds
            if self._pause >= limit:
                self.finish(dec, last=False)

    def finish(self, dec: StreamingDecoder, last: bool = True) -> None:
        """Publishes the utterance's final result; then the stream ends (``last``) or starts the next one."""
        exits = list(self.live.chunk_exits)
        seconds = len(exits) * self.engine.chunk_seconds
        self.publish(dict(type="final", segment=self.segment, text=self._text(dec.tokens(self.live)),
                          chunk_exits=exits, audio_seconds=seconds,
                          macs_per_second=self.live.macs / seconds if seconds else 0.0, last=last))
        if last:
            self.closed = True
        else:
            self._new_segment(len(exits) * dec.enc.shift)

    def fail(self, message: str) -> None:
        self.publish(dict(type="error", message=message))
        self.closed = True

    def _text(self, tokens: List[int]) -> str:
        return " ".join(self.engine.tokenizer.decode(tokens).split()) if tokens else ""

    def _new_segment(self, consumed: int) -> None:
        """A fresh utterance from frame ``consumed`` of the current one on."""
        dec = self.engine.decoder(self.settings.key)
        self.feats = self.feats[consumed:]
        self.seg_start = self.frames_read - self.feats.shape[0]
        self.segment += 1
        self.live = dec.open(Utterance(f"{self.name}-{self.segment}", self.feats))
        self.live.threshold = self.threshold
        self.state = dec.enc.init_state(1)
        self.seg_macs = 0.0
        self._tokens, self._pause = 0, 0.0
        if self.ended:
            dec.close(self.live)

