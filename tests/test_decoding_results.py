"""Results files: WER counts and the icefall-style error statistics."""
import json

import pytest

from splitformer.decoding.results import update_results_json, word_error_rate, write_error_stats, write_recogs

RESULTS = [
    ("u1", "A B C".split(), "A X C".split()),          # 1 sub
    ("u2", "TWO FOUR".split(), "TWO".split()),          # 1 del
    ("u3", "HELP".split(), "HELP ME".split()),          # 1 ins
    ("u4", [], []),
]


def test_wer_counts():
    wer, c = word_error_rate(RESULTS)
    assert (c["sub"], c["dels"], c["ins"], c["ref"]) == (1, 1, 1, 6)
    assert wer == pytest.approx(50.0)
    assert word_error_rate([("x", [], ["A"])])[0] == 0.0  # no reference words: defined as 0, no crash


def test_error_stats_sections(tmp_path):
    wer = write_error_stats(tmp_path / "errs.txt", "dev", RESULTS)
    text = (tmp_path / "errs.txt").read_text()
    assert wer == pytest.approx(50.0) and text.startswith("%WER = 50.00\n")
    sections = text.split("\n\n")
    subs = next(s for s in sections if s.startswith("SUBSTITUTIONS:"))
    assert subs.splitlines()[1:] == ["1   B -> X"]
    assert next(s for s in sections if s.startswith("DELETIONS:")).splitlines()[1:] == ["1   FOUR"]
    assert next(s for s in sections if s.startswith("INSERTIONS:")).splitlines()[1:] == ["1   ME"]
    per_word = next(s for s in sections if s.startswith("PER-WORD STATS:")).splitlines()[1:]
    assert "B   0 1 1 0" in per_word and "A   1 0 1 1" in per_word
    assert "u1:\tA (B->X) C" in text and "u2:\tTWO (FOUR->)" in text and "u3:\tHELP (->ME)" in text
    write_recogs(tmp_path / "recogs.txt", RESULTS)
    assert "u2:\tref=['TWO', 'FOUR']\nu2:\thyp=['TWO']\n" in (tmp_path / "recogs.txt").read_text()


def test_results_json_accumulates_runs(tmp_path):
    p = tmp_path / "results-dev.json"
    update_results_json(p, dict(tag="a", wer=1.0))
    update_results_json(p, dict(tag="b", wer=2.0))
    update_results_json(p, dict(tag="a", wer=3.0))
    runs = json.loads(p.read_text())["runs"]
    assert sorted(runs) == ["a", "b"] and runs["a"]["wer"] == 3.0 and "written" in runs["a"]
