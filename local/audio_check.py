"""Checks that one recording's audio is usable, and a converter to 16 kHz mono for the rest.

Used by make_cuts.py (stage 1) for every corpus, so a bad file never reaches feature extraction.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from prep_utils import SAMPLING_RATE


def declared_num_samples(path: Path) -> Optional[int]:
    """Samples per channel that the file header promises (SPHERE and WAV), or None if unknown.

    soundfile derives the length from the file size, so a truncated SPHERE/WAV file decodes
    "fine" but shorter; comparing with the header is what exposes the truncation.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"NIST_1A"):
        for line in head.decode("latin-1").splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == "sample_count":
                try:
                    return int(fields[2])
                except ValueError:
                    return None
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        pos, block_align = 12, None
        while pos + 8 <= len(head):
            cid, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
            if cid == b"fmt " and pos + 8 + 14 <= len(head):
                block_align = struct.unpack("<H", head[pos + 8 + 12 : pos + 8 + 14])[0]
            if cid == b"data":
                if not block_align or size == 0xFFFFFFFF:  # streaming writers leave it unknown
                    return None
                return size // block_align
            pos += 8 + size + (size & 1)
    return None


def check_audio(recording) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Decode the whole recording; return (samples (C, N), None) or (None, reason naming the file)."""
    source = recording.sources[0].source if recording.sources else "<no source>"
    for s in recording.sources:
        if s.type == "file":
            p = Path(s.source)
            if not p.is_file():
                return None, f"missing audio file {p}"
            if p.stat().st_size == 0:
                return None, f"zero-length audio file {p}"
    try:
        samples = recording.load_audio()
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        return None, f"corrupt audio file {source}: cannot decode ({type(e).__name__}: {msg})"
    samples = np.atleast_2d(samples)
    n = samples.shape[-1]
    if n == 0:
        return None, f"audio file {source} holds no samples"
    for s in recording.sources:
        if s.type == "file":
            declared = declared_num_samples(Path(s.source))
            if declared is not None and n < declared:
                return None, (
                    f"truncated audio file {s.source}: header declares {declared} samples, only {n} present"
                )
    if not np.isfinite(samples).all():
        return None, f"audio file {source} decodes to NaN/inf samples"
    return samples, None


def to_16k_mono(samples: np.ndarray, sampling_rate: int) -> np.ndarray:
    """Average the channels and resample to 16 kHz with lhotse's torch resampler (no torchaudio/scipy)."""
    import torch
    from lhotse.augmentation.resample import Resample

    mono = samples.mean(axis=0, dtype=np.float64).astype(np.float32)
    if sampling_rate != SAMPLING_RATE:
        resampler = Resample(orig_freq=sampling_rate, new_freq=SAMPLING_RATE)
        mono = resampler(torch.from_numpy(mono).unsqueeze(0)).squeeze(0).numpy()
    return np.clip(mono, -1.0, 1.0)
