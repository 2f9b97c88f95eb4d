"""What sherpa-onnx's OnlineRecognizer hears of a waveform, so that tests can hand our StreamingDecoder the same
frames: sherpa-onnx decodes a chunk only while a whole window (T frames) is buffered past it, and its examples
pad every file with 0.66 s of silence so that the last words come out."""
from typing import List

import numpy as np

TAIL_S = 0.66


def padded(samples: np.ndarray, rate: int = 16000) -> np.ndarray:
    return np.concatenate([samples.astype(np.float32), np.zeros(int(TAIL_S * rate), np.float32)])


def frames_sherpa_runs(samples: np.ndarray, window: int, shift: int) -> np.ndarray:
    """fbank of ``samples`` (already padded) cut to the chunks sherpa-onnx runs: chunk k while k*shift+T < N."""
    from splitformer.decoding.audio import chunks_in, fbank

    f = fbank(samples)
    return f[: (chunks_in(f.shape[0] - 1, window, shift) - 1) * shift + window]


def sherpa_text(recognizer, samples: np.ndarray, rate: int = 16000) -> str:
    """The recognizer's words for one (padded) waveform, whitespace normalised."""
    s = recognizer.create_stream()
    s.accept_waveform(rate, samples)
    s.input_finished()
    while recognizer.is_ready(s):
        recognizer.decode_stream(s)
    return " ".join(recognizer.get_result(s).split())


def piece_text(pieces: List[str]) -> str:
    """Words from sentencepiece pieces, as sherpa-onnx joins them (``▁`` starts a word)."""
    return " ".join("".join(pieces).replace("\u2581", " ").split())
