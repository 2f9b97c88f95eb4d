"""The recognition server's websocket protocol: what a client may send, checked without any I/O.

Client to server, in order:

1. a text message ``{"type": "start", "sample_rate": 16000, "format": "f32le"}`` with what to run: ``"exit": 12``
   (a fixed exit; the last one when nothing is given), or ``"strategy": "confidence"`` with ``"budget": 0.5``
   (a fraction of the last exit's compute per second of audio) or ``"threshold": 0.9``; ``"endpoint": false``
   keeps the whole stream one utterance (default: a pause ends it);
2. binary messages of mono PCM samples, little-endian, in the format it declared (``f32le``: float32 in
   [-1, 1]; ``s16le``: int16), at most :data:`MAX_MESSAGE_SECONDS` each;
3. at any time ``{"type": "set", "budget": 0.3}`` (or ``"threshold"``), from the next chunk on, and at the end
   ``{"type": "end"}``: no more audio.

Server to client: ``ready`` (the model's exits, chunk length, what the budgets cost), ``partial`` after every
chunk (text so far, the chunk's exit, the compute spent per second of audio against the budget), ``final`` per
utterance (``last``: the stream is over), and ``error`` with a message before the server closes a stream it
cannot go on with.
"""
import json
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from splitformer.serving.engine import Settings

SAMPLE_RATE = 16000
FORMATS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}
MAX_MESSAGE_SECONDS = 10.0
START_KEYS = {"type", "sample_rate", "format", "exit", "strategy", "budget", "threshold", "endpoint"}


class ProtocolError(ValueError):
    """A message the server cannot take; the text says what was wrong and what it expects."""


def _json(text: str) -> Dict[str, Any]:
    try:
        msg = json.loads(text)
    except ValueError:
        raise ProtocolError(f"text messages must be JSON objects, got {text[:60]!r}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f'text messages must be JSON objects with a "type", got {text[:60]!r}')
    return msg


def _number(msg: Dict[str, Any], key: str) -> Optional[float]:
    v = msg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise ProtocolError(f"{key} must be a number, got {v!r}")
    return float(v)


def parse_start(message: Any) -> Tuple[Settings, str]:
    """The first message: the stream's settings (unchecked against the model: see ``Engine.resolve``) and the
    format of its audio."""
    if not isinstance(message, str):
        raise ProtocolError('the first message must be the text {"type": "start", "sample_rate": 16000, ...}; '
                            "got binary data before it")
    msg = _json(message)
    if msg["type"] != "start":
        raise ProtocolError(f'the first message must have "type": "start", got {msg["type"]!r}')
    unknown = set(msg) - START_KEYS
    if unknown:
        raise ProtocolError(f"unknown start field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(START_KEYS))}")
    rate = msg.get("sample_rate")
    if rate != SAMPLE_RATE:
        raise ProtocolError(f"wrong sample rate {rate!r}: this model hears {SAMPLE_RATE} Hz mono; resample before "
                            "sending (the page does it with an AudioContext at 16 kHz)")
    fmt = msg.get("format", "f32le")
    if fmt not in FORMATS:
        raise ProtocolError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    exit_layer = msg.get("exit")
    if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, int)):
        raise ProtocolError(f"exit must be an integer layer, got {exit_layer!r}")
    strategy = msg.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise ProtocolError(f"strategy must be a string, got {strategy!r}")
    endpoint = msg.get("endpoint", True)
    if not isinstance(endpoint, bool):
        raise ProtocolError(f"endpoint must be true or false, got {endpoint!r}")
    return Settings(exit_layer, strategy, _number(msg, "budget"), _number(msg, "threshold"), endpoint), fmt


def parse_control(message: str) -> Tuple[str, Dict[str, Optional[float]]]:
    """A text message after the start: ``("end", {})`` or ``("set", {"budget": b, "threshold": t})``."""
    msg = _json(message)
    kind = msg["type"]
    if kind == "end":
        return "end", {}
    if kind == "set":
        changes = {k: _number(msg, k) for k in ("budget", "threshold") if k in msg}
        if len(changes) != 1:
            raise ProtocolError('"set" takes one of "budget" or "threshold"')
        other = "threshold" if "budget" in changes else "budget"
        return "set", dict(changes, **{other: None})
    raise ProtocolError(f'unknown message type {kind!r} after the start; expected "set" or "end"')


def parse_audio(data: bytes, fmt: str) -> np.ndarray:
    """A binary message -> float32 samples in [-1, 1]."""
    dtype = FORMATS[fmt]
    if len(data) % dtype.itemsize:
        raise ProtocolError(f"a binary message of {len(data)} bytes is not whole {fmt} samples "
                            f"({dtype.itemsize} bytes each)")
    n = len(data) // dtype.itemsize
    if n > MAX_MESSAGE_SECONDS * SAMPLE_RATE:
        raise ProtocolError(f"a binary message of {n / SAMPLE_RATE:.1f} s of audio is over the "
                            f"{MAX_MESSAGE_SECONDS:g} s limit; send audio as it comes, in pieces")
    x = np.frombuffer(data, dtype=dtype)
    if fmt == "s16le":
        return (x.astype(np.float32) / 32768.0)
    if not np.isfinite(x).all():
        raise ProtocolError("the audio holds NaN or infinite samples: it is not f32le PCM")
    if n and float(np.abs(x).max()) > 1.0 + 1e-3:
        raise ProtocolError(f"f32le samples must lie in [-1, 1], got a peak of {float(np.abs(x).max()):.3g}: "
                            "is this int16 audio? declare \"format\": \"s16le\"")
    return x.astype(np.float32)
