"""Bad input through ./prepare.sh: each item is reported by id with the reason naming the file, and left out."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import soundfile as sf
from lhotse import load_manifest

from an4_fixture import REPO, an4_utterances


def run_prepare(corpus: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "prepare.sh"), "--corpus-dir", str(corpus), "--data-dir", str(data), "--num-jobs", "1",
         "--dev-rule", "first-lines", *extra],  # this corpus puts its good utterances first
        cwd=data.parent, capture_output=True, text=True, timeout=300,
    )


def build_corpus(an4_dir: Path, root: Path) -> Dict[str, str]:
    """A small AN4-layout corpus: 100 good dev utterances, then train utterances with one of each problem."""
    corpus = root / "an4"
    (corpus / "etc").mkdir(parents=True)
    good = an4_utterances(an4_dir, 106)
    trans, fileids = [], []
    for utt, _, _, line, fid in good:
        dst = corpus / "wav" / f"{fid}.sph"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(an4_dir / "wav" / f"{fid}.sph", dst)  # test scratch only: no audio is copied
        trans.append(line)
        fileids.append(fid)
    src_audio, sr = sf.read(good[0].path, dtype="int16")
    bad_dir = corpus / "wav" / "an4_clstk" / "fbad"
    bad_dir.mkdir(parents=True)

    def add(utt: str, text: str, write=None) -> None:
        if write is not None:
            write(bad_dir / f"{utt}.sph")
        trans.append(f"<s> {text} </s> ({utt})")
        fileids.append(f"an4_clstk/fbad/{utt}")

    raw = good[1].path.read_bytes()
    add("corrupt-fbad-b", "YES", lambda p: p.write_bytes(b"\x13\x37" * 300))
    add("trunc-fbad-b", "YES", lambda p: p.write_bytes(raw[: 1024 + 2000]))
    add("zero-fbad-b", "YES", lambda p: p.write_bytes(b""))
    add("emptytext-fbad-b", "", lambda p: sf.write(p, src_audio, 16000, format="NIST", subtype="PCM_16"))
    add("missing-fbad-b", "NO")
    trans.insert(103, "<s> LINE WITHOUT ID </s>")
    trans.insert(104, "")  # blank lines are ignored
    add("rate8k-fbad-b", "EIGHT", lambda p: sf.write(p, src_audio[::2], 8000, format="NIST", subtype="PCM_16"))
    stereo = np.stack([src_audio, (src_audio // 2).astype(np.int16)], axis=1)
    add("stereo-fbad-b", "TWO", lambda p: sf.write(p, stereo, 16000, format="NIST", subtype="PCM_16"))
    (corpus / "etc" / "an4_train.transcription").write_text("\n".join(trans) + "\n")
    (corpus / "etc" / "an4_train.fileids").write_text("\n".join(fileids) + "\n")
    test = an4_utterances(an4_dir, 3)
    (corpus / "etc" / "an4_test.transcription").write_text("\n".join(u.line for u in test) + "\n")
    (corpus / "etc" / "an4_test.fileids").write_text("\n".join(u.fileid for u in test) + "\n")
    return {"corpus": str(corpus), "first_good_len": str(len(src_audio))}


@pytest.fixture(scope="module")
def bad_run(an4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_an4")
    info = build_corpus(an4_dir, root)
    data = root / "data"
    # a vocabulary that the 106 transcripts can fill: no BPE failure hides what this test is about
    proc = run_prepare(Path(info["corpus"]), data, "--vocab-size", "28")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rejected = dict(l.split("\t", 1) for l in (data / "train_rejected.txt").read_text().splitlines())
    return data, proc, rejected, info


def test_counts(bad_run):
    data, _, rejected, _ = bad_run
    train = load_manifest(data / "fbank" / "an4_cuts_train.jsonl.gz")
    assert len(load_manifest(data / "fbank" / "an4_cuts_dev.jsonl.gz")) == 100
    assert len(load_manifest(data / "fbank" / "an4_cuts_test.jsonl.gz")) == 3
    # 6 good + the 8 kHz and the stereo file (converted); 6 problems left out
    assert len(train) == 8
    assert len(rejected) == 6
    assert not set(train.ids) & set(rejected)


@pytest.mark.parametrize("key, words", [
    ("corrupt-fbad-b", ["corrupt", "corrupt-fbad-b.sph"]),
    ("trunc-fbad-b", ["truncated", "trunc-fbad-b.sph", "header declares"]),
    ("zero-fbad-b", ["zero-length", "zero-fbad-b.sph"]),
    ("emptytext-fbad-b", ["empty transcript"]),
    ("missing-fbad-b", ["missing audio file", "missing-fbad-b.sph"]),
])
def test_each_bad_item_is_reported(bad_run, key, words):
    _, proc, rejected, _ = bad_run
    assert key in rejected, rejected
    for w in words:
        assert w in rejected[key]
    assert f"rejected {key}" in proc.stderr  # also said in the log, not only in the file


def test_line_without_id(bad_run):
    _, proc, rejected, _ = bad_run
    keys = [k for k in rejected if k.startswith("an4_train.transcription:")]
    assert keys == ["an4_train.transcription:104"]
    assert "no utterance id" in rejected[keys[0]] and "LINE WITHOUT ID" in rejected[keys[0]]


def test_8khz_and_stereo_are_converted(bad_run):
    data, proc, _, info = bad_run
    assert "rate8k-fbad-b" in proc.stderr and "resampled 8000 Hz -> 16000 Hz" in proc.stderr
    assert "stereo-fbad-b" in proc.stderr and "downmixed 2 channels to mono" in proc.stderr
    train = load_manifest(data / "fbank" / "an4_cuts_train.jsonl.gz")
    n = int(info["first_good_len"])
    for cid in ("rate8k-fbad-b", "stereo-fbad-b"):
        cut = train[cid]
        assert cut.sampling_rate == 16000 and cut.num_channels == 1
        assert abs(cut.recording.num_samples - n) <= 2
        feats = cut.load_features()
        assert feats.shape[1] == 80 and np.isfinite(feats).all()
    # the downmix is the mean of the two channels
    audio = train["stereo-fbad-b"].load_audio()[0]
    ref, _ = sf.read(Path(info["corpus"]) / "wav" / "an4_clstk" / "fbad" / "stereo-fbad-b.sph", dtype="float32")
    assert np.allclose(audio, ref.mean(axis=1), atol=2e-4)


def test_validation_rejects_non_finite_features(bad_run, tmp_path):
    """Stage 5 on its own: a cut whose features hold NaN is reported and left out."""
    import sys
    sys.path.insert(0, str(REPO / "local"))
    import validate  # noqa: E402
    from lhotse import CutSet, fastcopy
    from lhotse.features.io import NumpyFilesWriter

    data, _, _, _ = bad_run
    cuts = load_manifest(data / "fbank" / "an4_cuts_test.jsonl.gz")
    broken = cuts[0].load_features().copy()
    broken[3, 5] = np.nan
    # lilcom cannot even store NaN, so stage 3 never writes one; plain numpy storage can
    with NumpyFilesWriter(tmp_path / "nan") as w:
        key = w.write("nan", broken)
    bad = fastcopy(cuts[0], id="nan-cut", features=fastcopy(cuts[0].features, storage_key=key,
                   storage_path=str(tmp_path / "nan"), storage_type=NumpyFilesWriter.name))
    good, rejects = validate.validate(CutSet.from_cuts([cuts[1], bad]))
    assert list(good.ids) == [cuts[1].id]
    assert rejects[0][0] == "nan-cut" and "non-finite" in rejects[0][1]


def test_rerun_keeps_reports(bad_run, an4_dir):
    data, _, rejected, info = bad_run
    proc = run_prepare(Path(info["corpus"]), data, "--vocab-size", "28")
    assert proc.returncode == 0
    assert proc.stdout.count("already complete, skipping") == 5
    again = dict(l.split("\t", 1) for l in (data / "train_rejected.txt").read_text().splitlines())
    assert again == rejected


def test_empty_corpus_exits_2(an4_dir, tmp_path):
    corpus = tmp_path / "an4"
    (corpus / "etc").mkdir(parents=True)
    (corpus / "wav").mkdir()
    (corpus / "etc" / "an4_train.transcription").write_text("<s> YES </s> (gone1-fx-b)\n<s> NO </s>\n\n")
    (corpus / "etc" / "an4_test.transcription").write_text("<s> YES </s> (gone2-fx-b)\n")
    data = tmp_path / "data"
    proc = run_prepare(corpus, data)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no usable utterance" in proc.stderr
    assert "missing audio file" in (data / "dev_rejected.txt").read_text()


def test_not_an_an4_copy(tmp_path):
    (tmp_path / "data").mkdir()
    proc = run_prepare(tmp_path / "nowhere", tmp_path / "data")
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr


def test_speed_perturbation(bad_run, tmp_path):
    """Stage 2 on the small corpus: 0.9x and 1.1x copies of the training cuts get their own features."""
    import shutil

    data, _, _, info = bad_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    proc = run_prepare(Path(info["corpus"]), copy, "--vocab-size", "28", "--speed-perturb", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Stage 2: speed perturbation 0.9/1.1" in proc.stdout
    assert "Stage 3: 80-dim fbank features\n" in proc.stdout  # settings changed: features redone
    train = load_manifest(copy / "fbank" / "an4_cuts_train.jsonl.gz")
    assert len(train) == 3 * 8
    base = next(c for c in train if "_sp" not in c.id)
    for f in (0.9, 1.1):
        sp = train[f"{base.id}_sp{f}"]
        assert abs(sp.duration - base.duration / f) < 0.02
        assert abs(sp.num_frames - base.num_frames / f) <= 2
        assert np.isfinite(sp.load_features()).all()
    assert len(load_manifest(copy / "fbank" / "an4_cuts_dev.jsonl.gz")) == 100  # only training is perturbed
