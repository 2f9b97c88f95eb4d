"""Decoding loops: one exit, every exit in one encoder pass, or a dynamic exit per utterance.

Each loop returns per-utterance results and the seconds it spent, so that the caller can write
WER and real-time factors side by side. Times: ``encoder`` is the front end + encoder up to the
exit; ``decode`` adds the exit's heads and the search (data loading is not counted).
"""
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from splitformer.decoding.exits import SCORED, UttTrace, iter_model_exits, model_exit_scores, stops
from splitformer.data.datamodule import input_lens
from splitformer.decoding.search import run_search

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
def decode_exit(model, loader, tokenizer, exit_layer: int, method: str, beam: int, device: torch.device, desc: str = "") -> ExitRun:
    """Decodes with one exit; the encoder stops there."""
    run = ExitRun()
    for batch in _bar(loader, desc or f"exit {exit_layer}"):
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


@torch.no_grad()
def decode_all_exits(
    model, loader, tokenizer, method: str, beam: int, device: torch.device, desc: Optional[str] = "all exits",
    nbest: int = 4, scorer: Optional[str] = None, strategies: Sequence[str] = SCORED,
) -> Tuple[Dict[int, ExitRun], List[UttTrace]]:
    """Runs the encoder once per batch up to the top, decoding every exit on the way.

    The encoder time of exit k is the time the encoder took to reach it; its decode time adds that
    exit's search only. Also returns, per utterance, every exit's hypothesis and its score under each
    of ``strategies`` as ``scorer`` reads them (default: the CTC heads when the model has them), from
    which dynamic exits are simulated. ``strategies=()`` skips the scoring (the posterior's beam search
    and the transducer scorer cost more than the decoding itself).
    """
    exits = model.exits
    scorer = scorer or default_scorer(model)
    runs = {e: ExitRun() for e in exits}
    traces: List[UttTrace] = []
    for batch in _bar(loader, desc):
        feats, lens, ids, refs, durs = batch_parts(batch, device)
        per_exit_words: List[List[List[str]]] = []
        scored: Dict[str, List[List[float]]] = {s: [] for s in strategies}
        enc_time = 0.0
        gen = iter_model_exits(model, feats, lens)
        while True:
            t0 = _clock(device)
            try:
                exit_layer, enc, enc_lens = next(gen)
            except StopIteration:
                break
            enc_time += _clock(device) - t0
            run = runs[exit_layer]
            t1 = _clock(device)
            hyps = run_search(model, method, enc, enc_lens, exit_layer, beam)
            run.encoder_seconds += enc_time
            run.decode_seconds += enc_time + _clock(device) - t1
            words = _words(tokenizer, hyps)
            run.results.extend(zip(ids, refs, words))
            per_exit_words.append(words)
            if strategies:
                for s, v in model_exit_scores(model, enc, enc_lens, exit_layer, scorer, nbest, strategies).items():
                    scored[s].append(v.tolist())
        for i, cut_id in enumerate(ids):
            traces.append(UttTrace(
                cut_id=cut_id, duration=durs[i], ref=refs[i],
                hyps=[w[i] for w in per_exit_words],
                **{s: [per_exit[i] for per_exit in v] for s, v in scored.items()},
            ))
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
    desc: Optional[str] = "dynamic exits", nbest: int = 4, scorer: Optional[str] = None,
) -> DynamicRun:
    """Per utterance (batch size 1, so that no layer runs for an utterance that has stopped):
    climb the exits, stop at the first whose CTC posteriors pass the criterion, decode there.
    The layers above that exit are never computed."""
    scorer = scorer or default_scorer(model)
    run = DynamicRun()
    last = model.exits[-1]
    for batch in _bar(loader, desc):
        feats, lens, ids, refs, durs = batch_parts(batch, device)
        for i in range(feats.size(0)):
            n = int(lens[i])
            x, x_lens = feats[i:i + 1, :n], lens[i:i + 1]
            t0 = _clock(device)
            enc_time = 0.0
            gen = iter_model_exits(model, x, x_lens)
            while True:
                t1 = _clock(device)
                exit_layer, enc, enc_lens = next(gen)
                enc_time += _clock(device) - t1
                if exit_layer == last:
                    break
                score = model_exit_scores(model, enc, enc_lens, exit_layer, scorer, nbest, strategies=(strategy,))
                if stops(strategy, float(score[strategy][0]), threshold):
                    break
            gen.close()  # the layers above are not computed
            hyps = run_search(model, method, enc, enc_lens, exit_layer, beam)
            run.decode_seconds += _clock(device) - t0
            run.encoder_seconds += enc_time
            run.results.append((ids[i], refs[i], _words(tokenizer, hyps)[0]))
            run.exit_layers.append(exit_layer)
            run.durations.append(durs[i])
    return run
