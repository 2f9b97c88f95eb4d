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

Dynamic exits decode batch by batch: utterances that stop leave the batch and the rest climb on. Their
costs count everything spent: MACs are the encoder's up to each utterance's exit plus the criterion's at every
exit it was scored at (the last exit is never scored); real-time factors are measured on the whole decode.

A compute budget picks, on ``--budget-set`` (dev, never a set being scored), the threshold whose mean cost
meets it with the lowest WER, simulated exactly from one pass over every exit; an RTF budget's choice is then
checked by decoding the budget set with it, as the test sets are decoded. The test sets are decoded with that
threshold and the cost reached there is reported.

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
from splitformer.decoding.exits import (SCORED, ExitReader, Traces, parse_threshold, pick_under_budget, reader_macs,
                                       sweep_thresholds)
from splitformer.decoding.loading import (DecodeSetupError, apply_chunking, load_model, load_tokenizer, test_loader,
                                         test_sets)
from splitformer.decoding.results import fmt_macs, mean_seconds, run_tag, update_results_json, write_run
from splitformer.decoding.runner import decode_all_exits, decode_dynamic, decode_exit, default_scorer
from splitformer.decoding.search import CTC_METHODS
from splitformer.utils import str2bool


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    add_search_arguments(p)
    add_exit_arguments(p, per="utterance")
    add_chunk_arguments(p, streaming=False)
    add_data_arguments(p)
    p.add_argument("--sort-by-duration", type=str2bool, default=False,
                   help="batch utterances of similar length (longest first): less padding, and a dynamic climb keeps "
                        "its batches whole for longer (bench/dynamic_climb.py --sort: 4.6x against 2.9x over one "
                        "utterance at a time); the words can differ from manifest order in the last float bits")
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
    if args.exit_nbest < 2 and (args.exit_strategy == "posterior" or sweep):
        raise DecodeSetupError(f"--exit-nbest {args.exit_nbest}: the posterior criterion normalises over the N-best, "
                               "and one hypothesis always has posterior 1; use --exit-nbest 2 or more")
    scorer = args.exit_scorer or default_scorer(model)

    def reader(strategies) -> ExitReader:
        return ExitReader(tuple(strategies), scorer, args.exit_nbest, args.decoding_method, args.beam_size,
                          args.exit_count_blank)

    sets = test_sets(args)
    if budget is not None and args.budget_set in sets:
        raise DecodeSetupError(f"--budget-set {args.budget_set} is also a set to decode: a threshold chosen on the "
                               f"set it is scored on says nothing; choose it on another set (dev), or drop "
                               f"{args.budget_set} from --test-sets")
    bpe = args.bpe_model or Path(f"data/lang_bpe_{margs.vocab_size}/bpe.model")
    tokenizer = load_tokenizer(bpe)
    out_dir = args.exp_dir / args.decoding_method
    out_dir.mkdir(parents=True, exist_ok=True)
    params = count_params(model)
    common = dict(exp_dir=str(args.exp_dir), preset=getattr(margs, "preset", None), method=args.decoding_method,
                  beam=args.beam_size, epoch=args.epoch, iter=args.iter, avg=args.avg, use_averaged_model=args.use_averaged_model,
                  params=params, exits=exits, scorer=scorer, **chunking)
    if dynamic or sweep:
        common.update(nbest=args.exit_nbest, count_blank=args.exit_count_blank)

    # MACs per exit (counted on CPU, at each set's mean utterance length) before moving to the device.
    prepared = []
    for test_set in sets:
        loader, cuts = test_loader(args.manifest_dir, args.dataset, test_set, args.max_duration, model.input_kind,
                                   sort_by_duration=args.sort_by_duration)
        audio_s = float(sum(c.duration for c in cuts))
        ref_seconds = mean_seconds(cuts)
        scored = SCORED if sweep else ((args.exit_strategy,) if dynamic else ())
        prepared.append((test_set, loader, audio_s, ref_seconds, exit_macs(model, seconds=ref_seconds),
                         {s: reader_macs(model, reader((s,)), ref_seconds) for s in scored}))
    budget_info: Dict = {}
    if budget is not None:
        loader, cuts = test_loader(args.manifest_dir, args.dataset, args.budget_set, args.max_duration,
                                   model.input_kind, sort_by_duration=args.sort_by_duration)
        dev_s = mean_seconds(cuts)
        dev_macs = exit_macs(model, seconds=dev_s)
        dev_scorer = reader_macs(model, reader((args.exit_strategy,)), dev_s)
        model.to(device)
        threshold, budget_info = choose_budget_threshold(model, tokenizer, loader, cuts, args, device, budget, dev_macs,
                                                         dev_scorer, reader((args.exit_strategy,)))
    model.to(device)

    for test_set, loader, audio_s, ref_seconds, macs, scorer_macs in prepared:
        json_path = out_dir / f"results-{test_set}.json"
        if sweep or args.exit_layer == "all":
            runs, traces = decode_all_exits(model, loader, tokenizer, args.decoding_method, args.beam_size, device,
                                            desc=f"{test_set} all exits", reader=reader(SCORED) if sweep else None)
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
                _write_sweep(out_dir, test_set, args, traces, exits, macs, json_path, common, scorer_macs)
        elif dynamic:
            run = decode_dynamic(model, loader, tokenizer, args.exit_strategy, threshold, args.decoding_method,
                                 args.beam_size, device, desc=f"{test_set} {args.exit_strategy}",
                                 reader=reader((args.exit_strategy,)))
            if budget is None:
                tag = run_tag(args, f"{args.exit_strategy}-{args.exit_threshold}")
            else:
                tag = run_tag(args, f"{args.exit_strategy}-budget-{budget[0]}-{budget[1]:g}")
            mean_macs, mean_enc_macs = dynamic_macs(run.exit_layers, run.durations, exits, macs,
                                                    scorer_macs[args.exit_strategy])
            mean_exit = sum(run.exit_layers) / max(len(run.exit_layers), 1)
            extra = dict(common, kind="dynamic", strategy=args.exit_strategy, threshold=threshold,
                         mean_exit_layer=mean_exit, macs_seconds=ref_seconds, encoder_macs_per_second=mean_enc_macs,
                         scorer_seconds=run.scorer_seconds, costs="encoder up to the exit + criterion at each exit scored",
                         exit_counts={str(e): run.exit_layers.count(e) for e in exits})
            if budget is not None:
                achieved = mean_macs if budget[0] == "macs" else (run.decode_seconds / audio_s if audio_s else math.nan)
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


def dynamic_macs(exit_layers: Sequence[int], durations: Sequence[float], exits: Sequence[int], macs: Dict[int, float],
                 scorer_macs: Dict[int, float]) -> Tuple[float, float]:
    """Mean MACs per second of audio of a dynamic decode: (everything: the encoder up to each utterance's exit
    and the criterion at every exit it was scored at; the encoder alone)."""
    total = enc = dur = 0.0
    for layer, d in zip(exit_layers, durations):
        k = exits.index(layer)
        scored = exits[: k + 1] if layer != exits[-1] else exits[:-1]
        enc += macs[layer] * d
        total += (macs[layer] + sum(scorer_macs[e] for e in scored)) * d
        dur += d
    return (total / dur, enc / dur) if dur > 0 else (0.0, 0.0)


def choose_budget_threshold(model, tokenizer, loader, cuts, args, device, budget: Tuple[str, float],
                            macs: Dict[int, float], scorer_macs: Dict[int, float], reader: ExitReader
                            ) -> Tuple[float, Dict]:
    """The threshold of ``args.exit_strategy`` that meets ``budget`` on the budget set with the lowest WER.

    One pass reads every exit of every utterance with the batched climb that decodes the test sets; every
    distinct threshold's WER and cost are then simulated exactly (MACs counted per exit, encoder and criterion;
    RTF measured per exit on this pass). An RTF choice is then checked by decoding the budget set with it; when
    the real decode overshoots, the budget is tightened by the overshoot and the choice made again (3 tries).
    """
    runs, traces = decode_all_exits(model, loader, tokenizer, args.decoding_method, args.beam_size, device,
                                    desc=f"{args.budget_set} all exits (budget)", reader=reader)
    exits = model.exits
    kind, value = budget
    enc = [macs[e] for e in exits]
    scr = [scorer_macs[e] for e in exits]
    rows = []
    for t in sweep_thresholds(traces, args.exit_strategy, points=None):
        sim = traces.simulate(args.exit_strategy, t, exits, enc, scr)
        rows.append(dict(threshold=t, wer=sim["wer"], cost=sim["macs_per_second" if kind == "macs" else "rtf"]))
    target = value
    audio_s = float(sum(c.duration for c in cuts)) or 1.0
    for attempt in range(3):
        try:
            best = pick_under_budget(rows, target)
        except ValueError as e:
            raise DecodeSetupError(f"--exit-budget-{kind} on {args.budget_set}: {e}") from None
        if kind == "macs":
            measured = best["cost"]
            break
        run = decode_dynamic(model, loader, tokenizer, args.exit_strategy, best["threshold"], args.decoding_method,
                             args.beam_size, device, desc=f"{args.budget_set} check (budget)", reader=reader)
        measured = run.decode_seconds / audio_s
        logging.info(f"budget rtf {value:.6g}: threshold {best['threshold']:.6g} simulated {best['cost']:.6g}, "
                     f"measured {measured:.6g} decoding {args.budget_set}")
        if measured <= value:
            break
        target *= value / measured
    else:
        raise DecodeSetupError(f"--exit-budget-rtf {value:g} on {args.budget_set}: the decode measured {measured:.6g} "
                               "after three tries; give a larger budget (this machine's cheapest is every utterance "
                               "at the first exit)")
    info = dict(budget_kind=kind, budget=value, budget_set=args.budget_set, dev_wer=best["wer"], dev_cost=measured,
                dev_cost_simulated=best["cost"], thresholds_tried=len(rows),
                dev_cost_range=[min(r["cost"] for r in rows), max(r["cost"] for r in rows)],
                exit_costs={str(e): c for e, c in zip(exits, enc)}, scorer_costs={str(e): c for e, c in zip(exits, scr)})
    logging.info(f"budget {kind} {value:.6g}: {args.exit_strategy} threshold {best['threshold']:.6g} gives "
                 f"{best['wer']:.2f}% WER at cost {measured:.6g} on {args.budget_set}")
    return best["threshold"], info


def _write_sweep(out_dir: Path, test_set: str, args, traces: Traces, exits, macs, json_path: Path, common: Dict,
                 scorer_macs: Dict[str, Dict[int, float]]) -> None:
    """WER against mean compute for every criterion, simulated exactly from the all-exit pass; the compute
    counts the encoder up to each exit and the criterion at every exit scored."""
    enc = [macs[e] for e in exits]
    tag = run_tag(args, "sweep")
    curves: Dict[str, List[Dict]] = {}
    lines = ["strategy\tthreshold\tWER\tmean_exit_layer\tmean_MACs_per_s\tencoder_MACs_per_s"]
    for strategy in SCORED:
        rows = []
        scr = [scorer_macs[strategy][e] for e in exits]
        for t in sweep_thresholds(traces, strategy):
            sim = traces.simulate(strategy, t, exits, enc, scr)
            enc_only = traces.simulate(strategy, t, exits, enc, [0.0] * len(exits))["macs_per_second"]
            rows.append(dict(threshold=t, wer=sim["wer"], mean_exit_layer=sim["mean_exit_layer"],
                             macs_per_second=sim["macs_per_second"], encoder_macs_per_second=enc_only))
            lines.append(f"{strategy}\t{t:.6g}\t{sim['wer']:.2f}\t{sim['mean_exit_layer']:.3f}\t"
                         f"{sim['macs_per_second']:.0f}\t{enc_only:.0f}")
        curves[strategy] = rows
    (out_dir / f"dynamic-sweep-{test_set}-{tag}.tsv").write_text("\n".join(lines) + "\n")
    entry = dict(common, tag=tag, test_set=test_set, kind="dynamic-sweep",
                 costs="encoder up to the exit + criterion at each exit scored",
                 scorer_macs={k: {str(e): v for e, v in m.items()} for k, m in scorer_macs.items()},
                 curves={k: [dict(r, threshold=(None if math.isinf(r["threshold"]) else r["threshold"])) for r in v]
                         for k, v in curves.items()})
    update_results_json(json_path, entry)


if __name__ == "__main__":
    sys.exit(main())
