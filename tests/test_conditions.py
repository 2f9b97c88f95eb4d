"""Stage 7's unmatched test conditions (local/conditions.py): each does to a real AN4 recording what it says,
the same way every time, and the stage writes cuts + features + labels as stage 6 does."""
import json
import sys

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import welch

from an4_fixture import REPO, an4_utterances

sys.path.insert(0, str(REPO / "local"))
import conditions as C  # noqa: E402
from make_variants import speech_bounds  # noqa: E402

SR = 16000


@pytest.fixture(scope="module")
def speech(an4_dir):
    """A real AN4 test utterance (an406-fcaw-b: 4 s, a woman spelling) and another speaker's, as float64."""
    utts = {u.id: u for u in an4_utterances(an4_dir, part="test")}
    x, sr = sf.read(utts["an406-fcaw-b"].path, dtype="float64")
    other, _ = sf.read(utts["an391-mjwl-b"].path, dtype="float64")
    assert sr == SR
    return x, other


def band_db(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    f, pxx = welch(x, fs=sr, nperseg=1024)
    sel = (f >= lo) & (f < hi)
    return 10.0 * np.log10(np.sum(pxx[sel]) + 1e-30)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    return 10.0 * np.log10(C.power(clean) / C.power(noisy - clean))


def test_telephone_keeps_300_to_3400_hz_only(speech):
    x, _ = speech
    y = C.telephone(x)
    assert y.shape == x.shape
    in_band = band_db(y, SR, 500, 3000) - band_db(x, SR, 500, 3000)
    assert abs(in_band) < 1.0  # the band a phone carries is kept (mu-law noise included)
    assert band_db(y, SR, 20, 150) - band_db(x, SR, 20, 150) < -20.0  # under 300 Hz: cut
    assert band_db(y, SR, 4200, 8000) - band_db(x, SR, 4200, 8000) < -40.0  # above 4 kHz: nothing was left at 8 kHz
    assert band_db(y, SR, 3700, 4000) - band_db(x, SR, 3700, 4000) < -10.0  # above 3400 Hz: on its way down


def test_mulaw_round_trip_at_8_khz_is_a_256_level_codec(speech):
    x, _ = speech
    x8 = C.resample(C.band_limit(x, SR), SR, C.PHONE_SR)
    y8 = C.mulaw_round_trip(x8)
    assert y8.shape == x8.shape and abs(len(x8) - len(x) / 2) <= 1
    assert len(np.unique(y8)) <= 256  # 8 bits a sample
    np.testing.assert_array_equal(C.mulaw_round_trip(y8), y8)  # decoded levels encode to themselves
    # companding: 8 bits of mu-law keep the error ~35 dB under this quiet close-talk speech (peak -18 dBFS),
    # where 8 bits spaced evenly would manage ~20 dB
    assert 30.0 < snr_db(x8, y8) < 45.0
    assert snr_db(x8, y8) > snr_db(x8, np.round(x8 * 128) / 128) + 10.0


def test_babble_is_mixed_at_the_snr_it_names_from_other_speakers(speech):
    x, other = speech
    pool = {"fcaw": [x], "mjwl": [other], "marh": [other[::2].copy()]}
    for name, want in (("babble10", 10.0), ("babble20", 20.0)):
        y, facts = C.apply(name, x, "an406-fcaw-b", "fcaw", pool)
        assert "scaled_to_peak" not in facts and facts["snr_db"] == want
        assert snr_db(x, y) == pytest.approx(want, abs=0.01)
    # the talker's own voice never babbles behind them; a split of one speaker has no babble to make
    rng = np.random.default_rng(0)
    assert all(t is not x for t in C.pick_talkers("fcaw", pool, rng))
    assert len(C.pick_talkers("fcaw", pool, rng)) == C.BABBLE_TALKERS
    with pytest.raises(ValueError, match="speakers other than 'fcaw'"):
        C.pick_talkers("fcaw", {"fcaw": [x]}, rng)


def test_babble_is_reversed_speech_without_gaps():
    """Reversed: a rising chirp comes out falling. Looped from a random point to the length asked for."""
    t = np.arange(SR) / SR
    chirp = np.sin(2 * np.pi * (200 + 800 * t) * t)
    out = C.babble(3 * SR, [chirp], np.random.default_rng(0))
    assert out.size == 3 * SR and C.power(out[: SR // 2]) > 0.1 and C.power(out[-SR // 2:]) > 0.1
    rev = C.babble(SR, [chirp], np.random.default_rng(1))
    start = int(np.random.default_rng(1).integers(0, SR))
    np.testing.assert_allclose(rev, np.roll(chirp[::-1], -start) / np.sqrt(C.power(chirp)))


def test_speed_changes_the_duration_and_the_pitch(speech):
    x, _ = speech
    for f in (0.9, 1.1):
        y = C.speed(x, f)
        assert len(y) / len(x) == pytest.approx(1.0 / f, abs=1e-3)
        tone = np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
        spec = np.abs(np.fft.rfft(C.speed(tone, f)))
        peak = np.argmax(spec) * SR / (2 * (len(spec) - 1))
        assert peak == pytest.approx(440 * f, rel=0.01)


def test_quiet_sets_the_peak_to_minus_30_dbfs(speech, tmp_path):
    x, _ = speech
    y, _ = C.apply("quiet", x, "an406-fcaw-b", "fcaw", {})
    assert 20 * np.log10(np.max(np.abs(y))) == pytest.approx(-30.0, abs=1e-9)
    assert np.allclose(y / np.max(np.abs(y)), x / np.max(np.abs(x)))  # a gain, nothing else
    sf.write(tmp_path / "q.flac", y, SR, subtype="PCM_16")  # as the stage stores it: 16-bit
    back, _ = sf.read(tmp_path / "q.flac")
    assert 20 * np.log10(np.max(np.abs(back))) == pytest.approx(-30.0, abs=0.01)


def test_reverb_spreads_the_energy_into_a_tail(speech):
    x, _ = speech
    y, facts = C.apply("reverb", x, "an406-fcaw-b", "fcaw", {})
    assert y.shape == x.shape and 0.3 <= facts["rt60"] <= 0.7 and 1.0 <= facts["distance_m"] <= 2.5
    assert C.power(y) == pytest.approx(C.power(x), rel=1e-6)  # the room changes the sound, not the level
    _, end = speech_bounds(x, SR)
    tail = slice(int(end * SR), int(end * SR) + int(0.15 * SR))  # 150 ms after the last word
    assert 10 * np.log10(C.power(y[tail]) / C.power(x[tail])) > 10.0
    # the impulse response decays as the room's RT60 says
    import pyroomacoustics as pra

    room = C.draw_room(np.random.default_rng(C.seed_for("reverb", "an406-fcaw-b")))
    assert room.rt60 == pytest.approx(facts["rt60"], abs=1e-3)
    rir = C.room_impulse_response(room)
    assert pra.experimental.measure_rt60(rir, fs=SR, decay_db=30) == pytest.approx(room.rt60, rel=0.3)


def test_each_condition_is_seeded_by_the_utterance(speech):
    x, other = speech
    pool = {"fcaw": [x], "mjwl": [other], "marh": [other[::-1].copy()]}
    for name in C.CONDITIONS:
        a, _ = C.apply(name, x, "an406-fcaw-b", "fcaw", pool)
        b, _ = C.apply(name, x, "an406-fcaw-b", "fcaw", pool)
        np.testing.assert_array_equal(a, b)
    c, _ = C.apply("babble10", x, "an407-fcaw-b", "fcaw", pool)
    a, _ = C.apply("babble10", x, "an406-fcaw-b", "fcaw", pool)
    assert not np.array_equal(a, c)  # another utterance, other draws


def test_the_stage_writes_cuts_features_and_labels(an4_dir, tmp_path):
    """local/conditions.py (prepare.sh stage 7) on four test utterances of two speakers, next to a labels file
    stage 6 already wrote: same ids and texts, the condition's duration, fbank, and every set labelled."""
    from lhotse import CutSet, Recording, SupervisionSegment, load_manifest

    from splitformer.data import use_soundfile_for_sphere

    use_soundfile_for_sphere()
    utts = [u for u in an4_utterances(an4_dir, part="test") if u.id.split("-")[1] in ("fcaw", "mjwl")][:2]
    utts += [u for u in an4_utterances(an4_dir, part="test") if u.id.split("-")[1] == "mjwl"][:2]
    cuts = []
    for u in utts:
        rec = Recording.from_file(u.path, recording_id=u.id)
        sup = SupervisionSegment(id=u.id, recording_id=u.id, start=0.0, duration=rec.duration, text=u.text,
                                 speaker=u.id.split("-")[1])
        cuts.append(rec.to_cut().with_id(u.id))
        cuts[-1].supervisions = [sup]
    manifests, fbank, data = tmp_path / "manifests", tmp_path / "fbank", tmp_path
    manifests.mkdir()
    CutSet.from_cuts(cuts).to_file(manifests / "an4_cuts_test.jsonl.gz")
    C.update_labels(fbank, "an4", {"test-trimmed": C.label("test", "trimmed", True)})
    C.main(["--dataset", "an4", "--splits", "test", "--manifest-dir", str(manifests), "--fbank-dir", str(fbank),
            "--data-dir", str(data)])
    labels = json.loads((fbank / "an4_conditions.json").read_text())
    assert labels["test-trimmed"]["matched"] is True
    for name in C.CONDITIONS:
        assert labels[f"test-{name}"] == dict(matched=False, condition=name, source="test",
                                              what=C.CONDITIONS[name].what)
        made = {c.id: c for c in load_manifest(fbank / f"an4_cuts_test-{name}.jsonl.gz")}
        assert sorted(made) == sorted(u.id for u in utts)
        assert (data / f"test-{name}_rejected.txt").read_text() == ""
        for u in utts:
            c, src = made[u.id], next(x for x in cuts if x.id == u.id)
            ratio = {"speed0.9": 1 / 0.9, "speed1.1": 1 / 1.1}.get(name, 1.0)
            assert c.duration == pytest.approx(src.duration * ratio, abs=2e-3)
            assert c.supervisions[0].text == u.text and c.supervisions[0].duration == pytest.approx(c.duration)
            assert c.custom["condition"]["name"] == name and c.custom["condition"]["matched"] is False
            feats = c.load_features()
            assert feats.shape[1] == 80 and np.isfinite(feats).all()
            assert c.recording.sources[0].source.endswith(f"conditions/test-{name}/{u.id}.flac")


def test_prepare_makes_every_condition_the_module_defines():
    """local/stages.sh names stage 7's sets (to check they exist on a rerun): the same list as CONDITIONS."""
    import re

    text = (REPO / "local" / "stages.sh").read_text()
    names = re.search(r'cond_names="([^"]+)"', text).group(1).split()
    assert names == list(C.CONDITIONS)
