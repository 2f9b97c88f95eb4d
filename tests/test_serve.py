"""The recognition server (splitformer/serve.py): its protocol against clients that misbehave, many clients at
once, the per-connection budget, and its words against streaming decoding of the same files.

Protocol tests run a small random causal model (fast, words are token ids); the words test runs the small causal
Splitformer trained on AN4 with run.sh's recipe (shared with test_streaming_an4.py)."""
import asyncio
import contextlib
import json
import math
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from an4_fixture import CAUSAL, an4_utterances, recipe_run
from splitformer.decoding.audio import fbank, file_samples
from splitformer.decoding.streaming import ChunkExitRule, StreamingDecoder, Utterance
from splitformer.serving.client import stream_audio
from splitformer.serving.engine import Engine, Settings, SettingsError
from splitformer.serving.protocol import ProtocolError, parse_audio, parse_control, parse_start
from splitformer.serving.server import RecognitionServer

recipe_run("causal", __file__, CAUSAL.flags, CAUSAL.epochs)


class Ids:
    """A tokenizer whose text is the token ids (a random model has no words)."""

    @staticmethod
    def decode(ids):
        return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def random_engine():
    from test_streaming import causal_model

    model, chunk, left = causal_model("splitformer-conv1d")
    return Engine(model, Ids(), chunk, left, scorer="ctc")


@contextlib.contextmanager
def served(engine: Engine, **kw):
    server = RecognitionServer(engine, port=0, **kw).start_in_thread()
    try:
        yield server
    finally:
        server.stop()


def ws_url(server: RecognitionServer) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def idle(server: RecognitionServer, seconds: float = 5.0) -> bool:
    """Whether every stream and connection is gone within ``seconds`` (a dropped stream leaves at the worker's
    next step)."""
    import time

    end = time.monotonic() + seconds
    while server.engine.active or server.connections:
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def speech(an4_dir):
    """Three AN4 test files at 16 kHz (float samples) with their transcripts."""
    return [(file_samples(u.path)[0], u.text) for u in an4_utterances(an4_dir, 3, part="test")]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def raw_session(url: str, *messages, wait: float = 5.0):
    """Sends ``messages`` as they are and returns (the JSON messages received, the close code)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    got = []
    async with connect(url) as ws:
        try:
            for m in messages:
                await ws.send(m)
        except ConnectionClosed:
            pass  # the server may refuse before all is sent: what it said is still to be read
        try:
            while True:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), wait)))
        except ConnectionClosed:
            pass
        return got, ws.close_code


def alone_words(engine: Engine, samples: np.ndarray, exit_layer=None, rule=None) -> str:
    """The words streaming_decode.py's decoder gives the same audio, decoded on its own."""
    dec = StreamingDecoder(engine.model, engine.chunk, engine.left, exit_layer=exit_layer, rule=rule)
    res = dec.decode([Utterance("a", torch.from_numpy(fbank(samples)))])[0]
    ids = res.tokens[0]
    return " ".join(engine.tokenizer.decode(ids).split()) if ids else ""


# ------------------------------------------------------------------------------------------ protocol, pure
def test_the_protocol_refuses_each_bad_message_with_what_it_expects():
    with pytest.raises(ProtocolError, match="wrong sample rate 8000.*16000"):
        parse_start(json.dumps({"type": "start", "sample_rate": 8000}))
    with pytest.raises(ProtocolError, match="binary data before it"):
        parse_start(b"\x00\x01")
    with pytest.raises(ProtocolError, match="JSON objects"):
        parse_start("hello")
    with pytest.raises(ProtocolError, match="unknown start field.*colour"):
        parse_start(json.dumps({"type": "start", "sample_rate": 16000, "colour": "red"}))
    with pytest.raises(ProtocolError, match="budget must be a number"):
        parse_start(json.dumps({"type": "start", "sample_rate": 16000, "strategy": "entropy", "budget": "half"}))
    settings, fmt = parse_start(json.dumps({"type": "start", "sample_rate": 16000, "format": "s16le",
                                            "strategy": "confidence", "budget": 0.5, "endpoint": False}))
    assert settings == Settings(None, "confidence", 0.5, None, False) and fmt == "s16le"
    with pytest.raises(ProtocolError, match="5 bytes is not whole f32le samples"):
        parse_audio(b"\x00" * 5, "f32le")
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        parse_audio(np.array([0.0, np.nan], dtype="<f4").tobytes(), "f32le")
    with pytest.raises(ProtocolError, match="is this int16 audio"):
        parse_audio(np.array([0.0, 300.0], dtype="<f4").tobytes(), "f32le")
    with pytest.raises(ProtocolError, match="over the 10 s limit"):
        parse_audio(np.zeros(16000 * 11, dtype="<i2").tobytes(), "s16le")
    assert parse_audio(np.array([16384, -32768], dtype="<i2").tobytes(), "s16le").tolist() == [0.5, -1.0]
    assert parse_control('{"type": "set", "budget": 0.3}') == ("set", {"budget": 0.3, "threshold": None})
    assert parse_control('{"type": "end"}') == ("end", {})
    with pytest.raises(ProtocolError, match="one of"):
        parse_control('{"type": "set", "budget": 0.3, "threshold": 1}')


def test_settings_the_model_cannot_give_are_refused_with_what_it_can(random_engine):
    e = random_engine
    with pytest.raises(SettingsError, match="valid exits: 2, 4, 6"):
        e.resolve(Settings(exit_layer=3))
    with pytest.raises(SettingsError, match="needs a criterion"):
        e.resolve(Settings(exit_layer=6, budget=0.5))
    with pytest.raises(SettingsError, match="unknown criterion 'depth'"):
        e.resolve(Settings(strategy="depth", threshold=1.0))
    with pytest.raises(SettingsError, match="no budget curve for 'entropy'"):
        e.resolve(Settings(strategy="entropy", budget=0.5))
    assert e.resolve(Settings())[0].exit_layer == 6  # nothing asked: the last exit
    assert e.resolve(Settings(strategy="entropy", threshold=1.5))[1] == 1.5


# ------------------------------------------------------------------------------------------ the engine
def test_a_budget_picks_the_best_threshold_within_it_and_the_cheapest_below_every_one(random_engine, speech):
    e = random_engine
    utts = [Utterance(str(i), torch.from_numpy(fbank(x)), text.split()) for i, (x, text) in enumerate(speech)]
    rows = e.calibrate("confidence", utts, points=5)
    assert len(rows) >= 3 and any(math.isinf(r["threshold"]) for r in rows)
    fitted = 0
    for budget in (0.3, 0.6, 1.0):
        t = e.threshold_for("confidence", budget)
        row = next(r for r in rows if r["threshold"] == t)
        fits = [r for r in rows if r["cost"] <= budget * e.full_cost]
        if fits:
            fitted += 1
            assert row["cost"] <= budget * e.full_cost and row["wer"] == min(r["wer"] for r in fits)
    assert fitted >= 2  # the budgets tried are not all below every threshold's cost
    cheapest = min(rows, key=lambda r: r["cost"])
    assert e.threshold_for("confidence", 0.01) == cheapest["threshold"]
    with pytest.raises(SettingsError, match=r"in \(0, 1\]"):
        e.threshold_for("confidence", 1.5)


def test_streams_fed_in_pieces_give_the_words_of_decoding_each_file_alone(random_engine, speech):
    """Three streams at once, audio in 100 ms pieces, one at a fixed exit, one per-chunk: each gives the words
    and exits that decoding its file alone gives."""
    e = random_engine
    got = {}
    opened = [(e.open(Settings(exit_layer=4, endpoint=False), got.setdefault(0, []).append), 0),
              (e.open(Settings(strategy="confidence", threshold=0.3, endpoint=False), got.setdefault(1, []).append), 1),
              (e.open(Settings(exit_layer=6, endpoint=False), got.setdefault(2, []).append), 2)]
    for s, i in opened:
        x = speech[i][0]
        for k in range(0, len(x), 1600):
            s.feed(x[k: k + 1600])
            if k % 4800 == 0:
                e.step()  # chunks run while audio still comes in
        s.end()
    while e.active:
        e.step()
    rule = ChunkExitRule(e.model, "confidence", 0.3, "ctc")
    expected = [alone_words(e, speech[0][0], 4), alone_words(e, speech[1][0], rule=rule),
                alone_words(e, speech[2][0], 6)]
    for i in range(3):
        finals = [m for m in got[i] if m["type"] == "final"]
        assert len(finals) == 1 and finals[0]["last"]
        assert finals[0]["text"] == expected[i]
        partials = [m for m in got[i] if m["type"] == "partial"]
        assert [m["exit"] for m in partials] == finals[0]["chunk_exits"]
        assert partials[-1]["text"] == finals[0]["text"]
    assert set(finals[0]["chunk_exits"]) <= {2, 4, 6}


# ------------------------------------------------------------------------------------------ the server
def test_the_server_serves_the_page_its_info_and_stats(random_engine):
    with served(random_engine) as server:
        page = urllib.request.urlopen(server.url).read().decode()
        assert "app.js" in page and 'id="strip"' in page
        assert "AudioWorkletNode" in urllib.request.urlopen(server.url + "app.js").read().decode()
        info = json.loads(urllib.request.urlopen(server.url + "info").read())
        assert info["exits"] == [2, 4, 6] and info["chunk_ms"] == 320
        stats = json.loads(urllib.request.urlopen(server.url + "stats").read())
        assert stats["streams"] == 0 and stats["max_streams"] == 64
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.url + "nothing")


def test_bad_clients_are_told_what_was_wrong_and_cost_a_good_client_nothing(random_engine, speech):
    x = speech[0][0]
    expected = alone_words(random_engine, x, 6)
    start = json.dumps({"type": "start", "sample_rate": 16000, "exit": 6})

    async def scene(url):
        good = asyncio.create_task(stream_audio(url, x, {"exit": 6, "endpoint": False}, realtime=4.0))
        bad = await asyncio.gather(
            raw_session(url, b"\x01\x02\x03"),  # audio before the start
            raw_session(url, json.dumps({"type": "start", "sample_rate": 44100})),  # wrong rate
            raw_session(url, start, b"\x00" * 7),  # not whole samples
            raw_session(url, start, "not json"),  # garbage text
            raw_session(url, start, np.full(800, 1e4, dtype="<f4").tobytes()),  # int16 declared as float
            raw_session(url, json.dumps({"type": "start", "sample_rate": 16000, "exit": 5})),  # no such exit
            raw_session(url, start, json.dumps({"type": "set", "budget": 0.5})),  # a budget for a fixed exit
        )
        return await good, bad

    with served(random_engine) as server:
        good, bad = run(scene(ws_url(server)))
        for (msgs, code), (want_code, words) in zip(bad, [
                (1003, "binary data before"), (1003, "wrong sample rate 44100"), (1003, "7 bytes"),
                (1003, "JSON objects"), (1003, "int16"), (1008, "valid exits: 2, 4, 6"), (1008, "needs a criterion")]):
            assert msgs[-1]["type"] == "error" and words in msgs[-1]["message"], msgs
            assert code == want_code
        assert good.text == expected and good.close_code == 1000
        assert idle(server)


def test_a_client_that_vanishes_mid_stream_is_dropped_and_the_others_go_on(random_engine, speech):
    x = speech[1][0]
    expected = alone_words(random_engine, x, 4)

    async def vanish(url):
        from websockets.asyncio.client import connect

        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "exit": 4}))
            await ws.send(x[: len(x) // 2].astype("<f4").tobytes())
            await asyncio.sleep(0.3)
        # gone without "end"

    async def scene(url):
        return await asyncio.gather(vanish(url), stream_audio(url, x, {"exit": 4, "endpoint": False}, realtime=4.0))

    with served(random_engine) as server:
        _, good = run(scene(ws_url(server)))
        assert good.text == expected
        assert idle(server)


def test_more_clients_than_the_limit_are_refused_until_one_leaves(random_engine, speech):
    x = speech[0][0]

    async def scene(url):
        from websockets.asyncio.client import connect

        holders = [await connect(url) for _ in range(2)]
        for h in holders:
            await h.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert json.loads(await h.recv())["type"] == "ready"
        refused = await raw_session(url, json.dumps({"type": "start", "sample_rate": 16000}))
        await holders[0].close()
        await asyncio.sleep(0.3)
        later = await stream_audio(url, x[:16000], {"exit": 2}, realtime=0)
        await holders[1].close()
        return refused, later

    with served(random_engine, max_streams=2) as server:
        (msgs, code), later = run(scene(ws_url(server)))
        assert code == 1013 and "server is full" in msgs[-1]["message"] and "2 streams" in msgs[-1]["message"]
        assert later.close_code == 1000 and later.of("final")
        assert server.refused == 1


def test_the_budget_set_during_a_stream_takes_effect_from_the_next_chunk(random_engine, speech):
    e = random_engine
    if "confidence" not in e.curves:
        e.calibrate("confidence", [Utterance("0", torch.from_numpy(fbank(speech[0][0])))], points=5)
    low, high = e.threshold_for("confidence", 0.2), e.threshold_for("confidence", 1.0)
    x = np.concatenate([speech[0][0]] * 2)

    async def scene(url):
        from websockets.asyncio.client import connect

        got = []
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "strategy": "confidence", "budget": 1.0,
                                      "endpoint": False}))
            got.append(json.loads(await ws.recv()))
            half = len(x) // 2
            await ws.send(x[:half].astype("<f4").tobytes())
            while not any(m["type"] == "partial" for m in got):
                got.append(json.loads(await ws.recv()))
            await asyncio.sleep(0.5)
            await ws.send(json.dumps({"type": "set", "budget": 0.2}))
            await ws.send(x[half:].astype("<f4").tobytes())
            await ws.send(json.dumps({"type": "end"}))
            async for raw in ws:
                got.append(json.loads(raw))
        return got

    with served(e) as server:
        got = run(scene(ws_url(server)))
    partials = [m for m in got if m["type"] == "partial"]
    assert got[0]["threshold"] == high
    assert partials[0]["threshold"] == high and partials[-1]["threshold"] == low
    assert partials[-1]["budget_macs_per_second"] == pytest.approx(0.2 * e.full_cost)


# ------------------------------------------------------------------------------------------ a trained model
@pytest.fixture(scope="module")
def trained_engine(an4_recipe_runs, an4_data):
    from splitformer.serve import build_engine, get_parser

    exp = an4_recipe_runs.wait("causal")
    args = get_parser().parse_args(["--exp-dir", str(exp), *CAUSAL.avg, "--chunk-size", str(CAUSAL.chunk),
                                    "--left-context-frames", str(CAUSAL.left), "--manifest-dir",
                                    str(an4_data / "fbank"), "--bpe-model",
                                    str(an4_data / "lang_bpe_30" / "bpe.model"), "--calibration-utts", "12",
                                    "--budget-points", "4"])
    engine, _ = build_engine(args)
    assert "confidence" in engine.curves
    return engine


def test_the_server_gives_streaming_decodes_words_for_the_same_file_exit_and_criterion(trained_engine, speech):
    """One client at a time, at real time x 8: the words of the server equal those of decoding the file's
    features as a stream (streaming_decode.py's decoder), at each exit and per chunk."""
    e = trained_engine
    threshold = e.threshold_for("confidence", 0.6)
    rule = ChunkExitRule(e.model, "confidence", threshold, e.scorer)

    async def one(url, x, start):
        return await stream_audio(url, x, dict(start, endpoint=False), realtime=8.0)

    with served(e) as server:
        for x, text in speech:
            for start, expected in [({"exit": 2}, alone_words(e, x, 2)), ({"exit": 4}, alone_words(e, x, 4)),
                                    ({"strategy": "confidence", "budget": 0.6}, alone_words(e, x, rule=rule))]:
                got = run(one(ws_url(server), x, start))
                assert got.text == expected, (start, text)
                assert got.close_code == 1000


def test_a_pause_ends_an_utterance_and_the_stream_goes_on(trained_engine, speech):
    """Two files with 3 s of quiet noise between them, sent at once: with endpointing the pauses (however fast the
    audio came) end utterances, numbered in order, the last one marked, no chunk lost; without it, one utterance."""
    e = trained_engine
    x = speech[0][0]
    audio = np.concatenate([x, np.random.default_rng(0).normal(0, 1e-4, 16000 * 3).astype(np.float32), x])
    finals = {}
    for endpoint in (True, False):
        got = []
        s = e.open(Settings(exit_layer=4, endpoint=endpoint), got.append)
        s.feed(audio)
        s.end()
        while e.active:
            e.step()
        finals[endpoint] = [m for m in got if m["type"] == "final"]
    split, whole = finals[True], finals[False]
    assert len(whole) == 1 and whole[0]["last"]
    assert len(split) >= 2 and split[-1]["last"] and not any(m["last"] for m in split[:-1])
    assert [m["segment"] for m in split] == list(range(len(split)))
    assert sum(len(m["chunk_exits"]) for m in split) >= len(whole[0]["chunk_exits"]) - len(split)


# ------------------------------------------------------------------------------------------ the page, in a browser
def _browser(fake_audio: Path):
    """Debian's headless Chromium under Selenium, hearing ``fake_audio`` (a 16-bit wav) as its microphone, once."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        why = "no Chromium: install Debian's chromium and chromium-driver (tools/install_browser.sh does, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI installs them through run_tests.sh")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
              f"--use-file-for-fake-audio-capture={fake_audio}%noloop", "--autoplay-policy=no-user-gesture-required"]:
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _page_run(engine: Engine, wav: Path, query: str, chunks: int, budget_after_first_chunk=None):
    """Opens the page with ``query`` (one utterance: no endpointing) in Chromium hearing ``wav``, presses Stop once
    the strip has ``chunks`` cells, and returns what the page then showed (text, exit strip, compute line, status)
    and what the server sent its stream."""
    import time

    from selenium.webdriver.common.by import By

    sent = []
    opener = engine.open
    engine.open = lambda settings, publish, name="": opener(settings, lambda m: (sent.append(m), publish(m)), name)
    try:
        with served(engine) as server:
            browser = _browser(wav)
            try:
                browser.get(server.url + "?autostart=1&endpoint=0&" + query)
                end = time.monotonic() + 90

                def cells() -> int:
                    return len(browser.find_elements(By.CSS_SELECTOR, "#strip .chunk"))

                if budget_after_first_chunk is not None:
                    while cells() == 0 and time.monotonic() < end:
                        time.sleep(0.05)
                    browser.execute_script(f"const b = document.getElementById('budget'); b.value = "
                                           f"'{budget_after_first_chunk}'; b.dispatchEvent(new Event('input'));")
                while cells() < chunks and time.monotonic() < end:
                    time.sleep(0.1)
                browser.find_element(By.ID, "stop").click()
                while not browser.find_elements(By.CSS_SELECTOR, "#transcript .final") and time.monotonic() < end:
                    time.sleep(0.1)
                finals = browser.find_elements(By.CSS_SELECTOR, "#transcript .final")
                shown = dict(text=finals[0].text if finals else None,
                             strip=[int(c.get_attribute("data-exit"))
                                    for c in browser.find_elements(By.CSS_SELECTOR, "#strip .chunk")],
                             compute=browser.find_element(By.ID, "compute").text,
                             status=browser.find_element(By.ID, "status").text)
            finally:
                browser.quit()
    finally:
        del engine.open
    return shown, sent


def test_the_page_in_chromium_shows_the_words_and_exits_the_server_sent(trained_engine, speech, tmp_path):
    """An AN4 test file is the fake microphone, at a fixed exit, until Stop: the page shows the server's final
    words, and one cell per chunk, each at that exit."""
    e = trained_engine
    x, _ = speech[0]
    wav = tmp_path / "mic.wav"
    import soundfile as sf

    sf.write(wav, x, 16000, subtype="PCM_16")
    chunks = math.ceil(len(x) / 16000 / e.chunk_seconds)
    shown, sent = _page_run(e, wav, "mode=exit:4", chunks)
    finals = [m for m in sent if m["type"] == "final"]
    assert finals, f"the server sent no final result (page status: {shown['status']!r})"
    assert shown["text"] == (finals[0]["text"] or "(nothing heard)")
    assert len(finals) == 1 and finals[0]["last"]  # one utterance, ended by Stop
    assert shown["strip"] == finals[0]["chunk_exits"] and set(shown["strip"]) == {4}
    assert len(shown["strip"]) >= chunks
    assert "M MACs per second of audio" in shown["compute"]
    # Chromium's fake capture resamples the file and does not start it at the same sample every run, so the words
    # vary from run to run; the server's words are tested against the file's, token for token, without a browser
    assert finals[0]["text"], "the page heard no words"


def test_the_pages_budget_slider_reaches_the_server_from_the_next_chunk(trained_engine, speech, tmp_path):
    """Per-chunk exits within a budget; the slider moved after the first chunk: the server's chunks after it run
    under the new budget, and the strip shows every chunk's exit as the server chose it."""
    e = trained_engine
    x, _ = speech[1]
    wav = tmp_path / "mic.wav"
    import soundfile as sf

    sf.write(wav, x, 16000, subtype="PCM_16")
    chunks = math.ceil(len(x) / 16000 / e.chunk_seconds)
    shown, sent = _page_run(e, wav, "mode=strategy:confidence&budget=1", chunks, budget_after_first_chunk=0.2)
    partials = [m for m in sent if m["type"] == "partial"]
    finals = [m for m in sent if m["type"] == "final"]
    assert len(finals) == 1 and shown["text"] == (finals[0]["text"] or "(nothing heard)")
    assert shown["strip"] == [m["exit"] for m in partials] == finals[0]["chunk_exits"]
    assert set(shown["strip"]) <= set(e.exits)
    budgets = [m["budget_macs_per_second"] for m in partials]
    assert budgets[0] == pytest.approx(e.full_cost) and budgets[-1] == pytest.approx(0.2 * e.full_cost)
    assert partials[0]["threshold"] == e.threshold_for("confidence", 1.0)
    assert partials[-1]["threshold"] == e.threshold_for("confidence", 0.2)
