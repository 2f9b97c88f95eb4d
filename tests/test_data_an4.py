"""AN4 through ./prepare.sh: stages, skip on re-run, split counts, features, BPE."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from lhotse import load_manifest

from an4_fixture import REPO, VOCAB_SIZE

sys.path.insert(0, str(REPO / "local"))
import an4 as an4_recipe  # noqa: E402

from splitformer.data.recipes import DATASETS  # noqa: E402
from splitformer.data.tokenizer import Tokenizer  # noqa: E402


def test_stages_announced_then_skipped(an4_data, an4_dir):
    log = (an4_data.parent / "prepare.log")
    if log.is_file():  # absent when SPLITFORMER_AN4_DATA points at an existing preparation
        text = log.read_text()
        for n in range(7):
            assert re.search(rf"Stage {n}: ", text), f"stage {n} not announced:\n{text}"
    proc = subprocess.run(
        [str(REPO / "prepare.sh"), "--corpus-dir", str(an4_dir), "--data-dir", str(an4_data),
         "--num-jobs", "1", "--vocab-size", str(VOCAB_SIZE)],
        cwd=an4_data.parent, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for n in (0, 1, 3, 4, 5):
        assert re.search(rf"Stage {n}: .*already complete, skipping", out), out
    assert "Stage 2: speed perturbation: off" in out
    # nothing ran: no python tool logged anything
    assert "INFO [" not in proc.stderr


def _stage1_settings(data) -> str:
    marker = data / ".done" / "an4.stage1"
    return marker.read_text() if marker.is_file() else ""


def test_split_counts(an4_data):
    """The default split (--dev-rule speakers): 8 whole training speakers, 101 utterances."""
    assert "dev_rule=speakers" in _stage1_settings(an4_data)
    counts = {s: len(load_manifest(an4_data / "fbank" / f"an4_cuts_{s}.jsonl.gz")) for s in ("train", "dev", "test")}
    assert counts == {"train": 847, "dev": 101, "test": 130}
    for s in ("train", "dev", "test"):
        assert (an4_data / f"{s}_rejected.txt").read_text() == ""


def _transcript_speakers(an4_dir, part: str):
    entries, problems = an4_recipe.parse_transcription(an4_dir / "etc" / f"an4_{part}.transcription")
    assert not problems
    return an4_recipe.utterance_speakers(entries)


def test_the_dev_rule_on_the_real_transcripts(an4_dir):
    """Speaker-disjoint from train (whole speakers, and never half of a name like mdcs/mdcs2), both sexes in
    about test's proportion, about 100 utterances, and the same speakers every time."""
    train, test = _transcript_speakers(an4_dir, "train"), _transcript_speakers(an4_dir, "test")
    assert (len(train), len(test)) == (74, 10)
    # AN4's speaker names start with the speaker's sex: test is 3 women and 7 men, 39 and 91 utterances
    assert sorted(an4_recipe.speaker_sex(s) for s in test) == ["f"] * 3 + ["m"] * 7
    dev = an4_recipe.choose_dev_speakers(train, test)
    assert dev == an4_recipe.choose_dev_speakers(dict(reversed(list(train.items()))), test)  # order-free
    assert dev == {"fbbh", "fjam", "mcel", "mjjs2", "mmaf", "mnjl", "mscg2", "mtje"}
    rest = set(train) - dev
    assert not {an4_recipe.speaker_group(s) for s in dev} & {an4_recipe.speaker_group(s) for s in rest}
    assert not dev & set(test)
    n_dev = sum(train[s] for s in dev)
    female = sum(train[s] for s in dev if an4_recipe.speaker_sex(s) == "f") / n_dev
    test_female = sum(n for s, n in test.items() if an4_recipe.speaker_sex(s) == "f") / sum(test.values())
    assert n_dev == 101 and 0.0 < female < 1.0
    assert abs(female - test_female) < 0.06  # 26/101 = 0.26 against 39/130 = 0.30: the closest whole speakers
    # speakers are never split and a group moves whole: mdcs2 goes where mdcs goes
    assert an4_recipe.speaker_group("mdcs2") == an4_recipe.speaker_group("mdcs") == "mdcs"
    with_pair = an4_recipe.choose_dev_speakers({"mdcs": 13, "mdcs2": 13, "mx": 13, "fy": 13, "fz": 13},
                                               {"fa": 5, "mb": 5}, target=20)
    assert {"mdcs", "mdcs2"} <= with_pair or not {"mdcs", "mdcs2"} & with_pair


def test_the_dev_rule_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="no training speaker of that sex"):
        an4_recipe.choose_dev_speakers({"mx": 13, "my": 13}, {"fa": 10, "mb": 10})
    with pytest.raises(ValueError, match="--dev-rule first-lines"):
        an4_recipe.choose_dev_speakers({"fx": 13}, {"fa": 10}, target=100)


def test_the_speakers_rule_splits_the_manifests_by_speaker(an4_dir):
    """What stage 1 writes with --dev-rule speakers: dev holds the rule's speakers and no train utterance does."""
    from splitformer.data import use_soundfile_for_sphere

    use_soundfile_for_sphere()
    train_speakers = _transcript_speakers(an4_dir, "train")
    dev_speakers = an4_recipe.choose_dev_speakers(train_speakers, _transcript_speakers(an4_dir, "test"))
    parts = an4_recipe.prepare_part(an4_dir, "train", dev_speakers)
    dev, train = parts["dev"][1], parts["train"][1]
    assert {s.speaker for s in dev} == dev_speakers
    assert not {s.speaker for s in train} & dev_speakers
    assert len(dev) + len(train) == sum(train_speakers.values())


def test_prepared_dev_is_the_default_rules(an4_data, an4_dir):
    """The prepared data (default --dev-rule speakers): dev holds the rule's speakers' utterances, train the rest."""
    train_speakers = _transcript_speakers(an4_dir, "train")
    dev_speakers = an4_recipe.choose_dev_speakers(train_speakers, _transcript_speakers(an4_dir, "test"))
    dev = load_manifest(an4_data / "fbank" / "an4_cuts_dev.jsonl.gz")
    train = load_manifest(an4_data / "fbank" / "an4_cuts_train.jsonl.gz")
    assert {c.supervisions[0].speaker for c in dev} == dev_speakers
    assert not {c.supervisions[0].speaker for c in train} & dev_speakers
    assert len(dev) + len(train) == sum(train_speakers.values())


def test_first_lines_keeps_the_old_split(an4_dir):
    """--dev-rule first-lines: the first 100 lines, as before, to reproduce models trained on that split."""
    from splitformer.data import use_soundfile_for_sphere

    use_soundfile_for_sphere()
    parts = an4_recipe.prepare_part(an4_dir, "train", None)
    lines = [l for l in (an4_dir / "etc" / "an4_train.transcription").read_text().splitlines() if l.strip()]
    ids = [re.search(r"\(([^)]+)\)\s*$", l).group(1) for l in lines]
    assert [s.id for s in parts["dev"][1]] == ids[:100]
    assert [s.id for s in parts["train"][1]] == ids[100:]


def test_prepare_options_for_the_dev_rule_and_the_conditions(tmp_path):
    run = lambda *a: subprocess.run([str(REPO / "prepare.sh"), "--data-dir", str(tmp_path / "d"), *a],
                                    cwd=tmp_path, capture_output=True, text=True, timeout=60)
    usage = run("--help").stdout
    assert "--dev-rule RULE" in usage and "--conditions BOOL" in usage and "7 unmatched test conditions" in usage
    proc = run("--conditions", "maybe")
    assert proc.returncode != 0 and "--conditions must be true or false" in proc.stderr
    proc = run("--dev-rule", "first-lines", "--no-such-option", "1")
    assert proc.returncode != 0 and "unknown option --no-such-option" in proc.stderr


def test_features_shape_and_finite(an4_data):
    cuts = load_manifest(an4_data / "fbank" / "an4_cuts_test.jsonl.gz")
    total = 0.0
    for cut in cuts:
        feats = cut.load_features()
        assert feats.ndim == 2 and feats.shape[1] == 80
        # 10 ms shift: T is the duration in centiseconds (no edge snipping)
        assert abs(feats.shape[0] - round(cut.duration * 100)) <= 1
        assert np.isfinite(feats).all()
        total += cut.duration
    assert 300 < total < 420  # AN4 test set: 0.10 h


def test_bpe_ids_and_round_trip(an4_data):
    lang = an4_data / f"lang_bpe_{VOCAB_SIZE}"
    tokens = (lang / "tokens.txt").read_text().splitlines()
    assert tokens[:3] == ["<blk> 0", "<sos/eos> 1", "<unk> 2"]
    assert len(tokens) == VOCAB_SIZE == DATASETS["an4"].default_vocab_size
    tok = Tokenizer(lang / "bpe.model")
    assert (tok.blank_id, tok.vocab_size) == (0, VOCAB_SIZE)
    texts = [c.supervisions[0].text for c in load_manifest(an4_data / "fbank" / "an4_cuts_test.jsonl.gz")]
    ids = tok.encode(texts)
    assert all(len(i) > 0 and min(i) >= 3 for i in ids)  # specials never appear in real text
    assert [tok.decode(i) for i in ids] == texts
    assert tok.decode([0] + ids[0] + [1]) == texts[0]  # blank and sos/eos are dropped
    assert tok.encode("YES") == tok.encode(["YES"])


def test_parse_transcription_tolerates_markers_and_blank_lines(tmp_path):
    p = tmp_path / "x.transcription"
    p.write_text("<s> YES </s> (an251-fash-b)\n\n   \n<s>   u m  </s>   (an2-fash-b)  \nNO ID HERE\nGO (an3-x-b)\n")
    entries, problems = an4_recipe.parse_transcription(p)
    assert [(e.utt_id, e.text) if e else None for e in entries] == [
        ("an251-fash-b", "YES"), ("an2-fash-b", "U M"), None, ("an3-x-b", "GO")]
    assert problems == [("x.transcription:5", f"{p}: line 5 has no utterance id '(...)': 'NO ID HERE'")]


def test_parallel_feature_extraction_matches_serial(an4_data, tmp_path, monkeypatch):
    import compute_fbank

    monkeypatch.setattr(compute_fbank, "MIN_CUTS_PER_PROCESS_POOL", 5)
    src = an4_data / "manifests" / "an4_cuts_test.jsonl.gz"
    sub = tmp_path / "cuts.jsonl.gz"
    load_manifest(src).subset(first=30).to_file(sub)
    n, rejects = compute_fbank.compute_split(sub, tmp_path / "par.jsonl.gz", tmp_path / "par_feats", num_jobs=2)
    assert (n, rejects) == (30, [])
    assert len(list((tmp_path / "par_feats").glob("feats-*.lca"))) >= 2  # really went through workers
    par = load_manifest(tmp_path / "par.jsonl.gz")
    ser = load_manifest(an4_data / "fbank" / "an4_cuts_test.jsonl.gz")
    assert list(par.ids) == list(load_manifest(sub).ids)  # order kept
    for cut in par:
        assert np.array_equal(cut.load_features(), ser[cut.id].load_features())


def test_rerun_without_corpus_dir_and_foreign_dataset(an4_data):
    run = lambda *a: subprocess.run([str(REPO / "prepare.sh"), "--data-dir", str(an4_data), *a],
                                    cwd=an4_data.parent, capture_output=True, text=True, timeout=60)
    proc = run("--vocab-size", str(VOCAB_SIZE))  # the corpus recorded by stage 0 is reused
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already complete, skipping") == 5
    proc = run("--dataset", "tedlium3", "--corpus-dir", str(an4_data))
    assert proc.returncode != 0 and "already holds an4" in proc.stderr
    proc = run("--stage", "x")
    assert proc.returncode != 0 and "--stage/--stop-stage must be integers" in proc.stderr
