"""LibriSpeech and TED-LIUM 3 recipes on tiny fixtures in those corpora's layouts, made from AN4 audio."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import soundfile as sf
from lhotse import load_manifest

from an4_fixture import REPO, an4_utterances
from splitformer.data.recipes import DATASETS, get_dataset
from splitformer.data.tokenizer import Tokenizer


def an4_audio(an4_dir: Path, n: int, skip: int = 0) -> List[Tuple[np.ndarray, str]]:
    """(16 kHz int16 samples, transcript) of n AN4 training utterances."""
    out = []
    for u in an4_utterances(an4_dir, n, skip):
        audio, sr = sf.read(u.path, dtype="int16")
        assert sr == 16000
        out.append((audio, u.text))
    return out


def prepare(dataset: str, corpus: Path, data: Path, vocab: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(REPO / "prepare.sh"), "--dataset", dataset, "--corpus-dir", str(corpus), "--data-dir", str(data),
         "--num-jobs", "1", "--vocab-size", str(vocab)],
        cwd=data.parent, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def min_vocab(texts: List[str]) -> int:
    """Smallest BPE size sentencepiece accepts: every character, the word boundary, 3 specials."""
    return len(set("".join(texts).replace(" ", ""))) + 1 + 3


def test_table():
    for name in ("an4", "librispeech", "mini_librispeech", "tedlium3"):
        d = get_dataset(name)
        assert d.train_splits and d.dev_split and d.test_splits and d.default_vocab_size > 0
        assert (REPO / "egs" / d.recipe / "prepare.sh").is_file()
    assert DATASETS["an4"].test_splits == ["dev", "test"]
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("timit")


def test_librispeech_layout(an4_dir, tmp_path):
    """LibriSpeech: <part>/<speaker>/<chapter>/<spk>-<chap>-<utt>.flac and <spk>-<chap>.trans.txt, every part."""
    corpus = tmp_path / "LibriSpeech"
    parts = get_dataset("librispeech").all_splits()
    utts = an4_audio(an4_dir, 2 * len(parts), skip=120)
    expected = {}
    for i, part in enumerate(parts):
        spk, chap = 100 + i, 2000 + i
        d = corpus / part / str(spk) / str(chap)
        d.mkdir(parents=True)
        lines = []
        for j in range(2):
            audio, text = utts[2 * i + j]
            uid = f"{spk}-{chap}-{j:04d}"
            sf.write(d / f"{uid}.flac", audio, 16000)
            lines.append(f"{uid} {text}")
            expected[uid] = (part, text, len(audio))
        if part == "train-clean-100":  # one of each problem, next to the good utterances
            audio, text = utts[0]
            (d / f"{spk}-{chap}-0010.flac").write_bytes(b"fLaC" + b"\x00" * 100)
            (d / f"{spk}-{chap}-0011.flac").write_bytes(b"")
            sf.write(d / f"{spk}-{chap}-0013.flac", audio[::2], 8000)
            lines += [f"{spk}-{chap}-0010 CORRUPT", f"{spk}-{chap}-0011 EMPTY", f"{spk}-{chap}-0012 MISSING",
                      f"{spk}-{chap}-0014", f"{spk}-{chap}-0013 {text}"]
            expected[f"{spk}-{chap}-0013"] = (part, text, len(audio))
            bad = {f"{spk}-{chap}-0010": "unreadable audio file", f"{spk}-{chap}-0011": "zero-length audio file",
                   f"{spk}-{chap}-0012": "missing audio file", f"{spk}-{chap}-0014": "has no text"}
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    train_texts = [t for p, t, _ in expected.values() if p.startswith("train")]
    vocab = min_vocab(train_texts)
    proc = prepare("librispeech", corpus, data, vocab)
    for n in (0, 1, 3, 4, 5):
        assert f"Stage {n}: " in proc.stdout
    rejected = dict(l.split("\t", 1) for l in (data / "train-clean-100_rejected.txt").read_text().splitlines())
    assert sorted(rejected) == sorted(bad)
    for uid, words in bad.items():
        assert words in rejected[uid]
        if "file" in words:
            assert f"{uid}.flac" in rejected[uid]
    assert "resampled 8000 Hz -> 16000 Hz" in proc.stderr
    for part in parts:
        cuts = load_manifest(data / "fbank" / f"librispeech_cuts_{part}.jsonl.gz")
        assert len(cuts) == (3 if part == "train-clean-100" else 2)
        for cut in cuts:
            p, text, n = expected[cut.id]
            assert p == part and cut.supervisions[0].text == text
            assert cut.supervisions[0].speaker == cut.id.split("-")[0]
            feats = cut.load_features()
            assert cut.sampling_rate == 16000
            assert feats.shape[1] == 80 and abs(feats.shape[0] - round(n / 160)) <= 1 and np.isfinite(feats).all()
        if part != "train-clean-100":
            assert (data / f"{part}_rejected.txt").read_text() == ""
    tok = Tokenizer(data / f"lang_bpe_{vocab}")
    assert tok.vocab_size == vocab
    assert tok.decode(tok.encode(train_texts[0])[0]) == train_texts[0]


def test_tedlium3_layout(an4_dir, tmp_path):
    """TED-LIUM 3: legacy/{train,dev,test}/{sph/<talk>.sph, stm/<talk>.stm}; one talk per split, cut into segments."""
    corpus = tmp_path / "TEDLIUM_release-3"
    utts = an4_audio(an4_dir, 9, skip=200)
    gap = np.zeros(8000, dtype=np.int16)  # 0.5 s between segments
    expected = {}
    for k, split in enumerate(("train", "dev", "test")):
        talk = f"Speaker{k}_2020"
        pieces, stm, t = [], [], 0.0
        for j in range(3):
            audio, text = utts[3 * k + j]
            start, end = t, t + len(audio) / 16000
            words = text.lower()
            if j == 1:
                words = words + " <unk>"  # dropped by the kaldi-style text normalisation
            stm.append(f"{talk} 1 {talk} {start:.2f} {end:.2f} <o,f0,male> {words}")
            expected.setdefault(split, []).append((round(end - start, 2), text.lower()))
            pieces += [audio, gap]
            t = end + len(gap) / 16000
        stm.append(f"{talk} 1 {talk} {t - 0.5:.2f} {t:.2f} <o,f0,male> ignore_time_segment_in_scoring")
        for sub in ("sph", "stm"):
            (corpus / "legacy" / split / sub).mkdir(parents=True)
        sf.write(corpus / "legacy" / split / "sph" / f"{talk}.sph", np.concatenate(pieces), 16000,
                 format="NIST", subtype="PCM_16")
        (corpus / "legacy" / split / "stm" / f"{talk}.stm").write_text("\n".join(stm) + "\n")
    # a talk whose audio is garbage, and a transcript without audio: reported, the rest goes on
    (corpus / "legacy" / "train" / "sph" / "Broken_2020.sph").write_bytes(b"NIST_1A\n   1024\n" + b"\x00" * 50)
    (corpus / "legacy" / "train" / "stm" / "Broken_2020.stm").write_text("Broken_2020 1 Broken_2020 0.00 1.00 <o,f0,male> hello\n")
    (corpus / "legacy" / "dev" / "stm" / "Lost_2020.stm").write_text("Lost_2020 1 Lost_2020 0.00 1.00 <o,f0,male> hello\n")
    data = tmp_path / "data"
    vocab = min_vocab([t for _, t in expected["train"]])
    prepare("tedlium3", corpus, data, vocab)
    train_rej = dict(l.split("\t", 1) for l in (data / "train_rejected.txt").read_text().splitlines())
    dev_rej = dict(l.split("\t", 1) for l in (data / "dev_rejected.txt").read_text().splitlines())
    assert list(train_rej) == ["Broken_2020"] and "unreadable audio file" in train_rej["Broken_2020"]
    assert "Broken_2020.sph" in train_rej["Broken_2020"]
    assert list(dev_rej) == ["Lost_2020"] and "missing audio file" in dev_rej["Lost_2020"]
    for split in ("train", "dev", "test"):
        cuts = load_manifest(data / "fbank" / f"tedlium3_cuts_{split}.jsonl.gz")
        got = sorted((round(c.duration, 2), c.supervisions[0].text) for c in cuts)
        assert got == sorted(expected[split])  # 3 segments; the ignored one is gone, <unk> removed
        for c in cuts:
            assert c.recording.duration > c.duration  # a segment of the whole talk
            assert c.recording.sources[0].source.startswith(str(corpus.resolve()))  # not the scratch tree
            assert c.load_features().shape == (c.num_frames, 80)
