#!/usr/bin/env python3
"""Stage 3: 80-dim log-mel fbank (lhotse `Fbank`, kaldi-compatible, pure torch) for every split.

Reads `<manifest-dir>/<dataset>_cuts_<split>[_sp].jsonl.gz` and writes the cuts with features to
`<fbank-dir>/<dataset>_cuts_<split>.jsonl.gz`, the matrices to `<fbank-dir>/<dataset>_feats_<split>`
(LilcomChunkyWriter). A split is redone from scratch so a crash never leaves a half-filled archive in use.
"""
from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter
from tqdm import tqdm

from prep_utils import add_repo_to_path, atomic_to_file, cuts_path, die_empty, existing_cuts, record_rejects, setup_logging

add_repo_to_path()
from splitformer.data import use_soundfile_for_sphere  # noqa: E402

log = logging.getLogger("prepare")
NUM_MEL_BINS = 80
MIN_CUTS_PER_PROCESS_POOL = 2000


def _init_worker() -> None:
    # one job per process: more torch threads per job only fight over the same cores
    torch.set_num_threads(1)
    use_soundfile_for_sphere()


Failures = List[Tuple[str, str]]


def _extract(cuts: List, storage: Path, progress_bar: bool = False) -> Tuple[CutSet, Failures]:
    """Features of each cut into one archive; a cut whose audio or extraction fails is left out with its
    reason (lhotse's own loop would stop the whole split at the first one)."""
    extractor = Fbank(FbankConfig(num_mel_bins=NUM_MEL_BINS))
    done, failures = [], []
    with LilcomChunkyWriter(storage) as writer:
        for cut in tqdm(cuts, desc="Extracting fbank", unit="cut", disable=not progress_bar, mininterval=2):
            try:
                done.append(cut.compute_and_store_features(extractor, writer))
            except Exception as e:  # noqa: BLE001  (any failure of one cut costs that cut only)
                source = cut.recording.sources[0].source if cut.has_recording else "<no recording>"
                msg = str(e).splitlines()[0] if str(e) else ""
                failures.append((cut.id, f"feature extraction failed for audio {source}: {type(e).__name__}: {msg}"))
                log.error("rejected %s: %s", cut.id, failures[-1][1])
    return CutSet.from_cuts(done), failures


def extract_parallel(cuts: List, storage: Path, num_jobs: int) -> Tuple[CutSet, Failures]:
    """Feature extraction over `num_jobs` processes, in small chunks so that the progress bar counts cuts."""
    storage.mkdir(parents=True, exist_ok=True)
    size = max(10, math.ceil(len(cuts) / (num_jobs * 8)))
    chunks = [cuts[i : i + size] for i in range(0, len(cuts), size)]
    results: List[Optional[Tuple[CutSet, Failures]]] = [None] * len(chunks)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_jobs, mp_context=ctx, initializer=_init_worker) as ex:
        futures = {ex.submit(_extract, chunk, storage / f"feats-{i}"): i for i, chunk in enumerate(chunks)}
        with tqdm(total=len(cuts), desc="Extracting fbank", unit="cut", mininterval=2) as bar:
            for f in as_completed(futures):
                i = futures[f]
                results[i] = f.result()
                bar.update(len(chunks[i]))
    return CutSet.from_cuts(c for r in results for c in r[0]), [f for r in results for f in r[1]]


def compute_split(src: Path, dst: Path, storage: Path, num_jobs: int) -> Tuple[int, List[Tuple[str, str]]]:
    """Extract features for one split; return (cuts written, rejects for the cuts lhotse dropped)."""
    cuts = list(CutSet.from_file(src))
    for p in (storage, storage.with_suffix(".lca")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    # one process does ~250 cuts/s; starting spawned workers (torch + lhotse imports) costs seconds each
    if num_jobs > 1 and len(cuts) > MIN_CUTS_PER_PROCESS_POOL:
        with_feats, rejects = extract_parallel(cuts, storage, num_jobs)
    else:
        with_feats, rejects = _extract(cuts, storage, progress_bar=True)
        with_feats = with_feats.to_eager()
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
    _init_worker()
    args.fbank_dir.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        suffix = "_sp" if split in args.sp_splits else ""
        src = existing_cuts(args.manifest_dir, args.dataset, split + suffix, "stages 1 and 2" if suffix else "stage 1")
        n, rejects = compute_split(
            src,
            cuts_path(args.fbank_dir, args.dataset, split),
            args.fbank_dir / f"{args.dataset}_feats_{split}",
            args.num_jobs,
        )
        record_rejects(args.data_dir, split, rejects)
        if n == 0:
            die_empty(f"{args.dataset} {split}: feature extraction produced nothing (see {split}_rejected.txt)")
        log.info("%s %s: fbank for %d cuts, %d failed", args.dataset, split, n, len(rejects))


if __name__ == "__main__":
    main()
