#!/usr/bin/env python3
"""Stage 6: narrowband and trimmed variants of splits, with fbank: test sets for decode.py --test-sets, and
training augmentation for train.py --train-variants.

- ``<split>-narrowband``: the audio resampled to 8 kHz and back to 16 kHz (telephone bandwidth: nothing
  above 4 kHz), as a user's narrowband recording reaches pretrained.py, which resamples anything to 16 kHz.
- ``<split>-trimmed``: leading and trailing silence cut off (``speech_bounds``), as audio from a
  voice-activity detector or a push-to-talk button arrives.

The cut ids stay those of ``<split>``, so that compare.py can pair utterances across the variants. Writes
``<manifest-dir>/<dataset>_cuts_<variant>.jsonl.gz`` (cuts with the transform) and, through
compute_fbank.py's ``compute_split``, ``<fbank-dir>/<dataset>_cuts_<variant>.jsonl.gz`` with features.

These test sets are *matched* (the training variants' own function makes them) and are labelled so in
``<fbank-dir>/<dataset>_conditions.json``; stage 7 (local/conditions.py) makes the unmatched ones.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from lhotse import CutSet
from lhotse.utils import fastcopy

from compute_fbank import _init_worker, compute_split
from conditions import label, update_labels
from prep_utils import atomic_to_file, cuts_path, die_empty, existing_cuts, record_rejects, setup_logging

log = logging.getLogger("prepare")
VARIANTS = ("narrowband", "trimmed")


def speech_bounds(samples: np.ndarray, sr: int, floor_db: float = 35.0, frame_s: float = 0.025,
                  hop_s: float = 0.01) -> Optional[Tuple[float, float]]:
    """(start, end) seconds from the first to the last frame whose energy is within ``floor_db`` of the
    loudest frame's; None for silence. No margin: the trim is as tight as a VAD's."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    frame, hop = int(frame_s * sr), int(hop_s * sr)
    if x.size < frame:
        return None
    n = 1 + (x.size - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    energy = 10.0 * np.log10(np.mean(x[idx] ** 2, axis=1) + 1e-12)
    if not np.isfinite(energy).any() or energy.max() <= -119.0:
        return None
    voiced = np.nonzero(energy >= energy.max() - floor_db)[0]
    return voiced[0] * hop / sr, min((voiced[-1] * hop + frame) / sr, x.size / sr)


def narrowband(cuts: CutSet) -> CutSet:
    return CutSet.from_cuts(c.resample(8000).resample(16000) for c in cuts)


def trimmed(cuts: CutSet) -> Tuple[CutSet, List[Tuple[str, str]]]:
    out, rejects = [], []
    for c in cuts:
        audio = c.load_audio()
        b = speech_bounds(audio, c.sampling_rate)
        if b is None:
            rejects.append((c.id, "trimmed variant: no speech found (silent audio)"))
            continue
        start, end = b
        t = c.truncate(offset=start, duration=end - start, preserve_id=True)
        # the transcript covers the whole utterance, so it covers the trimmed span exactly
        t.supervisions = [fastcopy(s, start=0.0, duration=t.duration) for s in t.supervisions]
        out.append(t)
    return CutSet.from_cuts(out), rejects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--splits", nargs="+", required=True, help="splits to make variants of")
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--fbank-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="where <variant>_rejected.txt go")
    p.add_argument("--num-jobs", type=int, default=1)
    args = p.parse_args()
    setup_logging()
    _init_worker()
    for split in args.splits:
        cuts = CutSet.from_file(existing_cuts(args.manifest_dir, args.dataset, split, "stage 1"))
        for variant in VARIANTS:
            name = f"{split}-{variant}"
            rejects: List[Tuple[str, str]] = []
            if variant == "narrowband":
                made = narrowband(cuts)
            else:
                made, rejects = trimmed(cuts)
            src = cuts_path(args.manifest_dir, args.dataset, name)
            atomic_to_file(made, src)
            n, failed = compute_split(src, cuts_path(args.fbank_dir, args.dataset, name),
                                      args.fbank_dir / f"{args.dataset}_feats_{name}", args.num_jobs)
            record_rejects(args.data_dir, name, rejects + failed)
            if n == 0:
                die_empty(f"{args.dataset} {name}: no cut left")
            log.info("%s %s: %d cuts with fbank", args.dataset, name, n)
        # matched: made by the function that makes the training variants (stage 7 makes the unmatched sets)
        update_labels(args.fbank_dir, args.dataset, {f"{split}-{v}": label(split, v, True) for v in VARIANTS})


if __name__ == "__main__":
    main()
