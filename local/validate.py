#!/usr/bin/env python3
"""Stage 5: check every cut that training will see, and leave out (and report) the bad ones.

A cut passes when it has positive duration, a non-empty transcript, 16 kHz audio and 80-dim features
whose values are all finite. Failures go to `<data-dir>/<split>_rejected.txt` and the split's fbank
manifest is rewritten without them. Exit status 2 if a split ends up empty.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from lhotse import CutSet
from tqdm import tqdm

from prep_utils import SAMPLING_RATE, atomic_to_file, die_empty, existing_cuts, record_rejects, setup_logging

log = logging.getLogger("prepare")
NUM_MEL_BINS = 80


def check_cut(cut) -> Optional[str]:
    """The reason this cut is unusable, or None."""
    if cut.duration <= 0:
        return f"non-positive duration {cut.duration}"
    texts = [s.text for s in cut.supervisions if s.text and s.text.strip()]
    if not texts:
        return "empty transcript"
    if cut.has_recording and cut.sampling_rate != SAMPLING_RATE:
        return f"sampling rate {cut.sampling_rate} Hz, expected {SAMPLING_RATE}"
    if not cut.has_features:
        return "no features (stage 3 did not run for it)"
    try:
        feats = cut.load_features()
    except Exception as e:
        return f"features do not load from {cut.features.storage_path}: {type(e).__name__}: {e}"
    if feats.ndim != 2 or feats.shape[1] != NUM_MEL_BINS or feats.shape[0] == 0:
        return f"features have shape {tuple(feats.shape)}, expected (T>0, {NUM_MEL_BINS})"
    if not np.isfinite(feats).all():
        return f"features hold {int((~np.isfinite(feats)).sum())} non-finite values"
    return None


def validate(cuts: CutSet) -> Tuple[CutSet, List[Tuple[str, str]]]:
    good, rejects = [], []
    for cut in tqdm(cuts, desc="validating", mininterval=2):
        reason = check_cut(cut)
        if reason is None:
            good.append(cut)
        else:
            rejects.append((cut.id, reason))
    return CutSet.from_cuts(good), rejects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--fbank-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    args = p.parse_args()
    setup_logging()
    for split in args.splits:
        path = existing_cuts(args.fbank_dir, args.dataset, split, "stage 3")
        cuts = CutSet.from_file(path).to_eager()
        good, rejects = validate(cuts)
        record_rejects(args.data_dir, split, rejects)
        if len(good) == 0:
            die_empty(f"{args.dataset} {split}: every cut failed validation (see {split}_rejected.txt)")
        if rejects:
            atomic_to_file(good, path)
        log.info("%s %s: %d cuts valid, %d rejected", args.dataset, split, len(good), len(rejects))


if __name__ == "__main__":
    main()
