#!/usr/bin/env python3
"""The README's table of dynamic exits at a compute budget, with costs that count everything: every criterion,
read from the CTC heads and from the transducer, with and without blank frames in the score.

    python bench/dynamic_budget.py --exp-dir exp/splitformer-cpu --epoch 12 --avg 4 --use-averaged-model \\
        --budget-macs 50e6

For each criterion and reader it runs decode.py twice on test, every threshold chosen on dev before test is
decoded: ``--exit-budget-macs`` (the lowest dev WER within the budget), and the cheapest threshold whose dev WER is
no worse than the last exit's on dev (``iso-WER``, read off a dev sweep). Costs are MACs per second of audio: the
encoder up to each utterance's exit plus the criterion at every exit it was scored at (the last exit is never
scored). Prints a markdown table with the fixed exits beside, the dev figures behind every choice, and each
row against the fixed exit it should beat (at budget: the cheapest that costs at least as much; iso-WER: the last
exit) with its interval over speakers, Holm-corrected over the rows.
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from splitformer.compare import checkpoint_of, difference_test, holm  # noqa: E402
from splitformer.decoding.cli import add_checkpoint_arguments  # noqa: E402


def decode(args, *extra: str) -> None:
    cmd = [sys.executable, str(REPO / "splitformer" / "decode.py"), "--exp-dir", str(args.exp_dir), "--epoch",
           str(args.epoch), "--avg", str(args.avg), *(["--use-averaged-model"] if args.use_averaged_model else []),
           "--max-duration", str(args.max_duration), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"decode.py {' '.join(extra)} failed:\n{r.stderr[-3000:]}")


def at_cost(fixed: Dict[int, dict], macs: float) -> Optional[dict]:
    """The fixed exit a dynamic run should beat: the cheapest that costs at least what it spent."""
    dearer = [r for r in fixed.values() if r["macs_per_second"] >= macs]
    return min(dearer, key=lambda r: r["macs_per_second"]) if dearer else None


def describe(test: Optional[dict], p_holm: Optional[float]) -> str:
    """'+1.23 [-0.5, +3.0], Holm p 0.42' (or the reason there is no interval)."""
    if test is None:
        return "-"
    if test["ci95"] is None:
        return f"{test['diff']:+.2f} (no interval: {test['speakers']} speaker(s))"
    lo, hi = test["ci95"]
    return f"{test['diff']:+.2f} [{lo:+.1f}, {hi:+.1f}], Holm p {p_holm:.2f}"


def runs(args, test_set: str) -> Dict[str, dict]:
    return json.loads((args.exp_dir / "greedy_search" / f"results-{test_set}.json").read_text())["runs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--budget-macs", type=float, default=50e6)
    p.add_argument("--max-duration", type=float, default=200.0)
    p.add_argument("--count-blank", choices=["true", "false", "both"], default="both")
    args = p.parse_args()
    blanks = ["true", "false"] if args.count_blank == "both" else [args.count_blank]
    decode(args, "--exit-layer", "all", "--test-sets", "dev,test")
    # this checkpoint's fixed exits only: a directory may hold decodes of other averages (run.sh's --avg choice)
    ckpt = checkpoint_of(vars(args))
    fixed = {s: {r["exit_layer"]: r for r in runs(args, s).values()
                 if r["kind"] == "fixed" and r.get("from_sweep") and checkpoint_of(r) == ckpt} for s in ("dev", "test")}
    last = max(fixed["dev"])
    picked: List[dict] = []
    for scorer in ("transducer", "ctc"):
        for blank in blanks:
            common = ["--exit-scorer", scorer, "--exit-count-blank", blank]
            decode(args, "--exit-threshold", "sweep", "--test-sets", "dev", *common)
            sweep = next(r for r in runs(args, "dev").values() if r["kind"] == "dynamic-sweep"
                         and r["scorer"] == scorer and r.get("count_blank", True) == (blank == "true"))
            # the posterior scores N-best hypotheses, not frames: it has one row per reader, not one per blank choice
            strategies = ("confidence", "entropy") + (("posterior",) if blank == blanks[0] else ())
            for strategy in strategies:
                decode(args, "--exit-strategy", strategy, "--exit-budget-macs", repr(args.budget_macs),
                       "--test-sets", "test", "--budget-set", "dev", *common)
                tag_part = f"{strategy}-budget-macs-{args.budget_macs:g}"
                b = next(r for r in runs(args, "test").values() if r["kind"] == "budget" and tag_part in r["tag"]
                         and r["scorer"] == scorer and r.get("count_blank", True) == (blank == "true"))
                # iso-WER: the cheapest dev point no worse than the last exit on dev
                ok = [r for r in sweep["curves"][strategy] if r["wer"] <= fixed["dev"][last]["wer"] + 1e-9]
                pick = min(ok, key=lambda r: r["macs_per_second"])
                thr = "inf" if pick["threshold"] is None else repr(pick["threshold"])
                decode(args, "--exit-strategy", strategy, "--exit-threshold", thr, "--test-sets", "test", *common)
                iso = next(r for r in runs(args, "test").values() if r["kind"] == "dynamic"
                           and r["tag"].split("_exit-")[1].startswith(f"{strategy}-{thr}")
                           and r["scorer"] == scorer and r.get("count_blank", True) == (blank == "true"))
                vs_fixed = at_cost(fixed["test"], b["macs_per_second"])
                picked.append(dict(strategy=strategy, scorer=scorer, blank=blank, budget=b, iso=iso, pick=pick,
                                   vs_fixed=vs_fixed, d_budget=difference_test([b], [vs_fixed]) if vs_fixed else None,
                                   d_iso=difference_test([iso], [fixed["test"][last]])))
                print(f"{strategy} {scorer} count-blank {blank}: test {b['wer']:.2f} at budget, {iso['wer']:.2f} "
                      "at the last exit's dev WER", flush=True)
    print()
    print(f"{args.exp_dir} epoch {args.epoch} avg {args.avg}{' averaged' if args.use_averaged_model else ''}; "
          f"budget {args.budget_macs / 1e6:g} M MACs/s; last exit {last}: dev {fixed['dev'][last]['wer']:.2f} %, "
          f"test {fixed['test'][last]['wer']:.2f} % at {fixed['test'][last]['macs_per_second'] / 1e6:.1f} M")
    print("Differences: test WER minus the fixed exit's, paired two-stage bootstrap over speakers and their "
          "utterances (compare.py), 95 % interval, Holm-corrected over the rows of each column.")
    print("| criterion | read from | frames | test WER at budget | MMACs/s | mean exit | dev WER at budget | "
          "against the fixed exit at that cost | test WER iso-WER | MMACs/s iso-WER (of last exit) | "
          "dev WER iso-WER | against the last exit |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    holm_budget = holm([None if r["d_budget"] is None else r["d_budget"]["p"] for r in picked])
    holm_iso = holm([None if r["d_iso"] is None else r["d_iso"]["p"] for r in picked])
    last_macs = fixed["test"][last]["macs_per_second"]
    for r, hb, hi in zip(picked, holm_budget, holm_iso):
        b, iso = r["budget"], r["iso"]
        vs = "-" if r["vs_fixed"] is None else f"exit {r['vs_fixed']['exit_layer']}: {describe(r['d_budget'], hb)}"
        frames = "-" if r["strategy"] == "posterior" else "all" if r["blank"] == "true" else "tokens"
        print(f"| {r['strategy']} | {r['scorer']} | {frames} | "
              f"{b['wer']:.2f} | {b['macs_per_second'] / 1e6:.1f} | {b['mean_exit_layer']:.2f} | {b['dev_wer']:.2f} | "
              f"{vs} | {iso['wer']:.2f} | {iso['macs_per_second'] / 1e6:.1f} "
              f"({100 * iso['macs_per_second'] / last_macs:.0f} %) | {r['pick']['wer']:.2f} | "
              f"{describe(r['d_iso'], hi)} |")
    print("| fixed exits (test WER, MMACs/s) | | | " + "; ".join(
        f"{e}: {r['wer']:.2f}, {r['macs_per_second'] / 1e6:.1f}" for e, r in sorted(fixed["test"].items())) + " |")
    if not all(math.isfinite(r["wer"]) for r in fixed["test"].values()):
        raise SystemExit("a fixed exit has no WER")


if __name__ == "__main__":
    main()
