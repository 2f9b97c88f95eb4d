#!/usr/bin/env python3
"""Streaming speed of a causal model: encoder time per chunk at each exit, on one thread, in PyTorch and in
onnxruntime, with the real-time factor and the latency a chunk adds.

    ./splitformer/export.py --exp-dir exp/splitformer-cpu-causal --epoch 12 --avg 4 --use-averaged-model \\
        --streaming true --chunk-size 8 --left-context-frames 64   # writes exp/splitformer-cpu-causal/onnx/streaming
    python bench/streaming.py --exp-dir exp/splitformer-cpu-causal --epoch 12 --avg 4 --use-averaged-model \\
        --chunk-size 8 --left-context-frames 64 --onnx-dir exp/splitformer-cpu-causal/onnx/streaming

One stream, chunk after chunk, over the AN4 test features (prepared by ./prepare.sh) joined into one long stream,
so that the caches are full as in a long conversation. For each exit it times every chunk's front end + encoder up
to that exit (the blocks above never run), after --warmup chunks, and prints the median and 95th percentile in
milliseconds and as a share of the chunk's duration, and the real-time factor (encoder seconds per second of
audio). PyTorch runs StreamingEncoder and the joiner's encoder projection; onnxruntime runs
streaming/encoder-exit<N>.onnx (sherpa-onnx's file, which holds the same projection), so both do the same work. Latency: the chunk plus the front end's look-ahead (the audio a frame waits for
before its chunk can run), and that plus the p95 compute.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitformer.decoding.loading import frame_ms, load_model, test_cuts  # noqa: E402
from splitformer.model.streaming import StreamingEncoder  # noqa: E402


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_chunks(step: Callable[[int], None], n: int, warmup: int) -> List[float]:
    out = []
    for k in range(n):
        t0 = time.perf_counter()
        step(k)
        if k >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def torch_times(model, enc: StreamingEncoder, windows: torch.Tensor, exit_index: int, warmup: int) -> List[float]:
    state = enc.init_state(1)
    remaining = torch.tensor([10 ** 9])

    def step(k: int) -> None:
        h, lens = enc.front_step(windows[k:k + 1], state, remaining)
        if enc.early_exit:
            x, x_lens = enc.prepare(h, lens)
            for b in range(exit_index + 1):
                x, out = enc.block(b, x, x_lens, state)
            enc.finish_chunk(state)
        else:
            out, _ = enc.encode(h, lens, state)
        if model.use_transducer:
            model.project_encoder(out, model.exits[exit_index])

    with torch.no_grad():
        return time_chunks(step, windows.shape[0], warmup)


def onnx_times(path: Path, windows: np.ndarray, warmup: int) -> Optional[List[float]]:
    if not path.is_file():
        return None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    states = []
    for i in inputs[1:]:
        shape = [1 if isinstance(d, str) else d for d in i.shape]
        states.append(np.zeros(shape, dtype=np.int64 if i.name == "processed_lens" else np.float32))
    names = [i.name for i in inputs]

    def step(k: int) -> None:
        nonlocal states
        outs = sess.run(None, dict(zip(names, [windows[k:k + 1]] + states)))
        states = outs[1:]

    return time_chunks(step, windows.shape[0], warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp-dir", type=Path, required=True)
    p.add_argument("--epoch", type=int, default=12)
    p.add_argument("--iter", type=int, default=0)
    p.add_argument("--avg", type=int, default=1)
    p.add_argument("--use-averaged-model", action="store_true")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--left-context-frames", type=int, default=64)
    p.add_argument("--onnx-dir", type=Path, default=None, help="export.py's streaming/ folder (same chunking)")
    p.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--test-set", type=str, default="test")
    p.add_argument("--chunks", type=int, default=300, help="chunks timed per exit (after --warmup)")
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, margs = load_model(args)
    enc = StreamingEncoder(model, args.chunk_size, args.left_context_frames)
    cuts = test_cuts(args.manifest_dir, "an4", args.test_set)
    feats = torch.cat([torch.from_numpy(c.load_features()) for c in cuts])
    n = min(args.chunks + args.warmup, (feats.shape[0] - enc.input_frames) // enc.shift + 1)
    windows = torch.stack([feats[k * enc.shift: k * enc.shift + enc.input_frames] for k in range(n)])
    chunk_s = enc.shift / 100.0
    lookahead_ms = enc.front.lookahead * 10.0
    print(f"{margs.preset}: chunks of {args.chunk_size} frames ({args.chunk_size * frame_ms(margs):g} ms), left context "
          f"{args.left_context_frames} frames ({args.left_context_frames * frame_ms(margs) / 1000:g} s); front-end "
          f"look-ahead {enc.front.lookahead} fbank frames ({lookahead_ms:g} ms); {n - args.warmup} chunks timed per exit "
          f"after {args.warmup}, one thread, torch {torch.__version__}")
    print()
    print("| runtime | exit | median ms | p95 ms | p95 / chunk | RTF | latency ms (chunk + look-ahead + p95) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, e in enumerate(model.exits):
        rows = [("PyTorch", torch_times(model, enc, windows, i, args.warmup))]
        if args.onnx_dir is not None:
            rows.append(("onnxruntime", onnx_times(args.onnx_dir / f"encoder-exit{e}.onnx", windows.numpy(), args.warmup)))
        for name, times in rows:
            if not times:
                continue
            med, p95 = statistics.median(times) * 1000, percentile(times, 95) * 1000
            rtf = sum(times) / (len(times) * chunk_s)
            latency = chunk_s * 1000 + lookahead_ms
            print(f"| {name} | {e} | {med:.2f} | {p95:.2f} | {p95 / (chunk_s * 1000):.1%} | {rtf:.4f} | "
                  f"{latency:g} + {p95:.1f} = {latency + p95:.1f} |")


if __name__ == "__main__":
    main()
