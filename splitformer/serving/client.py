"""A websocket client of the recognition server: sends audio as a microphone would and records what comes back
(with when), for the tests and ``bench/serve_load.py``."""
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

PIECE = 1600  # samples a message: 100 ms at 16 kHz


@dataclass
class Session:
    """What one stream got: every message with its arrival time, and when each piece of audio was sent."""

    messages: List[Dict] = field(default_factory=list)
    arrived: List[float] = field(default_factory=list)
    sent: List[tuple] = field(default_factory=list)  # (samples sent so far, time)
    close_code: Optional[int] = None

    def of(self, kind: str) -> List[Dict]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def text(self) -> str:
        return " ".join(m["text"] for m in self.of("final") if m["text"])

    @property
    def chunk_exits(self) -> List[int]:
        return [e for m in self.of("final") for e in m["chunk_exits"]]

    def delays(self) -> List[float]:
        """Seconds from sending the last sample a chunk needed to receiving its partial result."""
        out = []
        times = np.array([t for _, t in self.sent])
        counts = np.array([n for n, _ in self.sent])
        for m, t in zip(self.messages, self.arrived):
            if m["type"] == "partial" and len(counts):
                i = int(np.searchsorted(counts, m["heard_samples"]))
                if i < len(times):
                    out.append(t - times[i])
        return out


async def stream_audio(url: str, samples: np.ndarray, start: Dict, realtime: float = 1.0, piece: int = PIECE,
                       end: bool = True, timeout: float = 120.0) -> Session:
    """Streams 16 kHz float ``samples`` to ``url`` after the ``start`` settings, ``piece`` samples a message at
    ``realtime`` x real time (0: as fast as it can), then ends the stream and waits for the last final."""
    s = Session()
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(json.dumps(dict({"type": "start", "sample_rate": 16000, "format": "f32le"}, **start)))

        async def receive() -> None:
            try:
                async for raw in ws:
                    s.messages.append(json.loads(raw))
                    s.arrived.append(time.perf_counter())
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(receive())
        t0 = time.perf_counter()
        for i in range(0, len(samples), piece):
            if realtime > 0:
                await asyncio.sleep(max(0.0, t0 + i / 16000 / realtime - time.perf_counter()))
            try:
                await ws.send(samples[i: i + piece].astype("<f4").tobytes())
            except ConnectionClosed:
                break
            s.sent.append((min(i + piece, len(samples)), time.perf_counter()))
        if end:
            try:
                await ws.send(json.dumps({"type": "end"}))
            except ConnectionClosed:
                pass
        await asyncio.wait_for(reader, timeout)
        s.close_code = ws.close_code
    return s
