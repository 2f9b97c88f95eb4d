#!/usr/bin/env python3
"""Decode the test sets of a recipe with a trained model, at one exit, at every exit, or with a
dynamic exit chosen per utterance.

    ./splitformer/decode.py --exp-dir exp/splitformer-cpu --epoch 30 --avg 5 --exit-layer all \\
        --decoding-method greedy_search
    ./splitformer/decode.py --exp-dir exp/splitformer-cpu --epoch 30 --avg 5 --exit-layer 6 \\
        --decoding-method modified_beam_search --beam-size 4
    ./splitformer/decode.py ... --exit-strategy entropy --exit-threshold 0.5
    ./splitformer/decode.py ... --exit-threshold sweep      # WER-vs-compute curves of every criterion
    ./splitformer/decode.py ... --exit-strategy posterior --exit-budget-macs 60e6   # or --exit-budget-rtf 0.005

A compute budget picks, on ``--budget-set`` (dev), the threshold whose mean encoder cost meets it with the
lowest WER, then decodes each test set with that threshold and reports the cost reached there.

Writes into ``<exp-dir>/<decoding-method>/``: ``recogs-<set>-<tag>.txt``, ``errs-<set>-<tag>.txt``,
``wer-summary-<set>-<tag>.txt`` (WER, real-time factors, encoder MACs per second of audio) and
``results-<set>.json`` (every run so far, read by compare.py); sweeps add
``dynamic-sweep-<set>-<tag>.tsv``.
"""
import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from splitformer.decoding.cli import (add_checkpoint_arguments, add_chunk_arguments, add_data_arguments,
                                      add_exit_arguments, add_search_arguments, run_main)
from splitformer.decoding.exits import SCORED, parse_threshold, pick_under_budget, simulate, sweep_thresholds
from splitformer.decoding.loading import (DecodeSetupError, apply_chunking, load_model, load_tokenizer, test_loader,
                                         test_sets)
from splitformer.decoding.results import fmt_macs, mean_seconds, run_tag, update_results_json, word_error_rate, write_run
from splitformer.decoding.runner import decode_all_exits, decode_dynamic, decode_exit, default_scorer
from splitformer.decoding.search import CTC_METHODS


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    add_search_arguments(p)
    add_exit_arguments(p, per="utterance")
    add_chunk_arguments(p, streaming=False)
    add_data_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("decode.py", get_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from splitformer.summary import count_params, exit_macs

    device = torch.device(args.device)
    model, margs = load_model(args)
    chunking = apply_chunking(model, margs, args)
    exits = model.exits
    sweep = args.exit_threshold is not None and args.exit_threshold.strip().lower() == "sweep"
    dynamic = args.exit_strategy != "fixed"
    if args.exit_layer not in (None, "all"):
        try:
            layer = int(args.exit_layer)
        except ValueError:
            raise DecodeSetupError(f"--exit-layer must be an integer or 'all', got {args.exit_layer!r}") from None
        if layer not in exits:
            raise DecodeSetupError(f"no exit after layer {layer}; valid exits: {', '.join(map(str, exits))} (or 'all')")
    if args.decoding_method in CTC_METHODS and not model.use_ctc:
        raise DecodeSetupError(f"{args.decoding_method} needs a CTC head, but this model was trained without one")
    if args.decoding_method not in CTC_METHODS and not model.use_transducer:
        raise DecodeSetupError(f"{args.decoding_method} needs the transducer, but this model is CTC-only; use a ctc_* method")
    if dynamic and args.exit_layer is not None:
        raise DecodeSetupError(f"--exit-strategy {args.exit_strategy} chooses the exit per utterance; drop --exit-layer")
    if args.exit_threshold is not None and not sweep and not dynamic:
        raise DecodeSetupError("--exit-threshold needs --exit-strategy entropy|confidence|posterior (or use --exit-threshold sweep)")
    budget = _budget(args)
    if budget is not None:
        if args.exit_strategy not in SCORED:
            raise DecodeSetupError(f"a compute budget needs --exit-strategy {'|'.join(SCORED)} (the criterion whose threshold it picks)")
        if args.exit_threshold is not None or args.exit_layer is not None:
            raise DecodeSetupError("a compute budget chooses the threshold itself: drop --exit-threshold and --exit-layer")
    elif dynamic and not sweep:
        if args.exit_threshold is None:
            raise DecodeSetupError(f"--exit-strategy {args.exit_strategy} needs --exit-threshold T, 'sweep', "
                                   "or a budget (--exit-budget-macs / --exit-budget-rtf)")
        threshold = parse_threshold(args.exit_threshold)
    if args.exit_scorer == "ctc" and not model.use_ctc:
        raise DecodeSetupError("--exit-scorer ctc reads the CTC heads, but this model has none; use --exit-scorer transducer")
    if args.exit_scorer == "transducer" and not model.use_transducer:
        raise DecodeSetupError("--exit-scorer transducer needs the transducer, but this model is CTC-only")
    if args.exit_nbest < 1:
        raise DecodeSetupError(f"--exit-nbest must be >= 1, got {args.exit_nbest}")

    sets = test_sets(args)
    bpe = args.bpe_model or Path(f"data/lang_bpe_{margs.vocab_size}/bpe.model")
    tokenizer = load_tokenizer(bpe)
    out_dir = args.exp_dir / args.decoding_method
    out_dir.mkdir(parents=True, exist_ok=True)
    params = count_params(model)
    common = dict(exp_dir=str(args.exp_dir), preset=getattr(margs, "preset", None), method=args.decoding_method,
                  beam=args.beam_size, epoch=args.epoch, iter=args.iter, avg=args.avg, use_averaged_model=args.use_averaged_model,
                  params=params, exits=exits, scorer=args.exit_scorer or default_scorer(model), **chunking)

    # MACs per exit (counted on CPU, at each set's mean utterance length) before moving to the device.
    prepared = []
    for test_set in sets:
        loader, cuts = test_loader(args.manifest_dir, args.dataset, test_set, args.max_duration, model.input_kind)
        audio_s = float(sum(c.duration for c in cuts))
        ref_seconds = mean_seconds(cuts)
        prepared.append((test_set, loader, audio_s, ref_seconds, exit_macs(model, seconds=ref_seconds)))
    budget_info: Dict = {}
    if budget is not None:
        loader, cuts = test_loader(args.manifest_dir, args.dataset, args.budget_set, args.max_duration,
                                   model.input_kind)
        dev_macs = exit_macs(model, seconds=mean_seconds(cuts))
        model.to(device)
        threshold, budget_info = choose_budget_threshold(model, tokenizer, loader, cuts, args, device, budget, dev_macs)
    model.to(device)

    for test_set, loader, audio_s, ref_seconds, macs in prepared:
        json_path = out_dir / f"results-{test_set}.json"
        if sweep or args.exit_layer == "all":
            runs, traces = decode_all_exits(model, loader, tokenizer, args.decoding_method, args.beam_size, device,
                                            desc=f"{test_set} all exits", nbest=args.exit_nbest, scorer=args.exit_scorer,
                                            strategies=SCORED if sweep else ())
            rows = []
            for e, run in runs.items():
                tag = run_tag(args, str(e))
                entry = write_run(out_dir, test_set, tag, run.results, run.encoder_seconds, run.decode_seconds,
                                    audio_s, macs[e], dict(common, kind="fixed", exit_layer=e, macs_seconds=ref_seconds,
                                                           from_sweep=True))
                update_results_json(json_path, entry)
                rows.append((tag, entry))
                logging.info(f"{test_set} exit {e}: WER {entry['wer']:.2f}% RTF enc {entry['rtf_encoder']:.4f} "
                             f"dec {entry['rtf_decode']:.4f} MACs/s {fmt_macs(macs[e])}")
            all_tag = run_tag(args, "all")
            with open(out_dir / f"wer-summary-{test_set}-{all_tag}.txt", "w") as f:
                f.write("settings\texit\tWER\tRTF-encoder\tRTF-decode\tencoder-MACs-per-s\n")
                for tag, en in rows:
                    f.write(f"{tag}\t{en['exit_layer']}\t{en['wer']:.2f}\t{en['rtf_encoder']:.4f}\t"
                            f"{en['rtf_decode']:.4f}\t{fmt_macs(en['macs_per_second'])}\n")
            if sweep:
                _write_sweep(out_dir, test_set, args, traces, exits, macs, json_path, common)
        elif dynamic:
            run = decode_dynamic(model, loader, tokenizer, args.exit_strategy, threshold, args.decoding_method,
                                 args.beam_size, device, desc=f"{test_set} {args.exit_strategy}", nbest=args.exit_nbest,
                                 scorer=args.exit_scorer)
            if budget is None:
                tag = run_tag(args, f"{args.exit_strategy}-{args.exit_threshold}")
            else:
                tag = run_tag(args, f"{args.exit_strategy}-budget-{budget[0]}-{budget[1]:g}")
            used = sum(macs[e] * d for e, d in zip(run.exit_layers, run.durations))
            mean_macs = used / audio_s if audio_s else 0.0
            mean_exit = sum(run.exit_layers) / max(len(run.exit_layers), 1)
            extra = dict(common, kind="dynamic", strategy=args.exit_strategy, threshold=threshold,
                         mean_exit_layer=mean_exit, macs_seconds=ref_seconds,
                         exit_counts={str(e): run.exit_layers.count(e) for e in exits})
            if budget is not None:
                achieved = mean_macs if budget[0] == "macs" else (run.encoder_seconds / audio_s if audio_s else math.nan)
                extra.update(budget_info)
                extra.update(kind="budget", achieved_cost=achieved)
            entry = write_run(out_dir, test_set, tag, run.results, run.encoder_seconds, run.decode_seconds, audio_s,
                                mean_macs, extra)
            if budget is not None:
                logging.info(f"{test_set}: budget {budget[0]} {budget[1]:.6g} -> threshold {threshold:.6g} "
                             f"(dev WER {budget_info['dev_wer']:.2f}% at cost {budget_info['dev_cost']:.6g}); "
                             f"reached {achieved:.6g} on {test_set}")
            with open(out_dir / f"wer-summary-{test_set}-{tag}.txt", "a") as f:
                f.write(f"# mean exit layer {mean_exit:.2f}; exits used: {entry['exit_counts']}\n")
            update_results_json(json_path, entry)
            logging.info(f"{test_set} {args.exit_strategy} T={threshold}: WER {entry['wer']:.2f}% mean exit "
                         f"{mean_exit:.2f} mean MACs/s {fmt_macs(mean_macs)}")
        else:
            e = exits[-1] if args.exit_layer is None else int(args.exit_layer)
            run = decode_exit(model, loader, tokenizer, e, args.decoding_method, args.beam_size, device,
                              desc=f"{test_set} exit {e}")
            tag = run_tag(args, str(e))
            entry = write_run(out_dir, test_set, tag, run.results, run.encoder_seconds, run.decode_seconds, audio_s,
                                macs[e], dict(common, kind="fixed", exit_layer=e, macs_seconds=ref_seconds))
            update_results_json(json_path, entry)
            logging.info(f"{test_set} exit {e}: WER {entry['wer']:.2f}% RTF enc {entry['rtf_encoder']:.4f} "
                         f"dec {entry['rtf_decode']:.4f} MACs/s {fmt_macs(macs[e])}")
    logging.info(f"results in {out_dir}")
    return 0


def _budget(args: argparse.Namespace) -> Optional[Tuple[str, float]]:
    """("macs" | "rtf", value) from --exit-budget-macs / --exit-budget-rtf, or None."""
    given = [(k, v) for k, v in (("macs", args.exit_budget_macs), ("rtf", args.exit_budget_rtf)) if v is not None]
    if len(given) > 1:
        raise DecodeSetupError("give one budget: --exit-budget-macs or --exit-budget-rtf")
    if given and not given[0][1] > 0:
        raise DecodeSetupError(f"--exit-budget-{given[0][0]} must be positive, got {given[0][1]}")
    return given[0] if given else None


def choose_budget_threshold(model, tokenizer, loader, cuts, args, device, budget: Tuple[str, float],
                            macs: Dict[int, float]) -> Tuple[float, Dict]:
    """The threshold of ``args.exit_strategy`` that meets ``budget`` on the budget set with the lowest WER.

    One pass reads every exit of every utterance; each threshold's WER and mean cost are then simulated
    exactly (MACs counted per exit; RTF measured per exit on this pass, on this machine).
    """
    runs, traces = decode_all_exits(model, loader, tokenizer, args.decoding_method, args.beam_size, device,
                                    desc=f"{args.budget_set} all exits (budget)", nbest=args.exit_nbest,
                                    scorer=args.exit_scorer, strategies=(args.exit_strategy,))
    exits = model.exits
    audio_s = float(sum(c.duration for c in cuts)) or 1.0
    kind, value = budget
    costs = [macs[e] for e in exits] if kind == "macs" else [runs[e].encoder_seconds / audio_s for e in exits]
    rows = []
    for t in sweep_thresholds(traces, args.exit_strategy, points=64):
        results, stats = simulate(traces, args.exit_strategy, t, exits, costs)
        rows.append(dict(threshold=t, wer=word_error_rate(results)[0], cost=stats["macs_per_second"]))
    try:
        best = pick_under_budget(rows, value)
    except ValueError as e:
        raise DecodeSetupError(f"--exit-budget-{kind} on {args.budget_set}: {e}") from None
    info = dict(budget_kind=kind, budget=value, budget_set=args.budget_set, dev_wer=best["wer"], dev_cost=best["cost"],
                exit_costs={str(e): c for e, c in zip(exits, costs)})
    logging.info(f"budget {kind} {value:.6g}: {args.exit_strategy} threshold {best['threshold']:.6g} gives "
                 f"{best['wer']:.2f}% WER at cost {best['cost']:.6g} on {args.budget_set}")
    return best["threshold"], info


def _write_sweep(out_dir: Path, test_set: str, args, traces, exits, macs, json_path: Path, common: Dict) -> None:
    """WER against mean compute for every criterion, simulated exactly from the all-exit pass."""
    per_exit_macs = [macs[e] for e in exits]
    tag = run_tag(args, "sweep")
    curves: Dict[str, List[Dict]] = {}
    lines = ["strategy\tthreshold\tWER\tmean_exit_layer\tmean_MACs_per_s"]
    for strategy in SCORED:
        rows = []
        for t in sweep_thresholds(traces, strategy):
            results, stats = simulate(traces, strategy, t, exits, per_exit_macs)
            wer, _ = word_error_rate(results)
            rows.append(dict(threshold=t, wer=wer, **stats))
            lines.append(f"{strategy}\t{t:.6g}\t{wer:.2f}\t{stats['mean_exit_layer']:.3f}\t{stats['macs_per_second']:.0f}")
        curves[strategy] = rows
    (out_dir / f"dynamic-sweep-{test_set}-{tag}.tsv").write_text("\n".join(lines) + "\n")
    entry = dict(common, tag=tag, test_set=test_set, kind="dynamic-sweep",
                 curves={k: [dict(r, threshold=(None if math.isinf(r["threshold"]) else r["threshold"])) for r in v]
                         for k, v in curves.items()})
    update_results_json(json_path, entry)


if __name__ == "__main__":
    sys.exit(main())
