#!/usr/bin/env python3
"""How many live streams the recognition server holds: N clients speak AN4 test files into it in real time, for
each N, at a fixed exit and at a compute budget; and whether its words are streaming_decode.py's.

    python bench/serve_load.py --exp-dir exp/streaming/splitformer-cpu-causal --epoch 12 --avg 4 \\
        --use-averaged-model --chunk-size 8 --left-context-frames 64 --streams 1,8,16,32,48,64

The server is ``splitformer/serve.py`` itself, started as a subprocess with the flags given here (so the
clients, in this process, compete with it for the same cores as real clients on the machine would not: the
figures are a floor). Every client sends 100 ms of audio every 100 ms, file after file (each one utterance,
ended by ``end``), for ``--seconds``. Per N and setting it prints:

- load: the decoder's busy seconds over wall seconds (from the server's /stats); 1.0 is a saturated core budget;
- RTF: the decoder's busy seconds per second of audio it decoded (all streams);
- delay p50/p95: seconds from sending the last sample a chunk needs to receiving its partial result;
- batch: chunks per decoding step (streams decoded side by side);
- server, clients: CPU seconds per wall second of the server process and of this one (2.0: both cores);
- failed: files whose stream could not even open (no handshake within 10 s: the server's loop is starved);
- real time: whether the server kept up: p95 delay under ``--max-delay`` seconds, every final in, nothing failed.

``--agreement`` first streams every test file once (one client at a time, as fast as the server goes) at the last
exit and compares the server's words with those of streaming_decode.py's decoder on the prepared features.
"""
import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitformer.decoding.audio import file_samples  # noqa: E402
from splitformer.serving.client import stream_audio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp-dir", type=Path, required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--avg", type=int, default=1)
    p.add_argument("--use-averaged-model", action="store_true")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--left-context-frames", type=int, default=64)
    p.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--streams", type=str, default="1,8,16,32,48,64", help="comma list of client counts")
    p.add_argument("--seconds", type=float, default=20.0, help="how long the clients speak at each N")
    p.add_argument("--budget", type=float, default=0.5, help="the budget setting (fraction of the last exit)")
    p.add_argument("--strategy", type=str, default="confidence")
    p.add_argument("--exit-scorer", type=str, default=None, help="serve.py --exit-scorer (default: serve.py's)")
    p.add_argument("--max-delay", type=float, default=1.0, help="p95 partial delay (s) still called real time")
    p.add_argument("--num-threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--port", type=int, default=6116)
    p.add_argument("--budget-only", action="store_true", help="measure the budget setting only")
    p.add_argument("--server-log", type=Path, default=Path("/tmp/serve_load-server.log"), help="the server's log")
    p.add_argument("--engine-only", action="store_true",
                   help="no server: time the engine decoding 32 streams that all have their audio (3 s each) at "
                        "once, per chunk, at the last exit and at the budget (what batching alone gives)")
    p.add_argument("--agreement", action="store_true", help="also compare words with streaming_decode.py's")
    return p


def start_server(args) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "splitformer" / "serve.py"), "--exp-dir", str(args.exp_dir), "--epoch",
           str(args.epoch), "--avg", str(args.avg), "--chunk-size", str(args.chunk_size), "--left-context-frames",
           str(args.left_context_frames), "--manifest-dir", str(args.manifest_dir), "--port", str(args.port),
           "--num-threads", str(args.num_threads), "--strategies", args.strategy, "--max-streams", "256"]
    if args.use_averaged_model:
        cmd.append("--use-averaged-model")
    if args.exit_scorer:
        cmd += ["--exit-scorer", args.exit_scorer]
    log = open(args.server_log, "w")  # a file, not a pipe: an unread pipe fills up and stalls the server's logging
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 600
    while time.monotonic() < end and proc.poll() is None:
        if "serving" in Path(args.server_log).read_text():
            return proc
        time.sleep(0.5)
    raise SystemExit(f"the server did not start ({args.server_log}): {' '.join(cmd)}")


def stats(port: int) -> Dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats").read())


async def speaker(url: str, files: Sequence[np.ndarray], start: Dict, until: float, first: int, out: List,
                  failed: List) -> None:
    await asyncio.sleep(random.random())  # clients do not all start on the same 100 ms
    i = first
    while time.perf_counter() < until:
        x = files[i % len(files)]
        try:
            out.append((len(x) / 16000, await stream_audio(url, x, dict(start, endpoint=False), realtime=1.0)))
        except (OSError, asyncio.TimeoutError) as e:  # refused, or no handshake in time: the server did not keep up
            failed.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(1.0)
        i += 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, port: int, files, start: Dict, n: int, seconds: float, pid: int):
    before, t0 = stats(port), time.perf_counter()
    cpu0, mine0 = cpu_seconds(pid), time.process_time()
    sessions: List = []
    failed: List[str] = []
    await asyncio.gather(*[speaker(url, files, start, t0 + seconds, k * 7, sessions, failed) for k in range(n)])
    after, wall = stats(port), time.perf_counter() - t0
    server_cpu, client_cpu = (cpu_seconds(pid) - cpu0) / wall, (time.process_time() - mine0) / wall
    busy = after["busy_seconds"] - before["busy_seconds"]
    audio = sum(a for a, _ in sessions)
    delays = [d for _, s in sessions for d in s.delays()] or [float("nan")]
    complete = not failed and all(s.of("final") and s.of("final")[-1]["last"] for _, s in sessions)
    batch = (after["chunks"] - before["chunks"]) / max(after["steps"] - before["steps"], 1)
    return dict(batch=batch, server_cpu=server_cpu, client_cpu=client_cpu, load=busy / wall, rtf=busy / audio, p50=float(np.percentile(delays, 50)),
                p95=float(np.percentile(delays, 95)), complete=complete, files=len(sessions), failed=len(failed))


def agreement(args, url: str) -> None:
    import torch

    from splitformer.decoding.loading import load_model, load_tokenizer, test_cuts
    from splitformer.decoding.streaming import StreamingDecoder, cut_utterances, stream_words

    ns = argparse.Namespace(exp_dir=args.exp_dir, epoch=args.epoch, avg=args.avg, iter=0,
                            use_averaged_model=args.use_averaged_model)
    model, margs = load_model(ns)
    model.set_chunking(args.chunk_size, args.left_context_frames)
    tok = load_tokenizer(Path(f"data/lang_bpe_{margs.vocab_size}/bpe.model"))
    cuts = test_cuts(args.manifest_dir, "an4", "test")
    torch.set_num_threads(args.num_threads)
    dec = StreamingDecoder(model, args.chunk_size, args.left_context_frames, exit_layer=model.exits[-1])
    offline = {c: h for c, _, h in stream_words(dec.decode(cut_utterances(cuts)), tok, 0)}
    same, refs_err, n_words = 0, [0, 0], 0
    from kaldialign import edit_distance

    for cut in cuts:
        x, _ = file_samples(Path(cut.recording.sources[0].source))
        got = asyncio.run(stream_audio(url, x, {"exit": model.exits[-1], "endpoint": False}, realtime=0))
        words = got.text.split()
        ref = " ".join(s.text for s in cut.supervisions).split()
        same += words == offline[cut.id]
        refs_err[0] += edit_distance(ref, words)["total"]
        refs_err[1] += edit_distance(ref, offline[cut.id])["total"]
        n_words += len(ref)
    print(f"agreement at exit {model.exits[-1]}: {same}/{len(cuts)} test files give streaming_decode.py's words "
          f"(server WER {100 * refs_err[0] / n_words:.2f}%, streaming_decode.py's decoder "
          f"{100 * refs_err[1] / n_words:.2f}%; the server computes features from the audio with "
          "kaldi-native-fbank, the manifests hold lhotse's)", flush=True)


def engine_only(args) -> None:
    """Milliseconds per chunk when 32 streams are decoded in full batches by the engine alone."""
    import torch

    from splitformer.serve import build_engine, get_parser as serve_parser
    from splitformer.serving.engine import Settings

    flags = ["--exp-dir", str(args.exp_dir), "--epoch", str(args.epoch), "--avg", str(args.avg), "--chunk-size",
             str(args.chunk_size), "--left-context-frames", str(args.left_context_frames), "--manifest-dir",
             str(args.manifest_dir), "--strategies", args.strategy] + (["--use-averaged-model"] if
                                                                       args.use_averaged_model else [])
    if args.exit_scorer:
        flags += ["--exit-scorer", args.exit_scorer]
    torch.set_num_threads(args.num_threads)
    engine, _ = build_engine(serve_parser().parse_args(flags))
    from lhotse import CutSet

    cuts = CutSet.from_file(args.manifest_dir / "an4_cuts_test.jsonl.gz").subset(first=32)
    files = [file_samples(Path(c.recording.sources[0].source))[0][: 16000 * 3] for c in cuts]
    for name, settings in [(f"exit {engine.exits[-1]}", Settings(exit_layer=engine.exits[-1], endpoint=False)),
                           (f"{args.strategy} budget {args.budget:g}",
                            Settings(strategy=args.strategy, budget=args.budget, endpoint=False))]:
        times = []
        for _ in range(3):
            for x in files:
                s = engine.open(settings, lambda m: None)
                s.feed(x)
                s.end()
            t0, c0 = time.perf_counter(), engine.chunks_run
            while engine.active:
                engine.step()
            times.append((time.perf_counter() - t0) / (engine.chunks_run - c0))
        print(f"engine alone, 32 streams in full batches, {name}: {1000 * sorted(times)[1]:.2f} ms per chunk "
              f"(median of 3)", flush=True)


def main() -> int:
    args = get_parser().parse_args()
    if args.engine_only:
        engine_only(args)
        return 0
    from lhotse import CutSet

    cuts = CutSet.from_file(args.manifest_dir / "an4_cuts_test.jsonl.gz")
    files = [file_samples(Path(c.recording.sources[0].source))[0] for c in cuts]
    proc = start_server(args)
    url = f"ws://127.0.0.1:{args.port}/"
    try:
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/info").read())
        if args.agreement:
            agreement(args, url)
        print(f"{args.exp_dir} · {info['chunk_ms']} ms chunks · criteria read from {info['scorer']} · server on "
              f"{args.num_threads} threads · {args.seconds:g} s per load")
        print(f"{'setting':<28} {'N':>4} {'load':>6} {'RTF':>7} {'p50 s':>7} {'p95 s':>7} {'files':>6} "
              f"{'batch':>6} {'server':>7} {'clients':>7} {'failed':>6}  real time")
        settings = [(f"exit {info['exits'][-1]}", {"exit": info["exits"][-1]}),
                    (f"{args.strategy} budget {args.budget:g}", {"strategy": args.strategy, "budget": args.budget})]
        for name, start in settings[1:] if args.budget_only else settings:
            for n in [int(v) for v in args.streams.split(",")]:
                r = asyncio.run(load(url, args.port, files, start, n, args.seconds, proc.pid))
                ok = r["complete"] and r["p95"] <= args.max_delay
                print(f"{name:<28} {n:>4} {r['load']:>6.2f} {r['rtf']:>7.4f} {r['p50']:>7.3f} {r['p95']:>7.3f} "
                      f"{r['files']:>6} {r['batch']:>6.1f} {r['server_cpu']:>7.2f} {r['client_cpu']:>7.2f} {r['failed']:>6}  {'yes' if ok else 'NO'}", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
