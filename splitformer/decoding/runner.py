"""Decoding loops: one exit, every exit in one encoder pass, or a dynamic exit per utterance.

Each loop returns per-utterance results and the seconds it spent, so that the caller can write
WER and real-time factors side by side. Times: ``encoder`` is the front end + encoder up to the
exit; ``decode`` adds the exit's heads and the search (data loading is not counted).
"""
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from splitformer.decoding import decision
from splitformer.decoding.exits import ExitReader, Traces
from splitformer.data.datamodule import input_lens
from splitformer.decoding.search import run_search, search, search_input

Result = Tuple[str, List[str], List[str]]


@dataclass
class ExitRun:
    """What decoding at one exit produced."""

    results: List[Result] = field(default_factory=list)
    encoder_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class DynamicRun:
    results: List[Result] = field(default_factory=list)
    exit_layers: List[int] = field(default_factory=list)  # per utterance
    durations: List[float] = field(default_factory=list)
    encoder_seconds: float = 0.0
    scorer_seconds: float = 0.0
    decode_seconds: float = 0.0


def batch_parts(batch: Dict, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, List[str], List[List[str]], List[float]]:
    """features, lens, ids, reference words, durations of a lhotse K2SpeechRecognitionDataset batch."""
    feats = batch["inputs"].to(device)
    sup = batch["supervisions"]
    lens = input_lens(sup).to(device)
    cuts = sup["cut"]
    ids = [c.id for c in cuts]
    refs = [t.split() for t in sup["text"]]
    durs = [float(c.duration) for c in cuts]
    return feats, lens, ids, refs, durs


def _clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _words(tokenizer, hyps) -> List[List[str]]:
    return [tokenizer.decode(h.tokens).split() if h.tokens else [] for h in hyps]


def _bar(loader: Iterable, desc: Optional[str]):
    """A progress bar over the batches; ``desc=None`` turns it off (e.g. under ``--progress-bar false``)."""
    if desc is None:
        return loader
    return tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


@torch.no_grad()
def decode_exit(model, loader, tokenizer, exit_layer: int, method: str, beam: int, device: torch.device,
                desc: Optional[str] = "") -> ExitRun:
    """Decodes with one exit; the encoder stops there."""
    run = ExitRun()
    for batch in _bar(loader, None if desc is None else (desc or f"exit {exit_layer}")):
        feats, lens, ids, refs, _ = batch_parts(batch, device)
        t0 = _clock(device)
        enc, enc_lens = model.encode(feats, lens, exit_layer=exit_layer)
        t1 = _clock(device)
        hyps = run_search(model, method, enc, enc_lens, exit_layer, beam)
        t2 = _clock(device)
        run.encoder_seconds += t1 - t0
        run.decode_seconds += t2 - t0
        run.results.extend(zip(ids, refs, _words(tokenizer, hyps)))
    return run


def default_scorer(model) -> str:
    """The CTC heads when the model has them (cheap), else the transducer."""
    return "ctc" if model.use_ctc else "transducer"


@dataclass
class BatchClimb:
    """One batch's climb: per utterance the exit index it stopped at and its words there (``words[i][k]``: at
    every exit when every exit was read), its scores (``scores[s][i, k]``, NaN where not read) and the seconds
    spent at each exit by the encoder, the scorer and the search."""

    stop_index: np.ndarray
    words: List[Dict[int, List[str]]]
    scores: Dict[str, np.ndarray]
    encoder_seconds: np.ndarray
    scorer_seconds: np.ndarray
    search_seconds: np.ndarray


@torch.no_grad()
def climb_batch(model, feats: torch.Tensor, lens: torch.Tensor, tokenizer, reader: ExitReader, method: str,
                beam: int, device: torch.device, rule: Optional[Tuple[str, float]] = None) -> BatchClimb:
    """Climbs the exits with a whole batch. With ``rule`` (strategy, threshold) each utterance stops at the first
    exit whose score passes, and leaves the batch: the rest climb on, and no layer runs for an utterance that
    has stopped. Without it, every utterance reads every exit (the all-exit pass that sweeps and budgets are
    simulated from). The last exit is never scored. Where the scoring pass is the search
    (:meth:`ExitReader.gives_hyps`) the words come from it. Otherwise, climbing with a rule, what the search reads
    at each stopping exit is kept and one search runs over all of them at the end (its frame loop once per
    batch, not once per exit); reading every exit, each exit is searched on its own, so that the time measured
    per exit is what a climb pays for the utterances that stop there (one search over the batch)."""
    exits = model.exits
    B, E = feats.size(0), len(exits)
    scores = {s: np.full((B, max(E - 1, 0)), np.nan) for s in reader.strategies}
    times = np.zeros((3, E))
    stop_index = np.full(B, E - 1, dtype=np.int64)
    words: List[Dict[int, List[str]]] = [{} for _ in range(B)]
    pending: List[Tuple[int, np.ndarray, torch.Tensor, torch.Tensor]] = []  # (exit index, rows, input, lens)
    active = np.arange(B)
    gen = model.climb(feats, lens)
    keep = None
    t = _clock(device)
    for k in range(E):
        exit_layer, enc, enc_lens = next(gen) if keep is None else gen.send(keep)
        times[0, k] = _clock(device) - t
        last = k == E - 1
        hyps = None
        stop = np.ones(len(active), dtype=bool)
        if not last and reader.strategies:
            t = _clock(device)
            read, hyps = reader.read(model, enc, enc_lens, exit_layer)
            times[1, k] = _clock(device) - t
            for s, v in read.items():
                scores[s][active, k] = v
            stop = decision.stops(rule[0], read[rule[0]], rule[1]) if rule else np.zeros(len(active), dtype=bool)
        want = np.flatnonzero(np.ones(len(active), dtype=bool) if rule is None else stop)
        if hyps is not None:
            for r in want.tolist():
                words[active[r]][k] = _words(tokenizer, [hyps[r]])[0]
        elif len(want) and rule is None:  # every exit searched on its own: the cost a climb pays per exit
            t = _clock(device)
            for r, h in zip(active[want].tolist(), _words(tokenizer, run_search(model, method, enc, enc_lens,
                                                                                 exit_layer, beam))):
                words[r][k] = h
            times[2, k] = _clock(device) - t
        elif len(want):
            t = _clock(device)
            rows = torch.from_numpy(want).to(enc.device)
            sub_lens = enc_lens[rows]
            x = search_input(model, method, enc[rows, : int(sub_lens.max())], exit_layer)
            times[2, k] = _clock(device) - t
            pending.append((k, active[want], x, sub_lens))
        if rule is not None:
            stop_index[active[stop]] = k
            active = active[~stop]
        if last or len(active) == 0:
            break
        keep = None if rule is None else torch.from_numpy(np.flatnonzero(~stop)).to(enc.device)
        t = _clock(device)
    gen.close()
    if pending:
        t = _clock(device)
        x = pad_sequence([row for *_, inp, _ in pending for row in inp], batch_first=True)
        hyps = search(model, method, x, torch.cat([l for *_, l in pending]), beam)
        spent = _clock(device) - t
        frames = np.array([float(l.sum()) for *_, l in pending])
        at = 0
        for (k, rows, _, _), f in zip(pending, frames):
            times[2, k] += spent * f / max(frames.sum(), 1.0)
            for r, h in zip(rows.tolist(), _words(tokenizer, hyps[at:at + len(rows)])):
                words[r][k] = h
            at += len(rows)
    return BatchClimb(stop_index, words, scores, *times)


def _share(seconds: np.ndarray, durations: Sequence[float], present: np.ndarray) -> np.ndarray:
    """(N, E) time per utterance: each exit's batch time split over the utterances present there by duration."""
    d = np.asarray(durations, dtype=np.float64)[:, None] * present
    return seconds[None, :] * d / np.maximum(d.sum(0, keepdims=True), 1e-12)


@torch.no_grad()
def decode_all_exits(
    model, loader, tokenizer, method: str, beam: int, device: torch.device, desc: Optional[str] = "all exits",
    reader: Optional[ExitReader] = None,
) -> Tuple[Dict[int, ExitRun], Traces]:
    """Runs the encoder once per batch up to the top, decoding every exit on the way.

    The encoder time of exit k is the time the encoder took to reach it; its decode time adds that
    exit's search only. Also returns the :class:`Traces` (every exit's words, and the scores of ``reader``'s
    criteria at every exit but the last) from which dynamic exits are simulated; ``reader=None`` scores
    nothing (the posterior's beam search and the transducer scorer cost more than the decoding itself).
    """
    from splitformer.decoding.results import word_errors

    exits = model.exits
    reader = reader or ExitReader((), method=method, beam=beam)
    runs = {e: ExitRun() for e in exits}
    parts: Dict[str, list] = {k: [] for k in ("ids", "refs", "durs", "hyps", "enc", "scr", "srch")}
    scores: Dict[str, list] = {s: [] for s in reader.strategies}
    for batch in _bar(loader, desc):
        feats, lens, ids, refs, durs = batch_parts(batch, device)
        c = climb_batch(model, feats, lens, tokenizer, reader, method, beam, device)
        enc_cum = np.cumsum(c.encoder_seconds)
        for k, e in enumerate(exits):
            runs[e].encoder_seconds += float(enc_cum[k])
            runs[e].decode_seconds += float(enc_cum[k] + c.search_seconds[k] + (c.scorer_seconds[k] if reader.gives_hyps() else 0.0))
            runs[e].results.extend((i, r, w[k]) for i, r, w in zip(ids, refs, c.words))
        present = np.ones((len(ids), len(exits)))
        parts["ids"] += ids
        parts["refs"] += refs
        parts["durs"] += durs
        parts["hyps"] += [[w[k] for k in range(len(exits))] for w in c.words]
        for key, sec in (("enc", c.encoder_seconds), ("scr", c.scorer_seconds), ("srch", c.search_seconds)):
            parts[key].append(_share(sec, durs, present))
        for s in reader.strategies:
            scores[s].append(c.scores[s])
    E = len(exits)
    stack = (lambda xs: np.concatenate(xs) if xs else np.zeros((0, E)))
    errors = np.array([[word_errors(r, h[k]) for k in range(E)] for r, h in zip(parts["refs"], parts["hyps"])],
                      dtype=np.int64).reshape(-1, E)
    traces = Traces(parts["ids"], parts["refs"], parts["hyps"], np.asarray(parts["durs"], dtype=np.float64), errors,
                    np.array([len(r) for r in parts["refs"]], dtype=np.int64),
                    {s: (np.concatenate(v) if v else np.zeros((0, E - 1))) for s, v in scores.items()},
                    stack(parts["enc"]), stack(parts["scr"]), stack(parts["srch"]))
    return runs, traces


@torch.no_grad()
def greedy_every_exit(model, loader, tokenizer, device: torch.device) -> Dict[int, List[Result]]:
    """Greedy results at every exit (the words of :func:`decode_all_exits`, without its per-exit timing)."""
    out: Dict[int, List[Result]] = {e: [] for e in model.exits}
    for batch in loader:
        feats, lens, ids, refs, _ = batch_parts(batch, device)
        for e, words in greedy_exit_words(model, model.encode_exits(feats, lens), tokenizer).items():
            out[e].extend(zip(ids, refs, words))
    return out


@torch.no_grad()
def greedy_exit_words(model, exits: Sequence[Tuple[int, torch.Tensor, torch.Tensor]], tokenizer
                      ) -> Dict[int, List[List[str]]]:
    """Greedy words of every exit output ``(exit layer, out, lens)`` already computed (training reuses its dev
    loss pass). Exits of one shape (every exit of an early-exit stack) are searched as one batch, so that the
    search's loop over frames runs once, not once per exit."""
    from splitformer.decoding.search import ctc_greedy_search, greedy_search
    from splitformer.model.asr_model import stack_groups

    out: Dict[int, List[List[str]]] = {}
    wide = (torch.float32, torch.float64)  # an autocast pass's half-precision outputs are searched in float32
    for group in stack_groups([(e, o if o.dtype in wide else o.float(), l) for e, o, l in exits]):
        b = group[0][1].size(0)
        lens = group[0][2].repeat(len(group))
        if model.use_transducer:
            hyps = greedy_search(model, torch.cat([model.project_encoder(o, e) for e, o, _ in group]), lens)
        else:
            hyps = ctc_greedy_search(torch.cat([model.ctc_log_probs(o, e) for e, o, _ in group]), lens, model.blank_id)
        words = _words(tokenizer, hyps)
        for k, (e, _, _) in enumerate(group):
            out[e] = words[k * b:(k + 1) * b]
    return out


@torch.no_grad()
def decode_dynamic(
    model, loader, tokenizer, strategy: str, threshold: float, method: str, beam: int, device: torch.device,
    desc: Optional[str] = "dynamic exits", reader: Optional[ExitReader] = None, one_at_a_time: bool = False,
) -> DynamicRun:
    """Climbs the exits batch by batch and stops each utterance at the first exit whose score passes the
    criterion (:func:`climb_batch`): utterances that stop leave the batch and the rest climb on, so the layers
    above an utterance's exit never run for it. ``one_at_a_time``: batches of one (what the batched climb is
    measured against; the same words)."""
    reader = reader or ExitReader((strategy,), default_scorer(model), method=method, beam=beam)
    if reader.strategies != (strategy,):
        raise ValueError(f"the reader scores {reader.strategies}, the rule reads {strategy!r}")
    run = DynamicRun()
    exits = model.exits
    for batch in _bar(loader, desc):
        feats, lens, ids, refs, durs = batch_parts(batch, device)
        pieces = [(feats[i:i + 1, : int(lens[i])], lens[i:i + 1], [i]) for i in range(feats.size(0))] \
            if one_at_a_time else [(feats, lens, list(range(feats.size(0))))]
        for x, x_lens, rows in pieces:
            t0 = _clock(device)
            c = climb_batch(model, x, x_lens, tokenizer, reader, method, beam, device, rule=(strategy, threshold))
            run.decode_seconds += _clock(device) - t0
            run.encoder_seconds += float(c.encoder_seconds.sum())
            run.scorer_seconds += float(c.scorer_seconds.sum())
            for j, r in enumerate(rows):
                k = int(c.stop_index[j])
                run.results.append((ids[r], refs[r], c.words[j][k]))
                run.exit_layers.append(exits[k])
                run.durations.append(durs[r])
    return run
