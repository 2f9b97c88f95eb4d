#!/usr/bin/env python3
"""Decode the test sets of a recipe as live streams: features chunk by chunk, many streams batched, cached
states per layer and per branch, at one exit, at every exit, or at an exit chosen per chunk.

    ./splitformer/streaming_decode.py --exp-dir exp/splitformer-cpu-causal --epoch 12 --avg 4 \\
        --use-averaged-model --chunk-size 8 --left-context-frames 32 --exit-layer all
    ./splitformer/streaming_decode.py ... --exit-strategy confidence --exit-threshold 0.9   # per chunk
    ./splitformer/streaming_decode.py ... --exit-strategy confidence --exit-budget-macs 50e6   # threshold from dev

The model must be causal (``train.py --causal true``). ``--chunk-size`` and ``--left-context-frames`` are in
frames after the front end (20 ms each with a conv2d front end, 40 ms with conv1d). The words equal
``decode.py --chunk-size C --left-context-frames L`` (the masked whole-utterance computation) at every fixed
exit; a per-chunk dynamic run equals the masked computation with its chunks' exits.

Results go where decode.py puts them (``<exp-dir>/<decoding-method>/``, tags with ``streaming-chunk-C-left-L``),
so compare.py tables them beside the offline runs. Compute is counted per chunk: the front end, the blocks a
chunk ran (attending to a full left context) and, with an exit strategy, the criterion at each exit where it
was scored; MACs per second of audio in the results are these.
"""
import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from splitformer.decoding.cli import (add_checkpoint_arguments, add_chunk_arguments, add_data_arguments,
                                      add_exit_arguments, add_search_arguments, run_main)
from splitformer.decoding.exits import parse_threshold, pick_under_budget
from splitformer.decoding.loading import (DecodeSetupError, apply_chunking, load_model, load_tokenizer, test_cuts,
                                         test_sets)
from splitformer.decoding.results import fmt_macs, run_tag, update_results_json, write_run
from splitformer.decoding.runner import default_scorer
from splitformer.decoding.streaming import (ChunkCosts, ChunkExitRule, StreamingDecoder, budget_curve, chunk_costs,
                                            cut_utterances, stream_words)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    add_search_arguments(p)
    add_exit_arguments(p, per="chunk")
    add_chunk_arguments(p, streaming=True)
    add_data_arguments(p)
    p.add_argument("--exit-budget-fraction", type=float, default=None,
                   help="a budget as a fraction of the last exit's MACs per second (0.5: half its compute); "
                        "instead of --exit-budget-macs")
    p.add_argument("--max-streams", type=int, default=64, help="streams decoded side by side in one batch")
    p.add_argument("--budget-thresholds", type=int, default=12,
                   help="with a budget: how many thresholds are tried on --budget-set (each a full streaming decode)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("streaming_decode.py", get_parser(), _run, argv)


def _rule(model, args: argparse.Namespace, threshold: float) -> ChunkExitRule:
    try:
        return ChunkExitRule(model, args.exit_strategy, threshold, args.exit_scorer or default_scorer(model),
                             args.exit_nbest)
    except ValueError as e:
        raise DecodeSetupError(str(e)) from None


def _decoder(model, args: argparse.Namespace, exit_layer, rule: Optional[ChunkExitRule],
             costs: Optional[ChunkCosts] = None) -> StreamingDecoder:
    """A decoder of this run's chunking and search; ``costs`` are counted when not given (one count serves every
    decoder of a run: thresholds do not change what a criterion costs, and fixed exits ignore it)."""
    try:
        dec = StreamingDecoder(model, args.chunk_size, args.left_context_frames, args.decoding_method,
                               args.beam_size, exit_layer, rule, args.max_streams)
    except ValueError as e:
        raise DecodeSetupError(str(e)) from None
    dec.costs = costs if costs is not None else chunk_costs(dec.enc, rule, dec.search)
    return dec


def _check(args: argparse.Namespace, model) -> None:
    if args.chunk_size <= 0 or args.left_context_frames <= 0:
        raise DecodeSetupError("streaming needs --chunk-size > 0 and --left-context-frames > 0 (decode.py decodes "
                               "whole utterances)")
    if args.max_streams < 1:
        raise DecodeSetupError(f"--max-streams must be >= 1, got {args.max_streams}")
    if args.device != "cpu":
        raise DecodeSetupError(f"streaming decode runs on the CPU (an edge device's stream); got --device "
                               f"{args.device}. decode.py --chunk-size C --left-context-frames L decodes the same "
                               "chunking, whole utterances at a time, on any device")
    if args.exit_threshold is not None:
        try:
            parse_threshold(args.exit_threshold)
        except ValueError:
            raise DecodeSetupError(f"--exit-threshold must be a number or 'inf' per chunk, got "
                                   f"{args.exit_threshold!r} (for a curve, give --exit-budget-macs or "
                                   "--exit-budget-fraction, or run several thresholds)") from None
    if args.exit_layer not in (None, "all"):
        try:
            layer = int(args.exit_layer)
        except ValueError:
            raise DecodeSetupError(f"--exit-layer must be an integer or 'all', got {args.exit_layer!r}") from None
        if layer not in model.exits:
            raise DecodeSetupError(f"no exit after layer {layer}; valid exits: {', '.join(map(str, model.exits))}")
    dynamic = args.exit_strategy != "fixed"
    given = [f for f in ("exit_threshold", "exit_budget_macs", "exit_budget_fraction") if getattr(args, f) is not None]
    if dynamic and args.exit_layer is not None:
        raise DecodeSetupError(f"--exit-strategy {args.exit_strategy} chooses the exit per chunk; drop --exit-layer")
    if dynamic and len(given) != 1:
        raise DecodeSetupError(f"--exit-strategy {args.exit_strategy} needs one of --exit-threshold T, "
                               "--exit-budget-macs M or --exit-budget-fraction F")
    if not dynamic and given:
        raise DecodeSetupError("--exit-threshold and the budgets need --exit-strategy entropy|confidence|posterior")
    for f in ("exit_budget_macs", "exit_budget_fraction"):
        if getattr(args, f) is not None and not getattr(args, f) > 0:
            raise DecodeSetupError(f"--{f.replace('_', '-')} must be positive, got {getattr(args, f)}")
    if args.exit_nbest < 1:
        raise DecodeSetupError(f"--exit-nbest must be >= 1, got {args.exit_nbest}")


def _run(args: argparse.Namespace) -> int:
    from splitformer.summary import count_params

    model, margs = load_model(args)
    _check(args, model)
    chunking = apply_chunking(model, margs, args, streaming=True)
    model.to(torch.device(args.device))
    bpe = args.bpe_model or Path(f"data/lang_bpe_{margs.vocab_size}/bpe.model")
    tokenizer = load_tokenizer(bpe)
    out_dir = args.exp_dir / args.decoding_method
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(exp_dir=str(args.exp_dir), preset=getattr(margs, "preset", None), method=args.decoding_method,
                  beam=args.beam_size, epoch=args.epoch, iter=args.iter, avg=args.avg,
                  use_averaged_model=args.use_averaged_model, params=count_params(model), exits=model.exits,
                  scorer=args.exit_scorer or default_scorer(model), cost="front end + blocks run + criteria scored",
                  **chunking)
    dynamic = args.exit_strategy != "fixed"
    threshold = None if args.exit_threshold is None else parse_threshold(args.exit_threshold)
    budget_info: Dict = {}
    costs = _decoder(model, args, None, _rule(model, args, 0.0) if dynamic else None).costs
    if dynamic and args.exit_budget_fraction is not None:
        last = _fixed_macs(_decoder(model, args, None, None, costs),
                           test_cuts(args.manifest_dir, args.dataset, args.budget_set), len(model.exits) - 1)
        args.exit_budget_macs = args.exit_budget_fraction * last
        logging.info(f"budget: {args.exit_budget_fraction:g} of the last exit's {fmt_macs(last)} MACs/s on "
                     f"{args.budget_set} = {fmt_macs(args.exit_budget_macs)}")
    if dynamic and args.exit_budget_macs is not None:
        threshold, budget_info = choose_threshold(model, tokenizer, args, costs)
    for test_set in test_sets(args):
        cuts = test_cuts(args.manifest_dir, args.dataset, test_set)
        audio_s = float(sum(c.duration for c in cuts)) or math.nan
        rule = _rule(model, args, threshold) if dynamic else None
        exit_layer = None if dynamic else (args.exit_layer or str(model.exits[-1]))
        dec = _decoder(model, args, exit_layer if exit_layer == "all" or exit_layer is None else int(exit_layer), rule,
                       costs)
        results = dec.decode(cut_utterances(cuts), progress=_bar(len(cuts), f"{test_set} streaming"))
        json_path = out_dir / f"results-{test_set}.json"
        macs = sum(r.macs for r in results) / audio_s
        if dynamic:
            words = stream_words(results, tokenizer, 0)
            chunks = [e for r in results for e in r.chunk_exits]
            mean_exit = sum(chunks) / max(len(chunks), 1)
            part = (f"{args.exit_strategy}-{args.exit_threshold}" if not budget_info else
                    f"{args.exit_strategy}-budget-macs-{args.exit_budget_macs:g}")
            extra = dict(common, kind="dynamic" if not budget_info else "budget", per="chunk",
                         strategy=args.exit_strategy, threshold=threshold, mean_exit_layer=mean_exit,
                         exit_counts={str(e): chunks.count(e) for e in model.exits}, **budget_info)
            if budget_info:
                extra["achieved_cost"] = macs
            entry = write_run(out_dir, test_set, run_tag(args, part, streaming=True), words, dec.encoder_seconds,
                              dec.total_seconds, audio_s, macs, extra)
            update_results_json(json_path, entry)
            logging.info(f"{test_set} per-chunk {args.exit_strategy} T={threshold:.6g}: WER {entry['wer']:.2f}% "
                         f"mean exit {mean_exit:.2f} MACs/s {fmt_macs(macs)}")
            continue
        exits = model.exits if exit_layer == "all" else [int(exit_layer)]
        for e in exits:
            words = stream_words(results, tokenizer, e if exit_layer == "all" else 0)
            # charged as the dynamic runs are: every chunk each stream ran (the last one padded), over the audio
            e_macs = sum(len(r.chunk_exits) for r in results) * dec.costs.fixed(model.exits.index(e)) / audio_s
            enc_s, total_s = dec.exit_seconds[e] if exit_layer == "all" else (dec.encoder_seconds, dec.total_seconds)
            entry = write_run(out_dir, test_set, run_tag(args, str(e), streaming=True), words, enc_s, total_s,
                              audio_s, e_macs, dict(common, kind="fixed", exit_layer=e))
            update_results_json(json_path, entry)
            logging.info(f"{test_set} exit {e}: WER {entry['wer']:.2f}% MACs/s {fmt_macs(e_macs)} RTF encoder "
                         f"{entry['rtf_encoder']:.4f}, with search {entry['rtf_decode']:.4f}")
    logging.info(f"results in {out_dir}")
    return 0


def _fixed_macs(dec: StreamingDecoder, cuts, block: int) -> float:
    """MACs per second of audio of a fixed exit at ``block`` over ``cuts``, counted as the decodes count them:
    every chunk each stream runs, the last one padded."""
    chunks = sum(dec.num_chunks(c.num_frames) for c in cuts)
    return chunks * dec.costs.fixed(block) / (float(sum(c.duration for c in cuts)) or 1.0)


def choose_threshold(model, tokenizer, args: argparse.Namespace, costs: Optional[ChunkCosts] = None):
    """The threshold of ``--exit-strategy`` that meets ``--exit-budget-macs`` on ``--budget-set`` with the lowest
    WER, each candidate decoded there exactly as the test sets will be (per-chunk decisions, costs counted the
    same way). Candidates: quantiles of the chunks' scores in one all-exit pass."""
    cuts = test_cuts(args.manifest_dir, args.dataset, args.budget_set)
    rows = budget_curve(lambda layer, t: _decoder(model, args, layer, _rule(model, args, t), costs),
                        lambda: cut_utterances(cuts), float(sum(c.duration for c in cuts)), tokenizer,
                        args.exit_strategy, args.budget_thresholds,
                        bar=lambda desc: _bar(len(cuts), f"{args.budget_set} {desc}"))
    try:
        best = pick_under_budget(rows, args.exit_budget_macs)
    except ValueError as e:
        raise DecodeSetupError(f"--exit-budget-macs on {args.budget_set}: {e}") from None
    info = dict(budget_kind="macs", budget=args.exit_budget_macs, budget_set=args.budget_set, dev_wer=best["wer"],
                dev_cost=best["cost"],
                candidates=[dict(r, threshold=None if math.isinf(r["threshold"]) else r["threshold"]) for r in rows])
    logging.info(f"budget {args.exit_budget_macs:.6g} MACs/s: threshold {best['threshold']:.6g} "
                 f"({best['wer']:.2f}% at {fmt_macs(best['cost'])} on {args.budget_set})")
    return best["threshold"], info


def _bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="utt", leave=False, dynamic_ncols=True)
    return bar.update


if __name__ == "__main__":
    sys.exit(main())
