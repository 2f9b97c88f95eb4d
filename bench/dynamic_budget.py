#!/usr/bin/env python3
"""The README's table of dynamic exits at a compute budget, with costs that count everything: every criterion,
read from the CTC heads and from the transducer, with and without blank frames in the score.

    python bench/dynamic_budget.py --exp-dir exp/splitformer-cpu --epoch 12 --avg 4 --use-averaged-model \\
        --budget-macs 50e6

For each criterion and reader it runs decode.py twice on test, every threshold chosen on dev before test is
decoded: ``--exit-budget-macs`` (the lowest dev WER within the budget), and the cheapest threshold whose dev WER is
no worse than the last exit's on dev (``iso-WER``, read off a dev sweep). Costs are MACs per second of audio: the
encoder up to each utterance's exit plus the criterion at every exit it was scored at (the last exit is never
scored). Prints a markdown table with the fixed exits beside, and the dev figures behind every choice.
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from splitformer.compare import checkpoint_of  # noqa: E402
from splitformer.decoding.cli import add_checkpoint_arguments  # noqa: E402


def decode(args, *extra: str) -> None:
    cmd = [sys.executable, str(REPO / "splitformer" / "decode.py"), "--exp-dir", str(args.exp_dir), "--epoch",
           str(args.epoch), "--avg", str(args.avg), *(["--use-averaged-model"] if args.use_averaged_model else []),
           "--max-duration", str(args.max_duration), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"decode.py {' '.join(extra)} failed:\n{r.stderr[-3000:]}")


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
    rows: List[str] = []
    for scorer in ("transducer", "ctc"):
        for blank in blanks:
            common = ["--exit-scorer", scorer, "--exit-count-blank", blank]
            decode(args, "--exit-threshold", "sweep", "--test-sets", "dev", *common)
            sweep = next(r for r in runs(args, "dev").values() if r["kind"] == "dynamic-sweep"
                         and r["scorer"] == scorer and r.get("count_blank", True) == (blank == "true"))
            for strategy in ("confidence", "entropy", "posterior"):
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
                rows.append(f"| {strategy} | {scorer} | {'all' if blank == 'true' else 'tokens'} | "
                            f"{b['wer']:.2f} | {b['macs_per_second'] / 1e6:.1f} | {b['mean_exit_layer']:.2f} | "
                            f"{b['dev_wer']:.2f} | {iso['wer']:.2f} | {iso['macs_per_second'] / 1e6:.1f} "
                            f"({100 * iso['macs_per_second'] / fixed['test'][last]['macs_per_second']:.0f} %) | "
                            f"{pick['wer']:.2f} |")
                print(rows[-1], flush=True)
    print()
    print(f"{args.exp_dir} epoch {args.epoch} avg {args.avg}{' averaged' if args.use_averaged_model else ''}; "
          f"budget {args.budget_macs / 1e6:g} M MACs/s; last exit {last}: dev {fixed['dev'][last]['wer']:.2f} %, "
          f"test {fixed['test'][last]['wer']:.2f} % at {fixed['test'][last]['macs_per_second'] / 1e6:.1f} M")
    print("| criterion | read from | frames | test WER at budget | MMACs/s | mean exit | dev WER at budget | "
          "test WER iso-WER | MMACs/s iso-WER (of last exit) | dev WER iso-WER |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("| fixed exits (test WER, MMACs/s) | | | " + "; ".join(
        f"{e}: {r['wer']:.2f}, {r['macs_per_second'] / 1e6:.1f}" for e, r in sorted(fixed["test"].items())) + " |")
    if not all(math.isfinite(r["wer"]) for r in fixed["test"].values()):
        raise SystemExit("a fixed exit has no WER")


if __name__ == "__main__":
    main()
