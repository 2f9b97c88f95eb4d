#!/usr/bin/env python3
"""Stage 2 (optional): add 0.9x and 1.1x speed-perturbed copies of the training cuts.

Writes `<dataset>_cuts_<split>_sp.jsonl.gz` next to the input; stage 3 extracts features from it instead
of the plain training cuts. Perturbation is lazy (lhotse transform, pure torch resampler), so no audio is copied.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lhotse import CutSet

from prep_utils import atomic_to_file, existing_cuts, setup_logging

log = logging.getLogger("prepare")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--factors", type=float, nargs="+", default=[0.9, 1.1])
    args = p.parse_args()
    setup_logging()
    for split in args.splits:
        src = existing_cuts(args.manifest_dir, args.dataset, split, "stage 1")
        cuts = CutSet.from_file(src)
        out = cuts
        for f in args.factors:
            out = out + cuts.perturb_speed(f)
        atomic_to_file(out.to_eager(), args.manifest_dir / f"{args.dataset}_cuts_{split}_sp.jsonl.gz")
        log.info("%s %s: %d cuts -> %d with speed factors %s", args.dataset, split, len(cuts), len(out), args.factors)


if __name__ == "__main__":
    main()
