#!/usr/bin/env python3
"""Encoder time in onnxruntime: fixed exits (encoder-exit<N>.onnx) against dynamic exits run block by block
(stem.onnx + block<i>.onnx, stopping at the first confident exit), in float32 and int8.

    ./splitformer/export.py --exp-dir exp/ee-zipformer-cpu --epoch 12 --avg 4 --use-averaged-model --blocks true --int8
    python bench/onnx_dynamic.py --model-dir exp/ee-zipformer-cpu/onnx --files-from test-wavs.txt \\
        --strategy confidence --thresholds 0.9,0.95

Prints, per precision, the real-time factor of the encoder (seconds of compute per second of audio, one thread,
median of --repeats passes over the files) for each fixed exit, for each exit reached block by block, and for
each dynamic threshold with its mean exit. Features are computed once, outside the timing.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from onnx_decode import BlockRunner, Session, features  # noqa: E402


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
    args = p.parse_args()
    files = [Path(ln.strip()) for ln in args.files_from.read_text().splitlines() if ln.strip()]
    feats = [features(f) for f in files]
    audio = sum(x.shape[0] for x in feats) / 100.0
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    print(f"{len(files)} files, {audio:.1f} s of audio; encoder RTF, 1 thread, median of {args.repeats}")
    print("| precision | how | exit | RTF | mean exit |")
    print("| --- | --- | ---: | ---: | ---: |")
    for suffix, name in ((".onnx", "fp32"), (".int8.onnx", "int8")):
        runner = BlockRunner(args.model_dir, suffix)
        exits = [int(b.meta["exit_layer"]) for b in runner.blocks]
        for e in exits:
            path = args.model_dir / f"encoder-exit{e}{suffix}"
            if not path.is_file():
                continue
            enc = Session(path)
            t = timed(lambda: [enc(x[None], np.array([x.shape[0]], dtype=np.int64)) for x in feats], args.repeats)
            print(f"| {name} | fixed exit (encoder-exit{e}) | {e} | {t / audio:.4f} | |")
        for k, e in enumerate(exits):
            def upto(x: np.ndarray, k: int = k) -> None:
                h, h_lens = runner.stem(x[None], np.array([x.shape[0]], dtype=np.int64))
                for block in runner.blocks[: k + 1]:
                    h = block(h, h_lens)[0]
            t = timed(lambda: [upto(x) for x in feats], args.repeats)
            print(f"| {name} | block by block to exit {e} | {e} | {t / audio:.4f} | |")
        for thr in thresholds:
            chosen: List[int] = []

            def dynamic() -> None:
                chosen.clear()
                chosen.extend(runner.run(x, args.strategy, thr)[0] for x in feats)
            t = timed(dynamic, args.repeats)
            print(f"| {name} | dynamic, {args.strategy} > {thr:g} | | {t / audio:.4f} | {sum(chosen) / len(chosen):.2f} |"
                  if args.strategy == "confidence" else
                  f"| {name} | dynamic, {args.strategy} < {thr:g} | | {t / audio:.4f} | {sum(chosen) / len(chosen):.2f} |")


if __name__ == "__main__":
    main()
