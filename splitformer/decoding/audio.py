"""Raw audio files -> what a model reads: the features training used (lhotse ``Fbank``, 80 bins, 10 ms shift),
or the 16 kHz samples for a waveform model.

One reader for every way of decoding a file (pretrained.py with PyTorch, examples/onnx_decode.py with onnxruntime
alone), so that both hear exactly the same input: :func:`read_model_input`. Audio is read with soundfile (wav,
flac, ogg, plain NIST SPHERE...), mixed down to mono, resampled to 16 kHz as lhotse's ``Resample`` does (a numpy
port of its windowed-sinc filter: :func:`resample`), padded with silence to :data:`MIN_SECONDS`, and turned into
log-mel filterbanks with kaldi-native-fbank set up like lhotse's default ``FbankConfig`` (dither 0, snip_edges
False, povey window, 20 Hz..-400 Hz, energy floor 1e-10); the features agree with lhotse's to ~1e-4
(tests/test_pretrained.py checks 1e-3).

Nothing here imports torch (tests/test_audio_reader.py checks it in a fresh interpreter), so that a torch-free
deployment computes the very same input as the PyTorch tools.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

SAMPLE_RATE = 16000
NUM_BINS = 80
# Audio shorter than this is padded with silence before the front end (its convolutions need a few frames);
# the padding is silence, so it adds no words.
MIN_SECONDS = 0.5
# Peak amplitude below which a file is digital silence (-100 dBFS): nothing to transcribe.
SILENCE_PEAK = 1e-5
INPUT_KINDS = ("fbank", "waveform")


class AudioError(RuntimeError):
    """An audio file that cannot be used (missing, unreadable, corrupt); the message names it."""


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


# How 8 kHz audio comes up to 16 kHz matters: above 4 kHz the result holds only the resampler's residue, and the
# models learned one from the narrowband training variant (local/make_variants.py: lhotse's cut.resample, which
# without torchaudio is scipy's resample_poly; its stored features match resample_poly to the lilcom step). This is
# lhotse's ``Resample`` (torch; a windowed sinc as in torchaudio): a Hann-windowed sinc reaching LOWPASS_ZEROS zero
# crossings on each side, cut off at ROLLOFF times the lower Nyquist frequency. exp/splitformer-cpu, exit 12, the 130
# AN4 test files at 8 kHz: 12.3-12.6 % WER read with it, 12.6-13.1 % with resample_poly, 21.2 % with soxr "HQ".
LOWPASS_ZEROS = 6
ROLLOFF = 0.99


def _phase_filters(up: int, down: int, rolloff: float = ROLLOFF,
                   zeros: int = LOWPASS_ZEROS) -> Tuple[np.ndarray, np.ndarray, int]:
    """The polyphase filters for ``up / down`` (coprime): ``(taps, starts, pad)``. Output ``n = k * up + p`` is
    ``taps[p] @ padded[k * down + starts[p] :][: taps.shape[1]]``, ``padded`` being the input with ``pad`` zeros
    before it and ``pad + down`` after it. Every phase keeps only the ``2 * pad + 1`` taps that can be non-zero
    (the window vanishes past ``zeros`` crossings), so that rates with a large reduced ratio stay cheap."""
    cutoff = min(up, down) * rolloff  # in units of the common rate divided by the gcd
    pad = int(np.ceil(zeros * down / cutoff))
    # input sample m (of the padded input) sits at time (m - pad) / down, output phase p at p / up; the offset
    # p / up is formed in float32 as in the reference implementation (it moves the taps by ~1e-8)
    starts = (np.arange(up, dtype=np.int64) * down) // up
    m = starts[:, None] + np.arange(2 * pad + 1)[None, :]
    offset = (np.arange(up, dtype=np.float32) / np.float32(up)).astype(np.float64)
    t = np.clip(((m - pad) / down - offset[:, None]) * cutoff, -zeros, zeros)
    window = np.cos(t * (np.pi / (2 * zeros))) ** 2
    arg = np.pi * t
    sinc = np.ones_like(arg)
    nz = arg != 0
    sinc[nz] = np.sin(arg[nz]) / arg[nz]
    taps = (sinc * window * (cutoff / down)).astype(np.float32)
    return taps, starts, pad


def resample(samples: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` at ``sr`` Hz -> float32 at ``target`` Hz, the same output as lhotse's ``Resample(sr, target)``
    (Hann-windowed sinc, 6 zero crossings, rolloff 0.99; ``ceil(len * target / sr)`` samples), without torch,
    so that 8 kHz input keeps above 4 kHz the kind of residue the narrowband training data had (see ROLLOFF)."""
    sr, target = int(sr), int(target)
    if sr <= 0 or target <= 0:
        raise ValueError(f"sample rates must be positive, got {sr} -> {target}")
    samples = np.asarray(samples)
    if sr == target or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    g = np.gcd(sr, target)
    up, down = target // g, sr // g
    taps, starts, pad = _phase_filters(up, down)
    x = np.concatenate([np.zeros(pad), np.asarray(samples, dtype=np.float64).reshape(-1), np.zeros(pad + down)])
    n_out = -(-samples.size * up // down)
    frames = -(-n_out // up)  # output k * up + p, for every phase p, reads from input sample k * down + starts[p]
    first = (np.arange(frames) * down)[:, None] + starts[None, :]
    y = np.zeros((frames, up))
    for i in range(taps.shape[1]):  # a few dozen taps: one vectorised pass each
        y += x[first + i] * taps[:, i].astype(np.float64)
    y = y.reshape(-1)[:n_out]
    return y.astype(np.float32)


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
    try:
        samples = resample(samples, sr)
    except Exception as e:  # a rate the resampler refuses: this file alone is lost
        raise AudioError(f"cannot resample audio file {path} from {sr} Hz to {SAMPLE_RATE} Hz: {e}") from e
    if samples.size == 0:
        return samples, 0.0
    return pad_to(samples, min_seconds), float(np.abs(samples).max())


def pad_to(samples: np.ndarray, min_seconds: float) -> np.ndarray:
    """``samples`` followed by zeros up to ``min_seconds`` at 16 kHz (unchanged when long enough)."""
    need = int(min_seconds * SAMPLE_RATE)
    if samples.size >= need:
        return samples
    return np.concatenate([samples, np.zeros(need - samples.size, dtype=np.float32)])


def file_features(path: Path, min_seconds: float = 0.0) -> Tuple[np.ndarray, float]:
    """Features of one file (``file_samples``, then ``fbank``), and its peak amplitude."""
    samples, peak = file_samples(path, min_seconds)
    return _features_of(samples, path), peak


def _features_of(samples: np.ndarray, path: Path) -> np.ndarray:
    try:
        return fbank(samples)
    except Exception as e:  # the feature computer failed on this file: it alone is lost
        raise AudioError(f"cannot compute features of {path}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class ModelInput:
    """What a model reads for one file. ``x``: (T, 80) fbank or (S,) 16 kHz samples, by the model's input kind;
    empty ((0, 80) or (0,)) when the file is empty audio or digital silence, which has nothing to transcribe.
    ``peak``: the file's peak amplitude after resampling (0 for empty audio)."""

    x: np.ndarray
    peak: float

    @property
    def silent(self) -> bool:
        """Empty or silent audio: the caller gives an empty transcript without running the model."""
        return self.x.shape[0] == 0


def empty_input(kind: str) -> np.ndarray:
    """The input of nothing to hear: (0, 80) fbank or (0,) samples."""
    return np.zeros((0,) if kind == "waveform" else (0, NUM_BINS), dtype=np.float32)


def read_model_input(path: Path, kind: str = "fbank", min_seconds: float = MIN_SECONDS,
                     silence_peak: float = SILENCE_PEAK) -> ModelInput:
    """Exactly what a model of input ``kind`` (``"fbank"`` or ``"waveform"``: an exported file's ``input``
    metadata, ``AsrModel.input_kind``) reads for the file at ``path``: mono, 16 kHz (:func:`resample`), padded with silence to
    ``min_seconds``, then 80-bin fbank for a fbank model. Empty audio and audio whose peak is under
    ``silence_peak`` give an empty input (``ModelInput.silent``). A file that cannot be used (missing, a directory,
    0 bytes, unreadable, NaN or infinite samples, features that are not finite) raises :class:`AudioError`
    naming it; every caller then skips that file alone.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {kind!r} (the model's 'input' metadata)")
    samples, peak = file_samples(path, min_seconds)
    if samples.size == 0 or peak < silence_peak:
        return ModelInput(empty_input(kind), peak)
    x = samples if kind == "waveform" else _features_of(samples, path)
    if not np.isfinite(x).all():
        raise AudioError(f"audio file {path} gives features that are not finite (samples too large for float32 "
                         f"power, peak {peak:.3g}): re-encode it with samples in [-1, 1]")
    return ModelInput(x, peak)


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
