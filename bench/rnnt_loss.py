#!/usr/bin/env python3
"""Time and peak memory of the pruned RNN-T recipe: splitformer's torch backend vs fast_rnnt's C++, and vs
the full-lattice loss, on the same inputs in the same run.

The recipe is what icefall's model.py does per batch (forward + backward):
  rnnt_loss_smoothed(return_grad=True) -> get_rnnt_prune_ranges -> do_rnnt_pruning -> joiner -> rnnt_loss_pruned.
The joiner is logits = am + lm, so that the loss, not a network, is measured. am and lm are (B,T,V), (B,U+1,V).

Time: median wall time over --repeats runs after one warm-up, --threads torch threads (same for all).
Memory: peak resident memory (VmHWM from /proc, reset through /proc/self/clear_refs) above the resident memory
just before the call, each measured once in a fresh child process whose inputs are rebuilt from the same seed,
after one small warm-up call (so that code pages and lazy initialisation are not counted), with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS instead of hiding in the heap.
tracemalloc cannot see torch's allocations; this counts every byte the process touches.

  python bench/rnnt_loss.py                        # both sizes, table on stdout
  python bench/rnnt_loss.py --sizes 16,250,60,500 --repeats 3 --no-full   # quick look

Rows "recursion" time mutual_information_recursion(return_grad=True) alone on the smoothed lattice.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitformer.losses import rnnt as torch_rnnt  # noqa: E402

DEFAULT_SIZES = ["16,250,60,500", "8,1000,200,500"]


def make_inputs(B: int, T: int, U: int, V: int, seed: int = 0):
    """Random encoder/decoder log-space outputs with varied lengths (80-100% of T and U)."""
    g = torch.Generator().manual_seed(seed)
    am = torch.randn(B, T, V, generator=g)
    lm = torch.randn(B, U + 1, V, generator=g)
    symbols = torch.randint(1, V, (B, U), generator=g)
    t_lens = torch.randint(int(0.8 * T), T + 1, (B,), generator=g)
    u_lens = torch.randint(int(0.8 * U), U + 1, (B,), generator=g)
    t_lens[0], u_lens[0] = T, U
    zeros = torch.zeros(B, dtype=torch.int64)
    return am, lm, symbols, torch.stack([zeros, zeros, u_lens, t_lens], 1)


def pruned_recipe(mod, am, lm, symbols, boundary, prune_range: int) -> float:
    am = am.detach().requires_grad_()
    lm = lm.detach().requires_grad_()
    simple, (px_grad, py_grad) = mod.rnnt_loss_smoothed(
        lm=lm, am=am, symbols=symbols, termination_symbol=0, lm_only_scale=0.25, am_only_scale=0.0,
        boundary=boundary, reduction="sum", return_grad=True)
    ranges = mod.get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad, boundary=boundary, s_range=prune_range)
    am_p, lm_p = mod.do_rnnt_pruning(am=am, lm=lm, ranges=ranges)
    logits = am_p + lm_p
    pruned = mod.rnnt_loss_pruned(logits=logits, symbols=symbols, ranges=ranges, termination_symbol=0,
                                  boundary=boundary, reduction="sum")
    (0.5 * simple + pruned).backward()
    return float(pruned.detach())


def full_lattice(mod, am, lm, symbols, boundary, prune_range: int) -> float:
    am = am.detach().requires_grad_()
    lm = lm.detach().requires_grad_()
    logits = am.unsqueeze(2) + lm.unsqueeze(1)  # (B,T,U+1,V)
    loss = mod.rnnt_loss(logits=logits, symbols=symbols, termination_symbol=0, boundary=boundary, reduction="sum")
    loss.backward()
    return float(loss.detach())


_LATTICE_CACHE: Dict[str, object] = {}  # holds `am` itself, so a new tensor can never match by a reused id


def recursion_only(mod, am, lm, symbols, boundary, prune_range: int) -> float:
    """mutual_information_recursion with return_grad=True on the smoothed (B,S,T+1) lattice: the only part
    of the recipe that differs between backends beyond plain torch ops (px, py are built once, untimed)."""
    if _LATTICE_CACHE.get("am") is not am:
        _LATTICE_CACHE["am"] = am
        _LATTICE_CACHE["pxy"] = torch_rnnt.get_rnnt_logprobs_smoothed(lm, am, symbols, 0, 0.25, 0.0, boundary)
    px, py = _LATTICE_CACHE["pxy"]
    scores, _ = mod.mutual_information_recursion(px, py, boundary=boundary, return_grad=True)
    return float(-scores.sum())


def backends() -> Dict[str, object]:
    out: Dict[str, object] = {"torch": torch_rnnt}
    try:
        import fast_rnnt

        out["fast_rnnt"] = fast_rnnt
    except Exception as e:
        print(f"# fast_rnnt not importable ({e}); build it with tools/install_fast_rnnt.sh", file=sys.stderr)
    return out


CASES: Dict[str, Tuple[str, Callable]] = {
    "pruned/torch": ("torch", pruned_recipe),
    "pruned/fast_rnnt": ("fast_rnnt", pruned_recipe),
    "full/torch": ("torch", full_lattice),
    "full/fast_rnnt": ("fast_rnnt", full_lattice),
    "recursion/torch": ("torch", recursion_only),
    "recursion/fast_rnnt": ("fast_rnnt", recursion_only),
}


def time_cases(cases: Dict[str, Tuple[Callable, object, int]], inputs, prune_range: int):
    """{case: (median seconds, loss)}; the cases take turns in each round, so load on a shared machine
    hits them alike."""
    values = {c: fn(mod, *inputs, prune_range) for c, (fn, mod, _) in cases.items()}  # warm-up
    times: Dict[str, List[float]] = {c: [] for c in cases}
    for r in range(max(reps for _, _, reps in cases.values())):
        for c, (fn, mod, reps) in cases.items():
            if r < reps:
                t0 = time.perf_counter()
                fn(mod, *inputs, prune_range)
                times[c].append(time.perf_counter() - t0)
    return {c: (statistics.median(times[c]), values[c]) for c in cases}


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory_child(case: str, size: str, prune_range: int, threads: int) -> None:
    """Runs in a fresh process: prints {"peak_mb": ...} for one call of one case."""
    torch.set_num_threads(threads)
    B, T, U, V = map(int, size.split(","))
    name, fn = CASES[case]
    mod = backends()[name]
    fn(mod, *make_inputs(2, 12, 4, V, seed=1), prune_range)  # page in code and lazy inits; not counted
    inputs = make_inputs(B, T, U, V)
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        exact = True
    except OSError:
        exact = False  # VmHWM then includes the setup; still an upper bound
    fn(mod, *inputs, prune_range)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - base) / 1024, "exact": exact}))


def measure_memory(case: str, size: str, prune_range: int, threads: int) -> Optional[float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--_memory-child", case, "--sizes", size, "--prune-range", str(prune_range),
           "--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"# memory of {case} at {size} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="B,T,U,V (several allowed)")
    p.add_argument("--prune-range", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    p.add_argument("--full-repeats", type=int, default=1, help="timed runs of the (slow) full-lattice loss")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-full", action="store_true", help="skip the full-lattice loss")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--max-full-gb", type=float, default=8.0,
                   help="skip a full-lattice case whose estimated peak (logits bytes x 2 for torch, x 5 for "
                        "fast_rnnt, measured factors) is above this")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        measure_memory_child(args.memory_child, args.sizes[0], args.prune_range, args.threads)
        return

    torch.set_num_threads(args.threads)
    mods = backends()
    cases = [c for c in CASES if CASES[c][0] in mods and not (args.no_full and c.startswith("full"))]
    print(f"# torch {torch.__version__}, {args.threads} thread(s), prune range {args.prune_range}, "
          f"median of {args.repeats} (full lattice: {args.full_repeats}) forward+backward runs")
    header = ("| B,T,U,V | method | backend | median ms | time vs fast_rnnt | peak MB | mem vs full/torch "
              "| mem vs full/fast_rnnt | loss |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    print(header)
    for size in args.sizes:
        B, T, U, V = map(int, size.split(","))
        inputs = make_inputs(B, T, U, V)
        logits_gb = B * T * (U + 1) * V * 4 / 2**30
        todo = {}
        for case in cases:
            name, fn = CASES[case]
            est = logits_gb * (2 if name == "torch" else 5)
            if case.startswith("full") and est > args.max_full_gb:
                print(f"# skipping {case} at {size}: estimated peak {est:.1f} GB > --max-full-gb {args.max_full_gb}",
                      file=sys.stderr)
                continue
            todo[case] = (fn, mods[name], args.full_repeats if case.startswith("full") else args.repeats)
        timed = time_cases(todo, inputs, args.prune_range)
        rows = {}
        for case, (sec, value) in timed.items():
            mem = None if args.no_memory else measure_memory(case, size, args.prune_range, args.threads)
            rows[case] = (sec, mem, value)
        for case, (sec, mem, value) in rows.items():
            method, name = case.split("/")
            ref = rows.get(f"{method}/fast_rnnt")
            vs_ref = f"{sec / ref[0]:.2f}x" if ref else "-"
            mem_s = f"{mem:.0f}" if mem is not None else "-"
            vs_full = []
            for full_name in ("torch", "fast_rnnt"):
                full = rows.get(f"full/{full_name}")
                ok = mem is not None and full is not None and full[1]
                vs_full.append(f"{mem / full[1]:.3f}" if ok else "-")
            print(f"| {size} | {method} | {name} | {sec * 1e3:.1f} | {vs_ref} | {mem_s} | {vs_full[0]} | {vs_full[1]} "
                  f"| {value:.2f} |", flush=True)


if __name__ == "__main__":
    main()
