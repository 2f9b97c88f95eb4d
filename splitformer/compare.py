#!/usr/bin/env python3
"""Compare decoding results of several experiments (e.g. Zipformer baseline, early-exit baseline,
Splitformer): a markdown table and plots of WER against exit layer and against encoder compute.

    ./splitformer/compare.py exp/zipformer-cpu exp/ee-zipformer-cpu exp/splitformer-cpu --out exp/report

Reads ``<exp-dir>/<decoding-method>/results-<set>.json`` as decode.py writes them and writes
``<out>/report.md``, ``<out>/results.tsv``, ``<out>/results.json`` and ``<out>/wer-<set>.png`` (one per
test set). When several runs decoded the same experiment, set, method and exit, the newest one counts.

Seeds: directories given the same display name (``--names``) are seeds of one system; its WER is the
mean over seeds. Every WER gets a 95 % bootstrap interval that resamples utterances (and, with several
seeds, seeds), and every pair of systems is compared at each exit they share with a paired bootstrap of
the difference: a difference whose interval holds 0 is marked as inside the noise.
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
    p.add_argument("--names", type=str, default=None,
                   help="comma list of display names (default: directory names); a name given to several "
                        "directories makes them seeds of one system")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the 95%% intervals")
    p.add_argument("--wall-seconds", type=float, default=None,
                   help="wall time of the job that produced the results, stored in results.json")
    return p


# ------------------------------------------------------------------------------------------- statistics
def _error_table(seed_runs: Sequence[Dict], utts: Sequence[str]):
    """(seeds, utterances) arrays of word errors and reference words, in the order of ``utts``."""
    import numpy as np

    errs = np.array([[r["utt_errors"][u][0] for u in utts] for r in seed_runs], dtype=np.float64)
    refs = np.array([[r["utt_errors"][u][1] for u in utts] for r in seed_runs], dtype=np.float64)
    return errs, refs


def _draws(n_seeds: int, n_utts: int, draws: int, seed: int = 0):
    """Bootstrap index draws: seeds (only resampled when there are several) and utterances."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, n_seeds, size=(draws, n_seeds)) if n_seeds > 1 else np.zeros((draws, 1), dtype=int)
    u_idx = rng.integers(0, n_utts, size=(draws, n_utts))
    return s_idx, u_idx


def _boot_wer(errs, refs, s_idx, u_idx):
    """WER (%) of each bootstrap draw: mean over the drawn seeds of corpus WER on the drawn utterances."""
    import numpy as np

    e = errs[:, u_idx].sum(axis=2)  # (seeds, draws)
    r = refs[:, u_idx].sum(axis=2)
    per_seed = 100.0 * e / np.maximum(r, 1.0)
    return np.take_along_axis(per_seed.T, s_idx, axis=1).mean(axis=1)


def common_utts(runs: Sequence[Dict]) -> Optional[List[str]]:
    """Utterance ids that every run scored (None if a run has no per-utterance errors: old results)."""
    if not runs or any("utt_errors" not in r for r in runs):
        return None
    ids = set(runs[0]["utt_errors"])
    for r in runs[1:]:
        ids &= set(r["utt_errors"])
    return sorted(ids)


def wer_interval(seed_runs: Sequence[Dict], draws: int = 1000) -> Optional[Tuple[float, float]]:
    """95 % bootstrap interval of a system's mean WER over utterances (and seeds)."""
    import numpy as np

    utts = common_utts(seed_runs)
    if not utts or draws <= 0:
        return None
    errs, refs = _error_table(seed_runs, utts)
    s_idx, u_idx = _draws(len(seed_runs), len(utts), draws)
    lo, hi = np.percentile(_boot_wer(errs, refs, s_idx, u_idx), [2.5, 97.5])
    return float(lo), float(hi)


def difference_interval(a: Sequence[Dict], b: Sequence[Dict], draws: int = 1000) -> Optional[Tuple[float, float, float]]:
    """(mean WER of a - b, 95 % low, high) by a paired bootstrap over the utterances both scored."""
    import numpy as np

    utts = common_utts(list(a) + list(b))
    if not utts or draws <= 0:
        return None
    ea, ra = _error_table(a, utts)
    eb, rb = _error_table(b, utts)
    sa, u_idx = _draws(len(a), len(utts), draws, seed=1)
    sb, _ = _draws(len(b), len(utts), draws, seed=2)
    diff = _boot_wer(ea, ra, sa, u_idx) - _boot_wer(eb, rb, sb, u_idx)
    point = float(np.mean([_corpus_wer(r, utts) for r in a]) - np.mean([_corpus_wer(r, utts) for r in b]))
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return point, float(lo), float(hi)


def _corpus_wer(run: Dict, utts: Sequence[str]) -> float:
    e = sum(run["utt_errors"][u][0] for u in utts)
    r = sum(run["utt_errors"][u][1] for u in utts)
    return 100.0 * e / max(r, 1)


def group_seeds(fixed: Dict[Tuple, Dict]) -> Dict[Tuple, List[Dict]]:
    """(system, set, method, exit) -> the runs of its seeds (experiments of one display name)."""
    out: Dict[Tuple, List[Dict]] = defaultdict(list)
    for (exp, ts, method, layer, _), r in sorted(fixed.items()):
        out[(exp, ts, method, layer)].append(r)
    return out


def load_runs(exp_dir: Path, name: str) -> List[Dict]:
    """Every run recorded under ``exp_dir``, tagged with the experiment's display name."""
    runs = []
    for path in sorted(exp_dir.glob("*/results-*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"compare.py: error: {path} is not valid JSON ({e}); re-run decode.py") from None
        for run in data.get("runs", {}).values():
            runs.append(dict(run, experiment=name, source=str(exp_dir)))
    return runs


def latest_fixed(runs: Sequence[Dict]) -> Dict[Tuple, Dict]:
    """(experiment, set, method, exit, source directory) -> newest fixed-exit run."""
    best: Dict[Tuple, Dict] = {}
    for r in runs:
        if r.get("kind") != "fixed":
            continue
        key = (r["experiment"], r["test_set"], _method(r), r["exit_layer"], r.get("source", r["experiment"]))
        if key not in best or r.get("written", 0) >= best[key].get("written", 0):
            best[key] = r
    return best


def fixed_at_cost(runs: Sequence[Dict], dyn: Dict) -> Optional[Dict]:
    """The fixed exit a dynamic run should beat: of the same experiment, set and decode (search and chunking),
    the cheapest whose MACs per second are at least what the dynamic run spent (the newest run of each exit)."""
    same = [r for k, r in latest_fixed(runs).items()
            if k[:3] == (dyn["experiment"], dyn["test_set"], _method(dyn)) and k[4] == dyn.get("source", dyn["experiment"])
            and r.get("macs_per_second") is not None]
    dearer = [r for r in same if r["macs_per_second"] >= (dyn.get("achieved_cost") or dyn.get("macs_per_second") or 0)]
    return min(dearer, key=lambda r: r["macs_per_second"]) if dearer else None


def _method(r: Dict) -> str:
    """How a run decoded: the search (and beam), and for a causal model its chunks, streamed or simulated."""
    m = r["method"]
    label = f"{m} (beam {r['beam']})" if m in ("modified_beam_search", "ctc_prefix_beam_search") else m
    if r.get("chunk_size"):
        how = "streaming" if r.get("streaming") else "simulated"
        left = r.get("left_context_ms")
        label += f", {how} {r['chunk_ms']:g} ms chunks, " + ("all left" if left is None or left < 0 else f"{left / 1000:g} s left")
    return label


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summarize(runs: Sequence[Dict], draws: int = 1000) -> Dict[Tuple, Dict]:
    """(system, set, method, exit) -> mean WER over seeds, its 95 % interval, per-seed WERs and costs."""
    import numpy as np

    out: Dict[Tuple, Dict] = {}
    for key, seed_runs in group_seeds(latest_fixed(runs)).items():
        first = seed_runs[0]
        out[key] = dict(
            wer=float(np.mean([r["wer"] for r in seed_runs])),
            wer_per_seed=[r["wer"] for r in seed_runs],
            ci95=wer_interval(seed_runs, draws),
            seeds=len(seed_runs),
            runs=seed_runs,
            macs_per_second=first.get("macs_per_second"),
            rtf_encoder=float(np.mean([r.get("rtf_encoder", math.nan) for r in seed_runs])),
            rtf_decode=float(np.mean([r.get("rtf_decode", math.nan) for r in seed_runs])),
            params=first.get("params", 0),
        )
    return out


def differences(summary: Dict[Tuple, Dict], draws: int = 1000) -> List[Dict]:
    """Every pair of systems at every (set, method, exit) they share: the WER difference and its interval."""
    by_point: Dict[Tuple, List[str]] = defaultdict(list)
    for (exp, ts, method, layer) in summary:
        by_point[(ts, method, layer)].append(exp)
    out = []
    for (ts, method, layer), exps in sorted(by_point.items()):
        for i, a in enumerate(exps):
            for b in exps[i + 1:]:
                d = difference_interval(summary[(a, ts, method, layer)]["runs"], summary[(b, ts, method, layer)]["runs"], draws)
                if d is None:
                    continue
                out.append(dict(test_set=ts, method=method, exit_layer=layer, a=a, b=b, diff=d[0], ci95=[d[1], d[2]],
                                significant=not (d[1] <= 0.0 <= d[2])))
    return out


def streaming_ratios(summary: Dict[Tuple, Dict], draws: int = 1000) -> List[Dict]:
    """What streaming costs a causal model: at each exit, the WER of every chunked run (streamed or simulated)
    over the same system's full-context WER with the same search, with a 95 % interval from a paired bootstrap
    over the utterances both decoded."""
    import numpy as np

    out = []
    for (exp, ts, method, layer), r in sorted(summary.items()):
        run = r["runs"][0]
        if not run.get("chunk_size"):
            continue
        base_method = method.split(", ")[0]  # the search without the chunking
        base = summary.get((exp, ts, base_method, layer))
        if base is None:
            continue
        a, b = r["runs"], base["runs"]
        utts = common_utts(list(a) + list(b))
        ci = None
        if utts and draws > 0:
            ea, ra = _error_table(a, utts)
            eb, rb = _error_table(b, utts)
            sa, u_idx = _draws(len(a), len(utts), draws, seed=3)
            sb, _ = _draws(len(b), len(utts), draws, seed=4)
            ratio = _boot_wer(ea, ra, sa, u_idx) / np.maximum(_boot_wer(eb, rb, sb, u_idx), 1e-9)
            ci = [float(v) for v in np.percentile(ratio, [2.5, 97.5])]
        out.append(dict(experiment=exp, test_set=ts, method=method, exit_layer=layer, wer=r["wer"],
                        full_context_wer=base["wer"], ratio=r["wer"] / max(base["wer"], 1e-9), ci95=ci))
    return out


def _ci(ci: Optional[Sequence[float]]) -> str:
    return "-" if not ci else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def markdown(runs: Sequence[Dict], summary: Dict[Tuple, Dict], diffs: Sequence[Dict],
             ratios: Sequence[Dict] = ()) -> List[str]:
    lines = ["# Results", "",
             "WER is the mean over seeds; the interval is a 95 % bootstrap over utterances (and seeds).", ""]
    sets = sorted({k[1] for k in summary} | {r["test_set"] for r in runs if "test_set" in r})
    for s in sets:
        lines += [f"## {s}", "", "| experiment | method | exit layer | WER % | 95 % interval | seeds | RTF encoder | RTF decode | "
                  "encoder MMACs/s | params (M) |",
                  "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for (exp, ts, method, layer), r in sorted(summary.items()):
            if ts != s:
                continue
            lines.append(f"| {exp} | {method} | {layer} | {r['wer']:.2f} | {_ci(r['ci95'])} | {r['seeds']} | "
                         f"{_num(r['rtf_encoder'], '.4f')} | {_num(r['rtf_decode'], '.4f')} | "
                         f"{_num(_mmacs(r['macs_per_second']), '.1f')} | {r['params'] / 1e6:.2f} |")
        ds = [d for d in diffs if d["test_set"] == s]
        if ds:
            lines += ["", "Differences at equal exit layer (A - B, paired bootstrap; *inside the noise* when the "
                      "interval holds 0):", "",
                      "| method | exit layer | A | B | WER A - B | 95 % interval | verdict |",
                      "| --- | ---: | --- | --- | ---: | --- | --- |"]
            for d in ds:
                verdict = ("A better" if d["diff"] < 0 else "B better") if d["significant"] else "inside the noise"
                lines.append(f"| {d['method']} | {d['exit_layer']} | {d['a']} | {d['b']} | {d['diff']:+.2f} | "
                             f"{_ci(d['ci95'])} | {verdict} |")
        rs = [r for r in ratios if r["test_set"] == s]
        if rs:
            lines += ["", "What streaming costs (chunked WER over the same model's full-context WER, paired bootstrap):", "",
                      "| experiment | method | exit layer | WER % | full context WER % | ratio | 95 % interval |",
                      "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
            for r in rs:
                ci = "-" if not r["ci95"] else f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
                lines.append(f"| {r['experiment']} | {r['method']} | {r['exit_layer']} | {r['wer']:.2f} | "
                             f"{r['full_context_wer']:.2f} | {r['ratio']:.2f} | {ci} |")
        dyn = [r for r in runs if r.get("kind") == "dynamic" and r["test_set"] == s]
        if dyn:
            lines += ["", "Dynamic exits (one exit per utterance, or per chunk of a stream):", "",
                      "| experiment | method | per | strategy | threshold | WER % | mean exit layer | mean MMACs/s |",
                      "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
            for r in sorted(dyn, key=lambda r: (r["experiment"], r["strategy"], r["threshold"])):
                lines.append(f"| {r['experiment']} | {_method(r)} | {r.get('per', 'utterance')} | {r['strategy']} | "
                             f"{r['threshold']:.4g} | {r['wer']:.2f} | {r['mean_exit_layer']:.2f} | "
                             f"{_num(_mmacs(r['macs_per_second']), '.1f')} |")
        budgets = [r for r in runs if r.get("kind") == "budget" and r["test_set"] == s]
        if budgets:
            lines += ["", f"Compute budgets (threshold chosen on the budget set, then applied to {s}; against the "
                      "cheapest fixed exit of the same decode that costs at least as much, paired bootstrap):", "",
                      "| experiment | method | strategy | scorer | budget | threshold | WER % on budget set | WER % | "
                      "cost reached | mean exit layer | fixed exit (WER %, MMACs/s) | WER - fixed | 95 % interval |",
                      "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
            for r in sorted(budgets, key=lambda r: (r["experiment"], r["strategy"], r.get("scorer", "ctc"),
                                                    r["budget_kind"], r["budget"])):
                f = fixed_at_cost(runs, r)
                d = difference_interval([r], [f]) if f is not None else None
                vs = "-" if f is None else f"{f['exit_layer']} ({f['wer']:.2f}, {_num(_mmacs(f['macs_per_second']), '.1f')})"
                lines.append(f"| {r['experiment']} | {_method(r)} | {r['strategy']} | {r.get('scorer', 'ctc')} | "
                             f"{r['budget_kind']} {r['budget']:.4g} | "
                             f"{r['threshold']:.4g} | {r['dev_wer']:.2f} ({r['budget_set']}) | {r['wer']:.2f} | "
                             f"{r['achieved_cost']:.4g} | {r['mean_exit_layer']:.2f} | {vs} | "
                             f"{'-' if d is None else f'{d[0]:+.2f}'} | {'-' if d is None else _ci(d[1:])} |")
        sweeps = [r for r in runs if r.get("kind") == "dynamic-sweep" and r["test_set"] == s]
        for r in sweeps:
            lines += ["", f"Dynamic-exit sweep, {r['experiment']}, {_method(r)}, criteria read from the "
                      f"{r.get('scorer', 'ctc')} outputs (WER % at mean exit layer / MMACs/s):", ""]
            for strategy, rows in sorted(r["curves"].items()):
                pts = ", ".join(f"{p['wer']:.1f} @ {p['mean_exit_layer']:.1f} / {_mmacs(p['macs_per_second']):.1f}" for p in rows)
                lines.append(f"- {strategy}: {pts}")
        lines += ["", f"![WER against exit layer and compute](wer-{s}.png)", ""]
    return lines


def results_json(summary: Dict[Tuple, Dict], diffs: Sequence[Dict], wall_seconds: Optional[float]) -> Dict:
    """The machine-readable results: models -> test set -> exit layer -> WER, interval, compute."""
    models: Dict[str, Dict] = defaultdict(lambda: defaultdict(dict))
    for (exp, ts, method, layer), r in sorted(summary.items()):
        key = ts if len({k[2] for k in summary if k[0] == exp and k[1] == ts}) == 1 else f"{ts}/{method}"
        models[exp][key][str(layer)] = dict(wer=r["wer"], ci95=list(r["ci95"]) if r["ci95"] else None,
                                            macs_per_second=r["macs_per_second"], seeds=r["seeds"],
                                            wer_per_seed=r["wer_per_seed"], method=method)
    return {"wall_seconds": wall_seconds, "models": {m: dict(v) for m, v in models.items()}, "differences": list(diffs)}


def _mmacs(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1e6


def plot(runs: Sequence[Dict], summary: Dict[Tuple, Dict], test_set: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[Tuple[str, str], List[Dict]] = defaultdict(list)
    for (exp, ts, method, layer), r in summary.items():
        if ts == test_set:
            series[(exp, method)].append(dict(r, exit_layer=layer))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (exp, method), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["exit_layer"])
        label = f"{exp} / {method}"
        wer = [r["wer"] for r in rs]
        err = None
        if all(r["ci95"] for r in rs):  # asymmetric error bars from the bootstrap interval
            err = [[w - r["ci95"][0] for w, r in zip(wer, rs)], [r["ci95"][1] - w for w, r in zip(wer, rs)]]
        ax1.errorbar([r["exit_layer"] for r in rs], wer, yerr=err, marker="o", capsize=3, label=label)
        if all(r.get("macs_per_second") for r in rs):
            ax2.errorbar([r["macs_per_second"] / 1e6 for r in rs], wer, yerr=err, marker="o", capsize=3, label=label)
    for r in runs:
        if r.get("kind") == "dynamic-sweep" and r["test_set"] == test_set:
            for strategy, rows in sorted(r["curves"].items()):
                rows = sorted(rows, key=lambda p: p["macs_per_second"])
                ax2.plot([p["macs_per_second"] / 1e6 for p in rows], [p["wer"] for p in rows], linestyle="--",
                         marker=".", label=f"{r['experiment']} / {_method(r)} / dynamic {strategy} ({r.get('scorer', 'ctc')})")
        if r.get("kind") == "dynamic" and r["test_set"] == test_set:
            ax2.scatter([r["macs_per_second"] / 1e6], [r["wer"]], marker="x", color="black")
        if r.get("kind") == "budget" and r["test_set"] == test_set:
            ax2.scatter([r["macs_per_second"] / 1e6], [r["wer"]], marker="*", s=120, color="red", zorder=5,
                        label=f"{r['experiment']} / budget {r['budget_kind']} {r['budget']:.3g} ({r['strategy']})")
            if r["budget_kind"] == "macs":
                ax2.axvline(r["budget"] / 1e6, color="red", linestyle=":", linewidth=1)
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


def tsv(summary: Dict[Tuple, Dict]) -> List[str]:
    out = ["experiment\ttest_set\tmethod\texit_layer\twer\tci95_low\tci95_high\tseeds\trtf_encoder\trtf_decode\t"
           "macs_per_second\tparams"]
    for (exp, ts, method, layer), r in sorted(summary.items()):
        lo, hi = r["ci95"] or (None, None)
        out.append(f"{exp}\t{ts}\t{method}\t{layer}\t{r['wer']:.4f}\t{lo}\t{hi}\t{r['seeds']}\t{r['rtf_encoder']}\t"
                   f"{r['rtf_decode']}\t{r['macs_per_second']}\t{r['params']}")
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
    summary = summarize(runs, args.bootstrap)
    diffs = differences(summary, args.bootstrap)
    ratios = streaming_ratios(summary, args.bootstrap)
    (args.out / "report.md").write_text("\n".join(markdown(runs, summary, diffs, ratios)) + "\n")
    (args.out / "results.tsv").write_text("\n".join(tsv(summary)) + "\n")
    (args.out / "results.json").write_text(json.dumps(dict(results_json(summary, diffs, args.wall_seconds),
                                                           streaming_ratios=ratios), indent=1) + "\n")
    for s in sorted({r["test_set"] for r in runs}):
        plot(runs, summary, s, args.out / f"wer-{s}.png")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
