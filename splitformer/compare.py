#!/usr/bin/env python3
"""Compare decoding results of several experiments (e.g. Zipformer baseline, early-exit baseline,
Splitformer): a markdown table and plots of WER against exit layer and against encoder compute.

    ./splitformer/compare.py exp/zipformer-cpu exp/ee-zipformer-cpu exp/splitformer-cpu --out exp/report

Reads ``<exp-dir>/<decoding-method>/results-<set>.json`` as decode.py writes them and writes
``<out>/report.md``, ``<out>/results.tsv`` and ``<out>/wer-<set>.png`` (one per test set).
When several runs decoded the same experiment, set, method and exit, the newest one counts.
"""
import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp_dirs", nargs="+", type=Path, help="experiment directories decoded with decode.py")
    p.add_argument("--out", type=Path, default=Path("exp/report"))
    p.add_argument("--names", type=str, default=None, help="comma list of display names (default: directory names)")
    return p


def load_runs(exp_dir: Path, name: str) -> List[Dict]:
    """Every run recorded under ``exp_dir``, tagged with the experiment's display name."""
    runs = []
    for path in sorted(exp_dir.glob("*/results-*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"compare.py: error: {path} is not valid JSON ({e}); re-run decode.py") from None
        for run in data.get("runs", {}).values():
            runs.append(dict(run, experiment=name))
    return runs


def latest_fixed(runs: Sequence[Dict]) -> Dict[Tuple, Dict]:
    """(experiment, set, method, exit) -> newest fixed-exit run."""
    best: Dict[Tuple, Dict] = {}
    for r in runs:
        if r.get("kind") != "fixed":
            continue
        key = (r["experiment"], r["test_set"], _method(r), r["exit_layer"])
        if key not in best or r.get("written", 0) >= best[key].get("written", 0):
            best[key] = r
    return best


def _method(r: Dict) -> str:
    m = r["method"]
    return f"{m} (beam {r['beam']})" if m in ("modified_beam_search", "ctc_prefix_beam_search") else m


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(runs: Sequence[Dict]) -> List[str]:
    fixed = latest_fixed(runs)
    lines = ["# Results", ""]
    sets = sorted({k[1] for k in fixed} | {r["test_set"] for r in runs if "test_set" in r})
    for s in sets:
        lines += [f"## {s}", "", "| experiment | method | exit layer | WER % | RTF encoder | RTF decode | encoder MMACs/s | params (M) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for (exp, ts, method, layer), r in sorted(fixed.items()):
            if ts != s:
                continue
            lines.append(f"| {exp} | {method} | {layer} | {r['wer']:.2f} | {_num(r.get('rtf_encoder'), '.4f')} | "
                         f"{_num(r.get('rtf_decode'), '.4f')} | {_num(_mmacs(r.get('macs_per_second')), '.1f')} | "
                         f"{r.get('params', 0) / 1e6:.2f} |")
        dyn = [r for r in runs if r.get("kind") == "dynamic" and r["test_set"] == s]
        if dyn:
            lines += ["", "Dynamic exits (one exit per utterance):", "",
                      "| experiment | method | strategy | threshold | WER % | mean exit layer | mean encoder MMACs/s |",
                      "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
            for r in sorted(dyn, key=lambda r: (r["experiment"], r["strategy"], r["threshold"])):
                lines.append(f"| {r['experiment']} | {_method(r)} | {r['strategy']} | {r['threshold']:.4g} | {r['wer']:.2f} | "
                             f"{r['mean_exit_layer']:.2f} | {_num(_mmacs(r['macs_per_second']), '.1f')} |")
        sweeps = [r for r in runs if r.get("kind") == "dynamic-sweep" and r["test_set"] == s]
        for r in sweeps:
            lines += ["", f"Dynamic-exit sweep, {r['experiment']}, {_method(r)} (WER % at mean exit layer / MMACs/s):", ""]
            for strategy, rows in sorted(r["curves"].items()):
                pts = ", ".join(f"{p['wer']:.1f} @ {p['mean_exit_layer']:.1f} / {_mmacs(p['macs_per_second']):.1f}" for p in rows)
                lines.append(f"- {strategy}: {pts}")
        lines += ["", f"![WER against exit layer and compute](wer-{s}.png)", ""]
    return lines


def _mmacs(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1e6


def plot(runs: Sequence[Dict], test_set: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = latest_fixed(runs)
    series: Dict[Tuple[str, str], List[Dict]] = defaultdict(list)
    for (exp, ts, method, _), r in fixed.items():
        if ts == test_set:
            series[(exp, method)].append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (exp, method), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["exit_layer"])
        label = f"{exp} / {method}"
        ax1.plot([r["exit_layer"] for r in rs], [r["wer"] for r in rs], marker="o", label=label)
        if all(r.get("macs_per_second") for r in rs):
            ax2.plot([r["macs_per_second"] / 1e6 for r in rs], [r["wer"] for r in rs], marker="o", label=label)
    for r in runs:
        if r.get("kind") == "dynamic-sweep" and r["test_set"] == test_set:
            for strategy, rows in sorted(r["curves"].items()):
                rows = sorted(rows, key=lambda p: p["macs_per_second"])
                ax2.plot([p["macs_per_second"] / 1e6 for p in rows], [p["wer"] for p in rows], linestyle="--",
                         marker=".", label=f"{r['experiment']} / {_method(r)} / dynamic {strategy}")
        if r.get("kind") == "dynamic" and r["test_set"] == test_set:
            ax2.scatter([r["macs_per_second"] / 1e6], [r["wer"]], marker="x", color="black")
    ax1.set_xlabel("exit layer")
    ax1.set_ylabel("WER (%)")
    ax1.set_title(f"{test_set}: WER by exit")
    ax2.set_xlabel("encoder MMACs per second of audio")
    ax2.set_ylabel("WER (%)")
    ax2.set_title(f"{test_set}: WER against compute")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    handles, labels = ax2.get_legend_handles_labels()
    if handles:
        ax2.legend(fontsize=7)
    elif ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tsv(runs: Sequence[Dict]) -> List[str]:
    out = ["experiment\ttest_set\tmethod\texit_layer\twer\trtf_encoder\trtf_decode\tmacs_per_second\tparams"]
    for (exp, ts, method, layer), r in sorted(latest_fixed(runs).items()):
        out.append(f"{exp}\t{ts}\t{method}\t{layer}\t{r['wer']:.4f}\t{r.get('rtf_encoder')}\t{r.get('rtf_decode')}\t"
                   f"{r.get('macs_per_second')}\t{r.get('params')}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    names = args.names.split(",") if args.names else [d.name for d in args.exp_dirs]
    if len(names) != len(args.exp_dirs):
        print(f"compare.py: error: {len(names)} names for {len(args.exp_dirs)} directories", file=sys.stderr)
        return 2
    runs: List[Dict] = []
    for d, n in zip(args.exp_dirs, names):
        if not d.is_dir():
            print(f"compare.py: error: {d} is not a directory", file=sys.stderr)
            return 2
        found = load_runs(d, n)
        if not found:
            print(f"compare.py: warning: no results-*.json under {d}/*/ (run decode.py first)", file=sys.stderr)
        runs += found
    if not runs:
        print("compare.py: error: no results to compare", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(markdown(runs)) + "\n")
    (args.out / "results.tsv").write_text("\n".join(tsv(runs)) + "\n")
    for s in sorted({r["test_set"] for r in runs}):
        plot(runs, s, args.out / f"wer-{s}.png")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
