#!/usr/bin/env python3
"""Dynamic exits in PyTorch, batched against one utterance at a time, beside fixed exits: utterances per second.

    python bench/dynamic_climb.py --exp-dir exp/splitformer-cpu --epoch 12 --avg 4 --use-averaged-model \\
        --strategy confidence --threshold 0.9 --test-set test --repeats 3

Decodes the set (features loaded once, outside the timing) with: every fixed exit (batched, the encoder stopping
there), the batched climb (utterances that stop leave the batch, the rest climb on) and the one-at-a-time climb
(batches of one). Prints the median over ``--repeats`` of utterances per second and the decoding real-time factor
of each, the speed-up of the batched climb, and whether both climbs gave the same exits and words (they must).
Run it alone: a benchmark beside another heavy job measures nothing.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from splitformer.decoding.cli import add_checkpoint_arguments
from splitformer.decoding.exits import ExitReader
from splitformer.decoding.loading import load_model, load_tokenizer, test_loader
from splitformer.decoding.runner import decode_dynamic, decode_exit, default_scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--strategy", choices=["entropy", "confidence", "posterior"], default="confidence")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--scorer", choices=["ctc", "transducer"], default=None)
    p.add_argument("--decoding-method", default="greedy_search")
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--test-set", default="test")
    p.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--bpe-model", type=Path, default=None)
    p.add_argument("--max-duration", type=float, default=100.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sort", action="store_true",
                   help="batch the utterances in order of length (less padding), as a deployment batching files would")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, margs = load_model(args)
    tok = load_tokenizer(args.bpe_model or Path(f"data/lang_bpe_{margs.vocab_size}/bpe.model"))
    loader, cuts = test_loader(args.manifest_dir, "an4", args.test_set, args.max_duration, model.input_kind,
                               sort_by_duration=args.sort)
    batches = list(loader)
    n, audio = len(cuts), float(sum(c.duration for c in cuts))
    device = torch.device("cpu")
    reader = ExitReader((args.strategy,), args.scorer or default_scorer(model), method=args.decoding_method,
                        beam=args.beam_size)

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    print(f"{args.test_set}: {n} utterances, {audio:.1f} s of audio, --max-duration {args.max_duration:g}, "
          f"{args.threads} threads, median of {args.repeats}{', sorted by length' if args.sort else ''}")
    print("run\tutt/s\tRTF\tmean exit")
    for e in model.exits:
        t, _ = timed(lambda: decode_exit(model, batches, tok, e, args.decoding_method, args.beam_size, device, desc=None))
        print(f"fixed exit {e}\t{n / t:.1f}\t{t / audio:.4f}\t{e}")
    runs = {}
    for name, one in (("batched climb", False), ("one-at-a-time climb", True)):
        t, run = timed(lambda: decode_dynamic(model, batches, tok, args.strategy, args.threshold, args.decoding_method,
                                              args.beam_size, device, desc=None, reader=reader, one_at_a_time=one))
        runs[name] = (t, run)
        mean = sum(run.exit_layers) / max(len(run.exit_layers), 1)
        print(f"{name} ({args.strategy} {args.threshold:g}, {reader.scorer} reader)\t{n / t:.1f}\t{t / audio:.4f}\t{mean:.2f}")
    (tb, b), (to, o) = runs["batched climb"], runs["one-at-a-time climb"]
    same_exits = b.exit_layers == o.exit_layers
    same_words = [r[2] for r in b.results] == [r[2] for r in o.results]
    print(f"batched climb speed-up: {to / tb:.2f}x; same exits: {same_exits}; same words: {same_words}")
    if not (same_exits and same_words):
        diff = sum(x != y for x, y in zip(b.exit_layers, o.exit_layers))
        wdiff = sum(x[2] != y[2] for x, y in zip(b.results, o.results))
        print(f"  {diff} exits and {wdiff} transcripts differ of {n}")


if __name__ == "__main__":
    main()
