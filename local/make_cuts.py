#!/usr/bin/env python3
"""Stage 1 (shared by all corpora): recordings + supervisions -> checked CutSet, one cut per supervision.

Reads `<manifest-dir>/<dataset>_{recordings,supervisions}_<split>.jsonl.gz` (written by the corpus's
recipe) and writes `<manifest-dir>/<dataset>_cuts_<split>.jsonl.gz`. Every recording is decoded once:
unreadable, truncated or empty audio, empty transcripts and non-positive durations are rejected (by id,
with the reason, in `<data-dir>/<split>_rejected.txt`); 8 kHz or multi-channel audio is converted to
16 kHz mono FLAC under `<manifest-dir>/converted/` with a message. Exit status 2 if a split ends up empty.
"""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import soundfile as sf
from lhotse import CutSet, Recording, RecordingSet, SupervisionSet, fastcopy
from tqdm import tqdm

from audio_check import SAMPLING_RATE, check_audio, to_16k_mono
from prep_utils import add_repo_to_path, atomic_to_file, cuts_path, die_empty, record_rejects, setup_logging

add_repo_to_path()
from splitformer.data import use_soundfile_for_sphere  # noqa: E402

log = logging.getLogger("prepare")
# a segment may overrun the audio by this much (rounding in transcripts/headers) before it is rejected
END_TOLERANCE = 0.05


def check_recording(rec: Recording, converted_dir: Path) -> Tuple[Optional[Recording], Optional[str]]:
    """Return (usable 16 kHz mono recording, None) or (None, reason)."""
    samples, reason = check_audio(rec)
    if samples is None:
        return None, reason
    if rec.sampling_rate == SAMPLING_RATE and samples.shape[0] == 1:
        return rec, None
    what = []
    if samples.shape[0] > 1:
        what.append(f"downmixed {samples.shape[0]} channels to mono")
    if rec.sampling_rate != SAMPLING_RATE:
        what.append(f"resampled {rec.sampling_rate} Hz -> {SAMPLING_RATE} Hz")
    out = converted_dir / f"{rec.id}.flac"
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), to_16k_mono(samples, rec.sampling_rate), SAMPLING_RATE, subtype="PCM_16")
    log.warning("%s (%s): %s, written to %s", rec.id, rec.sources[0].source, " and ".join(what), out)
    return Recording.from_file(out, recording_id=rec.id), None


def make_cuts(
    recordings: RecordingSet, supervisions: SupervisionSet, converted_dir: Path, num_jobs: int
) -> Tuple[CutSet, List[Tuple[str, str]]]:
    rejects: List[Tuple[str, str]] = []
    checked: Dict[str, Tuple[Optional[Recording], Optional[str]]] = {}
    recs = list(recordings)
    with ThreadPoolExecutor(max(1, num_jobs)) as ex:
        results = ex.map(lambda r: check_recording(r, converted_dir), recs)
        for rec, res in tqdm(zip(recs, results), total=len(recs), desc="checking audio", mininterval=2):
            checked[rec.id] = res

    good_sups = []
    for sup in supervisions:
        rec, reason = checked.get(sup.recording_id, (None, f"no recording {sup.recording_id} for this segment"))
        if rec is None:
            rejects.append((sup.id, reason))
            continue
        if not (sup.text or "").strip():
            rejects.append((sup.id, f"empty transcript (recording {rec.sources[0].source})"))
            continue
        if sup.duration <= 0:
            rejects.append((sup.id, f"non-positive duration {sup.duration} s"))
            continue
        if sup.start < 0 or sup.end > rec.duration + END_TOLERANCE:
            rejects.append(
                (sup.id, f"segment {sup.start:.2f}-{sup.end:.2f} s lies outside the {rec.duration:.2f} s audio")
            )
            continue
        if sup.end > rec.duration:  # within tolerance: clip to the audio
            sup = fastcopy(sup, duration=round(rec.duration - sup.start, 6))
        good_sups.append(sup)

    used = {s.recording_id for s in good_sups}
    good_recs = RecordingSet.from_recordings(r for rid, (r, _) in checked.items() if r is not None and rid in used)
    if not good_sups:
        return CutSet(), rejects
    cuts = CutSet.from_manifests(
        recordings=good_recs, supervisions=SupervisionSet.from_segments(good_sups)
    ).trim_to_supervisions(keep_overlapping=False)
    # one supervision per cut: name the cut after it, so that rejects and results use the same ids
    cuts = CutSet.from_cuts(fastcopy(c, id=c.supervisions[0].id) for c in cuts)
    return cuts, rejects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--num-jobs", type=int, default=1)
    args = p.parse_args()
    setup_logging()
    use_soundfile_for_sphere()
    for split in args.splits:
        prefix = args.manifest_dir / f"{args.dataset}_"
        rec_path = Path(f"{prefix}recordings_{split}.jsonl.gz")
        sup_path = Path(f"{prefix}supervisions_{split}.jsonl.gz")
        for path in (rec_path, sup_path):
            if not path.is_file():
                die_empty(f"{path} is missing: the corpus recipe did not produce split {split!r}")
        recordings = RecordingSet.from_file(rec_path)
        supervisions = SupervisionSet.from_file(sup_path)
        cuts, rejects = make_cuts(recordings, supervisions, args.manifest_dir / "converted", args.num_jobs)
        record_rejects(args.data_dir, split, rejects)
        if len(cuts) == 0:
            die_empty(f"{args.dataset} split {split!r}: no usable utterance left (see {args.data_dir}/{split}_rejected.txt)")
        atomic_to_file(cuts, cuts_path(args.manifest_dir, args.dataset, split))
        hours = sum(c.duration for c in cuts) / 3600
        log.info("%s %s: %d cuts (%.2f h), %d rejected", args.dataset, split, len(cuts), hours, len(rejects))


if __name__ == "__main__":
    main()
