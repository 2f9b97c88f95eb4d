#!/usr/bin/env python3
"""Dynamic exits in PyTorch against the torch-free ONNX example, file by file: the same exit and the same words?

    ./splitformer/export.py --exp-dir exp/splitformer-cpu --epoch 12 --avg 4 --use-averaged-model --exit-layer 12 \\
        --blocks true --int8 --tokens data/lang_bpe_30/tokens.txt --output-dir exp/splitformer-cpu/onnx-blocks
    python bench/dynamic_parity.py --model-dir exp/splitformer-cpu/onnx-blocks --bpe-model data/lang_bpe_30/bpe.model \\
        --files-from test-files.txt --strategy confidence --threshold 0.9 --scorer ctc

Runs ``splitformer/pretrained.py --exit-strategy`` on ``<model-dir>/pretrained.pt`` and ``examples/onnx_decode.py
--exit-strategy`` on the per-block files with the same criterion, threshold and reader, and prints how many files
took the same exit and the same words, and the wall time of each. ``--int8`` compares the int8 files instead (a
looser match is expected: quantisation moves scores near the threshold). Without ``--files-from``, the AN4 test
set's audio (``--an4-dir``, every .sph under its test directory).
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]


def run(cmd: List[str], files: List[str]) -> Tuple[Dict[str, str], Dict[str, str], float]:
    """(words by file, exit by file, seconds) of one decoding command (``<file>\\t<words>`` on stdout, ``<file>: exit
    N`` on stderr)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    words = dict(line.split("\t", 1) for line in r.stdout.splitlines() if "\t" in line)
    exits = {}
    for f in files:  # a progress bar may share a line of stderr with the exit
        m = re.search(re.escape(f) + r": exit (\S+)", r.stderr)
        exits[f] = m.group(1) if m else None
    return words, exits, secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="export.py --blocks true output (with pretrained.pt)")
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--files-from", type=Path, default=None)
    p.add_argument("--an4-dir", type=Path, default=REPO.parent / "shared" / "data" / "an4")
    p.add_argument("--strategy", choices=["entropy", "confidence"], default="confidence")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--scorer", choices=["ctc", "transducer"], default="ctc")
    p.add_argument("--method", choices=["transducer", "ctc"], default="transducer")
    p.add_argument("--int8", action="store_true")
    args = p.parse_args()
    if args.files_from:
        files = [ln.strip() for ln in args.files_from.read_text().splitlines() if ln.strip()]
    else:
        files = sorted(str(f) for f in args.an4_dir.rglob("*.sph") if "test" in f.parent.parent.name)
    if not files:
        raise SystemExit("no audio files (give --files-from, or --an4-dir holding AN4's test .sph files)")
    rule = ["--exit-strategy", args.strategy, "--exit-threshold", repr(args.threshold), "--exit-scorer", args.scorer]
    pt_method = "greedy_search" if args.method == "transducer" else "ctc_greedy_search"
    pt = [sys.executable, str(REPO / "splitformer" / "pretrained.py"), "--checkpoint",
          str(args.model_dir / "pretrained.pt"), "--bpe-model", str(args.bpe_model), "--decoding-method", pt_method,
          "--num-threads", "1", *rule, *files]
    ox = [sys.executable, str(REPO / "examples" / "onnx_decode.py"), "--model-dir", str(args.model_dir),
          "--method", args.method, *rule, *(["--int8"] if args.int8 else []), *files]
    pw, pe, ps = run(pt, files)
    ow, oe, os_ = run(ox, files)
    same_exit = sum(pe.get(f) == oe.get(f) for f in files)
    same_words = sum(pw.get(f) == ow.get(f) for f in files)
    print(f"{len(files)} files, {args.strategy} {args.threshold:g}, {args.scorer} reader, {args.method} search, "
          f"{'int8' if args.int8 else 'fp32'} ONNX")
    print(f"same exit: {same_exit}/{len(files)}; same words: {same_words}/{len(files)}")
    taken = sorted(set(pe.values()) - {None}, key=lambda e: (not e.isdigit(), int(e) if e.isdigit() else 0))
    print("exits taken (PyTorch): " + ", ".join(f"{e}: {list(pe.values()).count(e)}" for e in taken))
    print(f"wall: PyTorch {ps:.1f} s, ONNX {os_:.1f} s (model loading included)")
    for f in files:
        if pe.get(f) != oe.get(f) or pw.get(f) != ow.get(f):
            print(f"  {f}: PyTorch exit {pe.get(f)} {pw.get(f)!r} | ONNX exit {oe.get(f)} {ow.get(f)!r}")


if __name__ == "__main__":
    main()
