"""Raw audio files -> the features training used (lhotse ``Fbank``, 80 bins, 10 ms shift).

Audio is read with soundfile (wav, flac, ogg, plain NIST SPHERE...), mixed down to mono,
resampled to 16 kHz with lhotse's torch resampler (no torchaudio), and turned into log-mel
filterbanks with kaldi-native-fbank set up like lhotse's default ``FbankConfig`` (dither 0,
snip_edges False, povey window, 20 Hz..-400 Hz, energy floor 1e-10); the features agree with
lhotse's to ~1e-4 (tests/test_pretrained.py checks 1e-3).

Nothing here imports torch until it resamples, so that torch-free deployments (examples/onnx_decode.py)
compute the very same features.
"""
from pathlib import Path
from typing import Tuple

import numpy as np

SAMPLE_RATE = 16000
NUM_BINS = 80


class AudioError(RuntimeError):
    """An audio file that cannot be decoded; the message names it."""


def read_audio(path: Path) -> Tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate).

    A file with a valid header and no samples is empty audio (an empty transcript, not an error). A
    0-byte file, a directory, an unreadable file and samples that are NaN or infinite are errors
    that name the file: each is something the user must fix, not silence.
    """
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file (pass the files in it, or list them with --files-from)")
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes): it holds no header and no audio")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for bad headers
        raise AudioError(f"cannot read audio file {path}: {e} (supported: wav, flac, ogg, uncompressed sph)") from e
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).any(axis=1).sum())
        raise AudioError(f"audio file {path} has {bad} NaN or infinite sample(s) of {data.shape[0]}: it is corrupt")
    return data.mean(axis=1).astype(np.float32), int(sr)


def resample(samples: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if sr == target or samples.size == 0:
        return samples
    import torch
    from lhotse.augmentation.resample import Resample

    with torch.no_grad():
        out = Resample(orig_freq=sr, new_freq=target)(torch.from_numpy(samples).unsqueeze(0))
    return out.squeeze(0).numpy().astype(np.float32)


def fbank_options(sr: int = SAMPLE_RATE):
    """kaldi-native-fbank options matching lhotse's default ``FbankConfig`` (one place for the offline and the
    online computer, see :func:`fbank` and :func:`online_fbank`)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sr
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = False
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = NUM_BINS
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = -400.0
    opts.energy_floor = 1e-10
    opts.use_energy = False
    return opts


def online_fbank(sr: int = SAMPLE_RATE):
    """A feature computer that takes audio as it arrives (``accept_waveform``) and gives the frames
    :func:`fbank` gives for the whole of it, each as soon as its window is complete."""
    import kaldi_native_fbank as knf

    return knf.OnlineFbank(fbank_options(sr))


def fbank(samples: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(num_frames, 80) log-mel features, lhotse Fbank-compatible. Empty audio gives (0, 80)."""
    if samples.size == 0:
        return np.zeros((0, NUM_BINS), dtype=np.float32)
    comp = online_fbank(sr)
    comp.accept_waveform(sr, samples.tolist())
    comp.input_finished()
    n = comp.num_frames_ready
    if n == 0:
        return np.zeros((0, NUM_BINS), dtype=np.float32)
    return np.stack([comp.get_frame(i) for i in range(n)]).astype(np.float32)


def file_samples(path: Path, min_seconds: float = 0.0) -> Tuple[np.ndarray, float]:
    """The samples of one file at 16 kHz, and its peak amplitude (0 for empty audio).

    Audio shorter than ``min_seconds`` is padded with silence so that every front end gets
    enough frames (silence adds no words)."""
    samples, sr = read_audio(path)
    samples = resample(samples, sr)
    if samples.size == 0:
        return samples, 0.0
    peak = float(np.abs(samples).max())
    need = int(min_seconds * SAMPLE_RATE)
    if samples.size < need:
        samples = np.concatenate([samples, np.zeros(need - samples.size, dtype=np.float32)])
    return samples, peak


def file_features(path: Path, min_seconds: float = 0.0) -> Tuple[np.ndarray, float]:
    """Features of one file (``file_samples``, then ``fbank``), and its peak amplitude."""
    samples, peak = file_samples(path, min_seconds)
    return fbank(samples), peak


def chunks_in(num_frames: int, window: int, shift: int) -> int:
    """Whole chunks in ``num_frames`` fbank frames when each reads ``window`` frames, ``shift`` after the last."""
    return (num_frames - window) // shift + 1 if num_frames >= window else 0


def stream_features(samples: np.ndarray, window: int, shift: int) -> np.ndarray:
    """The fbank of a stream's audio followed by silence (zero samples, as sherpa-onnx's callers pad) until its
    frames make whole chunks, the last chunk's look-ahead included: what a streaming model hears of a file."""
    feats = fbank(samples)
    chunks = max(1, -(-max(feats.shape[0] - (window - shift), 1) // shift))
    need = (chunks - 1) * shift + window
    if feats.shape[0] < need:
        pad = np.zeros(SAMPLE_RATE // 100 * (need - feats.shape[0] + 2), dtype=np.float32)
        feats = fbank(np.concatenate([samples, pad]))
    return feats[:need]
