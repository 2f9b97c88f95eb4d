#!/usr/bin/env python3
"""Dynamic exits in onnxruntime: fixed exits (encoder-exit<N>.onnx), the per-block files to each exit, and the
dynamic climb one file at a time against the batched climb (files that stop leave the batch), in float32 and int8.

    ./splitformer/export.py --exp-dir exp/splitformer-cpu --epoch 12 --avg 4 --use-averaged-model --exit-layer 12 \
        --blocks true --int8 --tokens data/lang_bpe_30/tokens.txt --output-dir exp/splitformer-cpu/onnx-blocks
    python bench/onnx_dynamic.py --model-dir exp/splitformer-cpu/onnx-blocks --files-from test-wavs.txt \
        --strategy confidence --thresholds 0.9,0.95

Prints, per precision, the real-time factor and the files per second (one thread, median of --repeats passes over
the files) of the encoder alone: each fixed exit whose file exists, the blocks run to each exit, and each dynamic
threshold (CTC reader, CTC greedy words) one file at a time and in batches of --batch-size, with its mean exit.
Features are computed once, outside the timing.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from onnx_decode import Climber, Session, model_input  # noqa: E402


def timed(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--files-from", type=Path, required=True, help="audio files, one per line")
    p.add_argument("--strategy", choices=["entropy", "confidence"], default="confidence")
    p.add_argument("--thresholds", type=str, default="0.9,0.95")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sort", action="store_true", help="batch the files in order of length (less padding)")
    args = p.parse_args()
    files = [Path(ln.strip()) for ln in args.files_from.read_text().splitlines() if ln.strip()]
    feats = [model_input(f, {}) for f in files]
    if args.sort:
        feats.sort(key=len, reverse=True)
    audio = sum(x.shape[0] for x in feats) / 100.0
    n = len(feats)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    print(f"{n} files, {audio:.1f} s of audio; encoder (+ CTC reader for dynamic), 1 thread, median of {args.repeats}"
          f"{', sorted by length' if args.sort else ''}")
    print("| precision | how | exit | RTF | files/s | mean exit |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for suffix, name in ((".onnx", "fp32"), (".int8.onnx", "int8")):
        probe = Climber(args.model_dir, suffix, args.strategy, 0.0, "ctc", True, "ctc", None)
        for e in probe.exits:
            path = args.model_dir / f"encoder-exit{e}{suffix}"
            if not path.is_file():
                continue
            enc = Session(path)
            t = timed(lambda: [enc(x[None], np.array([x.shape[0]], dtype=np.int64)) for x in feats], args.repeats)
            print(f"| {name} | fixed exit (encoder-exit{e}) | {e} | {t / audio:.4f} | {n / t:.1f} | |")
        for k, e in enumerate(probe.exits):
            def upto(x: np.ndarray, k: int = k) -> None:
                stem = probe.stem.named({"x": x[None], "x_lens": np.array([x.shape[0]], dtype=np.int64)})
                h = stem["h"]
                for block in probe.blocks[: k + 1]:
                    h = block.named({**stem, "h": h})["next"]
            t = timed(lambda: [upto(x) for x in feats], args.repeats)
            print(f"| {name} | block by block to exit {e} | {e} | {t / audio:.4f} | {n / t:.1f} | |")
        rule = ">" if args.strategy == "confidence" else "<"
        for thr in thresholds:
            climber = Climber(args.model_dir, suffix, args.strategy, thr, "ctc", True, "ctc", None)
            for how, size in (("one at a time", 1), (f"batches of {args.batch_size}", args.batch_size)):
                chosen: List[int] = []

                def dynamic() -> None:
                    chosen.clear()
                    for i in range(0, n, size):
                        chosen.extend(e for e, _ in climber.run(feats[i:i + size]))
                t = timed(dynamic, args.repeats)
                print(f"| {name} | dynamic {args.strategy} {rule} {thr:g}, {how} | | {t / audio:.4f} | {n / t:.1f} | "
                      f"{sum(chosen) / len(chosen):.2f} |")


if __name__ == "__main__":
    main()
