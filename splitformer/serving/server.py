"""The recognition server: websockets (the ``websockets`` library) for the streams, plain HTTP on the same port
for the page, its script and ``/stats``.

Each connection runs in the asyncio loop and only passes audio and settings to its :class:`LiveStream`; the
engine's worker thread decodes. A connection that breaks the protocol gets an ``error`` message naming what was
wrong and is closed (code 1003 for bad data, 1008 for bad settings); one that vanishes mid-stream is dropped.
Neither touches another stream. Past ``max_streams`` a new connection is refused (code 1013, try again later).
"""
import asyncio
import json
import logging
import threading
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path
from typing import Dict, Optional

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from splitformer.serving.engine import Engine, LiveStream, SettingsError
from splitformer.serving.protocol import MAX_MESSAGE_SECONDS, ProtocolError, parse_audio, parse_control, parse_start

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8")}
BAD_DATA, BAD_SETTINGS, TRY_LATER = 1003, 1008, 1013


class RecognitionServer:
    """Serves ``engine`` on ``host:port`` (port 0: any free port; :attr:`port` says which once started)."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 6006, max_streams: int = 64,
                 start_timeout: float = 10.0, info: Optional[Dict] = None) -> None:
        self.engine = engine
        self.host, self.port = host, port
        self.max_streams = max_streams
        self.start_timeout = start_timeout
        self.info = dict(info or {})
        self.connections = 0
        self.refused = 0
        self._stop_worker = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopped: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    # ------------------------------------------------------------------ running
    async def serve(self, started: Optional[threading.Event] = None) -> None:
        """Runs until :meth:`stop` (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._worker = threading.Thread(target=self.engine.run, args=(self._stop_worker,), name="decoder", daemon=True)
        self._worker.start()
        try:
            async with serve(self._handle, self.host, self.port, process_request=self._http,
                             max_size=int(MAX_MESSAGE_SECONDS * 16000 * 4) + 1024, compression=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                if started is not None:
                    started.set()
                await self._stopped.wait()
        finally:
            self._stop_worker.set()
            self._worker.join()

    def start_in_thread(self) -> "RecognitionServer":
        """Serves from a background thread (tests, benchmarks); returns once it listens."""
        started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(started)), name="server", daemon=True)
        self._thread.start()
        if not started.wait(60):
            raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(30)

    # ------------------------------------------------------------------ HTTP
    def _http(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # the websocket handshake goes on
        path = request.path.split("?", 1)[0]
        if path == "/stats":
            body = dict(self.engine.stats(), connections=self.connections, refused=self.refused,
                        max_streams=self.max_streams)
            return _response(HTTPStatus.OK, json.dumps(body).encode(), "application/json")
        if path == "/info":
            return _response(HTTPStatus.OK, json.dumps(self._ready()).encode(), "application/json")
        if path in PAGES:
            name, kind = PAGES[path]
            return _response(HTTPStatus.OK, (STATIC / name).read_bytes(), kind)
        return _response(HTTPStatus.NOT_FOUND, f"no page {path}; open / for the page, or connect a websocket\n".encode(),
                         "text/plain; charset=utf-8")

    def _ready(self) -> Dict:
        e = self.engine
        return dict(self.info, type="ready", exits=e.exits, chunk_ms=round(e.chunk_seconds * 1000),
                    strategies=sorted(e.curves), full_macs_per_second=e.full_cost, early_exit=e.early_exit,
                    max_streams=self.max_streams)

    # ------------------------------------------------------------------ websocket
    async def _handle(self, ws: ServerConnection) -> None:
        if self.connections >= self.max_streams:
            self.refused += 1
            await _refuse(ws, TRY_LATER, f"the server is full: it holds {self.max_streams} streams at most "
                                         "(serve.py --max-streams); try again later")
            return
        self.connections += 1
        try:
            await self._stream(ws)
        finally:
            self.connections -= 1

    async def _stream(self, ws: ServerConnection) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), self.start_timeout)
        except asyncio.TimeoutError:
            await _refuse(ws, BAD_DATA, f'no start message within {self.start_timeout:g} s; send '
                                        '{"type": "start", "sample_rate": 16000, ...} first')
            return
        except ConnectionClosed:
            return
        try:
            settings, fmt = parse_start(first)
            out: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            stream = self.engine.open(settings, lambda msg: loop.call_soon_threadsafe(out.put_nowait, msg))
        except ProtocolError as e:
            await _refuse(ws, BAD_DATA, str(e))
            return
        except SettingsError as e:
            await _refuse(ws, BAD_SETTINGS, str(e))
            return
        await ws.send(json.dumps(dict(self._ready(), settings=stream.settings.__dict__, threshold=stream.threshold)))
        sender = asyncio.create_task(self._send(ws, out))
        try:
            await self._receive(ws, stream, fmt)
        except (ProtocolError, SettingsError) as e:
            stream.close()
            sender.cancel()
            await _refuse(ws, BAD_DATA if isinstance(e, ProtocolError) else BAD_SETTINGS, str(e))
            return
        except ConnectionClosed:
            stream.close()
            sender.cancel()
            return
        if stream.ended_by_client:
            await sender  # until the last final is out
        else:
            stream.close()  # the client closed without "end"
            sender.cancel()

    async def _receive(self, ws: ServerConnection, stream: LiveStream, fmt: str) -> None:
        async for message in ws:
            if isinstance(message, bytes):
                if stream.ended_by_client:
                    raise ProtocolError("audio after \"end\": open a new stream for more")
                stream.feed(parse_audio(message, fmt))
                continue
            kind, changes = parse_control(message)
            if kind == "end":
                stream.ended_by_client = True
                stream.end()
                return
            new = replace(stream.settings, **changes)
            if new.key != stream.settings.key:
                raise SettingsError("only the budget or threshold can change during a stream")
            stream.update(*self.engine.resolve(new))

    @staticmethod
    async def _send(ws: ServerConnection, out: asyncio.Queue) -> None:
        while True:
            msg = await out.get()
            try:
                await ws.send(json.dumps(msg))
            except ConnectionClosed:
                return
            if msg["type"] == "error" or (msg["type"] == "final" and msg["last"]):
                await ws.close(1000 if msg["type"] == "final" else 1011)
                return


async def _refuse(ws: ServerConnection, code: int, message: str) -> None:
    logging.info(f"refused a stream from {ws.remote_address}: {message}")
    try:
        await ws.send(json.dumps(dict(type="error", message=message)))
        await ws.close(code, message[:120])
    except ConnectionClosed:
        pass


def _response(status: HTTPStatus, body: bytes, kind: str) -> Response:
    headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, body)
