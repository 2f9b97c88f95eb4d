"""The per-item checks of prepare.sh's stage 1 (make_cuts.py) and stage 5 (validate.py), each bad kind
on its own, small enough to run without a corpus: every bad item is rejected by id with a reason that
names it, and the good ones around it survive."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.utils import fastcopy

from an4_fixture import REPO

sys.path.insert(0, str(REPO / "local"))
from make_cuts import make_cuts  # noqa: E402
from validate import check_cut, validate  # noqa: E402

from splitformer.data import use_soundfile_for_sphere  # noqa: E402

use_soundfile_for_sphere()  # as prepare.sh's scripts do: plain SPHERE without sph2pipe

SR = 16000


def _tone(seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _sup(sid: str, rec: str, start: float = 0.0, duration: float = 1.0, text: str = "YES") -> SupervisionSegment:
    return SupervisionSegment(id=sid, recording_id=rec, start=start, duration=duration, text=text)


@pytest.fixture
def audio(tmp_path):
    files = {}
    files["good"] = tmp_path / "good.wav"
    sf.write(files["good"], _tone(2.0), SR, subtype="PCM_16")
    files["nan"] = tmp_path / "nan.wav"
    x = _tone(1.0)
    x[100] = np.nan
    sf.write(files["nan"], x, SR, subtype="FLOAT")
    files["inf"] = tmp_path / "inf.wav"
    x = _tone(1.0)
    x[5] = np.inf
    sf.write(files["inf"], x, SR, subtype="FLOAT")
    files["nosamples"] = tmp_path / "nosamples.wav"  # a valid header, no samples
    sf.write(files["nosamples"], np.zeros(0, dtype=np.float32), SR, subtype="PCM_16")
    files["truncated"] = tmp_path / "truncated.wav"
    whole = tmp_path / "whole.wav"
    sf.write(whole, _tone(1.0), SR, subtype="PCM_16")
    files["truncated"].write_bytes(whole.read_bytes()[: 44 + 2 * 4000])  # header says 16000 samples, 4000 remain
    return files


def test_stage1_rejects_each_bad_kind_by_id_and_keeps_the_good(audio, tmp_path):
    recs = RecordingSet.from_recordings(Recording.from_file(p, recording_id=k) for k, p in audio.items())
    sups = SupervisionSet.from_segments([
        _sup("ok-1", "good", 0.0, 1.0),
        _sup("ok-2", "good", 1.0, 1.0),
        _sup("ok-clipped", "good", 1.5, 0.53),  # overruns by 0.03 s: within tolerance, clipped to the audio
        _sup("outside", "good", 1.5, 1.0),  # ends 0.5 s after the audio
        _sup("negstart", "good", -0.5, 1.0),
        _sup("zero-dur", "good", 0.5, 0.0),
        _sup("neg-dur", "good", 0.5, -1.0),
        _sup("nan-audio", "nan"),
        _sup("inf-audio", "inf"),
        _sup("no-samples", "nosamples"),
        _sup("trunc", "truncated"),
        _sup("orphan", "no-such-recording"),
    ])
    cuts, rejects = make_cuts(recs, sups, tmp_path / "converted", num_jobs=1)
    reasons = dict(rejects)
    assert sorted(cuts.ids) == ["ok-1", "ok-2", "ok-clipped"]
    assert cuts["ok-clipped"].duration == pytest.approx(0.5)
    expect = {
        "outside": "lies outside the 2.00 s audio",
        "negstart": "lies outside",
        "zero-dur": "non-positive duration",
        "neg-dur": "non-positive duration",
        "nan-audio": f"audio file {audio['nan']} decodes to NaN/inf samples",
        "inf-audio": f"audio file {audio['inf']} decodes to NaN/inf samples",
        "no-samples": f"audio file {audio['nosamples']} holds no samples",
        "trunc": f"truncated audio file {audio['truncated']}: header declares 16000 samples, only 4000 present",
        "orphan": "no recording no-such-recording",
    }
    assert set(reasons) == set(expect)
    for sid, words in expect.items():
        assert words in reasons[sid], (sid, reasons[sid])


def test_stage1_with_nothing_usable_returns_no_cuts(audio, tmp_path):
    recs = RecordingSet.from_recordings([Recording.from_file(audio["nan"], recording_id="nan")])
    cuts, rejects = make_cuts(recs, SupervisionSet.from_segments([_sup("a", "nan")]), tmp_path / "c", num_jobs=1)
    assert len(cuts) == 0 and [sid for sid, _ in rejects] == ["a"]


@pytest.fixture
def cut_with_features(audio, tmp_path):
    rec = Recording.from_file(audio["good"], recording_id="good")
    cut = CutSet.from_manifests(recordings=RecordingSet.from_recordings([rec]),
                                supervisions=SupervisionSet.from_segments([_sup("good", "good", 0.0, 2.0)]))
    cut = cut.compute_and_store_features(Fbank(FbankConfig(num_mel_bins=80)), tmp_path / "feats",
                                         storage_type=LilcomChunkyWriter)
    return cut[0]


def test_stage5_checks_each_kind(cut_with_features, monkeypatch):
    c = cut_with_features
    assert check_cut(c) is None
    assert "non-positive duration" in check_cut(fastcopy(c, duration=0.0))
    assert check_cut(fastcopy(c, supervisions=[fastcopy(c.supervisions[0], text="  ")])) == "empty transcript"
    slow = fastcopy(c, recording=fastcopy(c.recording, sampling_rate=8000),
                    features=fastcopy(c.features, sampling_rate=8000))
    assert check_cut(slow) == "sampling rate 8000 Hz, expected 16000"
    assert check_cut(fastcopy(c, features=None)) == "no features (stage 3 did not run for it)"
    gone = fastcopy(c, features=fastcopy(c.features, storage_path=str(Path(c.features.storage_path) / "missing")))
    assert "features do not load from" in check_cut(gone) and "missing" in check_cut(gone)
    # features that load but are the wrong shape, or hold NaN
    monkeypatch.setattr(type(c), "load_features", lambda self: np.zeros((10, 40), dtype=np.float32))
    assert check_cut(c) == "features have shape (10, 40), expected (T>0, 80)"
    monkeypatch.setattr(type(c), "load_features", lambda self: np.zeros((0, 80), dtype=np.float32))
    assert check_cut(c) == "features have shape (0, 80), expected (T>0, 80)"
    monkeypatch.setattr(type(c), "load_features", lambda self: np.full((10, 80), np.nan, dtype=np.float32))
    assert check_cut(c) == "features hold 800 non-finite values"


def test_stage5_keeps_the_good_and_reports_the_bad(cut_with_features):
    c = cut_with_features
    cuts = CutSet.from_cuts([c, fastcopy(c, id="nofeats", features=None), fastcopy(c, id="copy")])
    good, rejects = validate(cuts)
    assert sorted(good.ids) == sorted(["copy", c.id]) and [sid for sid, _ in rejects] == ["nofeats"]


def test_an_all_bad_split_stops_prepare_with_exit_2(tmp_path):
    """make_cuts.py's command: exit status 2, and the reason, when no utterance of a split is usable."""
    man = tmp_path / "manifests"
    man.mkdir()
    wav = tmp_path / "r.wav"
    sf.write(wav, _tone(1.0), SR, subtype="PCM_16")
    RecordingSet.from_recordings([Recording.from_file(wav, recording_id="r")]).to_file(man / "x_recordings_train.jsonl.gz")
    SupervisionSet.from_segments([_sup("u", "r", duration=0.0)]).to_file(man / "x_supervisions_train.jsonl.gz")
    r = subprocess.run([sys.executable, str(REPO / "local" / "make_cuts.py"), "--dataset", "x", "--splits", "train",
                        "--manifest-dir", str(man), "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no usable utterance left" in r.stderr
    assert "non-positive duration" in (tmp_path / "train_rejected.txt").read_text()


def test_an4_duplicate_utterance_id_keeps_the_first(tmp_path):
    from an4 import prepare_part

    corpus = tmp_path / "an4"
    (corpus / "etc").mkdir(parents=True)
    wav_dir = corpus / "wav" / "an4test_clstk" / "fabc"
    wav_dir.mkdir(parents=True)
    for utt in ("an1-fabc-b", "an2-fabc-b"):
        sf.write(wav_dir / f"{utt}.sph", (_tone(1.0) * 3e4).astype(np.int16), SR, format="NIST", subtype="PCM_16")
    lines = ["<s> YES </s> (an1-fabc-b)", "<s> NO </s> (an2-fabc-b)", "<s> AGAIN </s> (an1-fabc-b)"]
    (corpus / "etc" / "an4_test.transcription").write_text("\n".join(lines) + "\n")
    (corpus / "etc" / "an4_test.fileids").write_text("an4test_clstk/fabc/an1-fabc-b\nan4test_clstk/fabc/an2-fabc-b\n")
    recs, sups, rejects = prepare_part(corpus, "test")["test"]
    assert [s.text for s in sups] == ["YES", "NO"], rejects
    assert len(rejects) == 1 and rejects[0][0] == "an1-fabc-b" and "duplicate utterance id an1-fabc-b" in rejects[0][1]


def test_tedlium_talk_without_stm_is_reported_and_the_rest_goes_on(tmp_path):
    from lhotse_recipes import tedlium_usable_root

    root = tmp_path / "tedlium" / "legacy" / "test"
    (root / "sph").mkdir(parents=True)
    (root / "stm").mkdir()
    for talk in ("TalkA", "TalkB"):
        sf.write(root / "sph" / f"{talk}.sph", (_tone(1.0) * 3e4).astype(np.int16), SR, format="NIST", subtype="PCM_16")
    (root / "stm" / "TalkA.stm").write_text("TalkA 1 TalkA 0.00 1.00 <o,f0,male> hello\n")
    problems = {"test": []}
    usable = tedlium_usable_root(tmp_path / "tedlium", ["test"], tmp_path / "scratch", problems)
    assert [t for t, _ in problems["test"]] == ["TalkB"]
    assert "TalkB.sph has no transcript" in problems["test"][0][1]
    assert sorted(p.name for p in (usable / "legacy" / "test" / "sph").iterdir()) == ["TalkA.sph"]


def test_stage3_a_cut_whose_features_fail_is_reported_and_the_others_kept(tmp_path):
    """compute_fbank.py: lhotse skips a cut whose audio no longer loads; that cut is reported, not lost silently."""
    from compute_fbank import compute_split

    paths = []
    for name in ("keep", "gone"):
        paths.append(tmp_path / f"{name}.wav")
        sf.write(paths[-1], _tone(1.0), SR, subtype="PCM_16")
    recs = RecordingSet.from_recordings(Recording.from_file(p, recording_id=p.stem) for p in paths)
    sups = SupervisionSet.from_segments([_sup(p.stem, p.stem) for p in paths])
    cuts = CutSet.from_manifests(recordings=recs, supervisions=sups)
    src = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(src)
    paths[1].write_bytes(b"RIFF" + b"\0" * 40)  # the audio breaks after stage 1 checked it
    n, rejects = compute_split(src, tmp_path / "fbank.jsonl.gz", tmp_path / "feats", num_jobs=1)
    assert n == 1 and [cid for cid, _ in rejects] == [cuts.subset(last=1)[0].id]
    assert "feature extraction failed" in rejects[0][1] and str(paths[1]) in rejects[0][1]
    assert CutSet.from_file(tmp_path / "fbank.jsonl.gz")[0].has_features
