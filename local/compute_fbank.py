#!/usr/bin/env python3
"""Stage 3: 80-dim log-mel fbank (lhotse `Fbank`, kaldi-compatible, pure torch) for every split.

Reads `<manifest-dir>/<dataset>_cuts_<split>[_sp].jsonl.gz` and writes the cuts with features to
`<fbank-dir>/<dataset>_cuts_<split>.jsonl.gz`, the matrices to `<fbank-dir>/<dataset>_feats_<split>`
(LilcomChunkyWriter). A split is redone from scratch so a crash never leaves a half-filled archive in use.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import List, Tuple

import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter

from prep_utils import add_repo_to_path, atomic_to_file, die_empty, record_rejects, setup_logging

add_repo_to_path()
from splitformer.data import use_soundfile_for_sphere  # noqa: E402

log = logging.getLogger("prepare")
NUM_MEL_BINS = 80


def compute_split(src: Path, dst: Path, storage: Path, num_jobs: int) -> Tuple[int, List[Tuple[str, str]]]:
    """Extract features for one split; return (cuts written, rejects for the cuts lhotse dropped)."""
    cuts = CutSet.from_file(src)
    for p in (storage, storage.with_suffix(".lca")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    extractor = Fbank(FbankConfig(num_mel_bins=NUM_MEL_BINS))
    with_feats = cuts.compute_and_store_features(
        extractor=extractor,
        storage_path=storage,
        num_jobs=num_jobs if num_jobs > 1 else None,
        storage_type=LilcomChunkyWriter,
        progress_bar=True,
    )
    with_feats = with_feats.to_eager()
    # lhotse logs and skips a cut whose audio fails to load: turn that into a reported reject
    done = set(with_feats.ids)
    rejects = [
        (c.id, f"feature extraction failed (audio {c.recording.sources[0].source} did not load; see log above)")
        for c in cuts
        if c.id not in done
    ]
    atomic_to_file(with_feats, dst)
    return len(with_feats), rejects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--sp-splits", nargs="*", default=[], help="splits to take from the *_sp (speed-perturbed) cuts")
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--fbank-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="where <split>_rejected.txt go")
    p.add_argument("--num-jobs", type=int, default=1)
    args = p.parse_args()
    setup_logging()
    use_soundfile_for_sphere()
    # each worker process is one job: more threads per job only fight over the same cores
    torch.set_num_threads(1)
    args.fbank_dir.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        suffix = "_sp" if split in args.sp_splits else ""
        src = args.manifest_dir / f"{args.dataset}_cuts_{split}{suffix}.jsonl.gz"
        if not src.is_file():
            die_empty(f"{src} is missing: run stage 1{' and 2' if suffix else ''} first")
        n, rejects = compute_split(
            src,
            args.fbank_dir / f"{args.dataset}_cuts_{split}.jsonl.gz",
            args.fbank_dir / f"{args.dataset}_feats_{split}",
            args.num_jobs,
        )
        record_rejects(args.data_dir, split, rejects)
        if n == 0:
            die_empty(f"{args.dataset} {split}: feature extraction produced nothing (see {split}_rejected.txt)")
        log.info("%s %s: fbank for %d cuts, %d failed", args.dataset, split, n, len(rejects))


if __name__ == "__main__":
    main()
