"""compare.py on synthetic results of three experiments, as decode.py writes them."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from splitformer.compare import main as compare_main
from splitformer.decoding.results import update_results_json

REPO = Path(__file__).resolve().parents[1]


def _fake_exp(root: Path, name: str, exits, wers, params):
    d = root / name / "greedy_search"
    d.mkdir(parents=True)
    for e, w in zip(exits, wers):
        for ts in ("dev", "test"):
            update_results_json(d / f"results-{ts}.json", dict(
                tag=f"epoch-3_avg-1_exit-{e}_greedy_search", test_set=ts, kind="fixed", exit_layer=e, wer=w,
                rtf_encoder=0.01 * e, rtf_decode=0.012 * e, macs_per_second=1e6 * e, params=params,
                method="greedy_search", beam=4, epoch=3, iter=0, avg=1, use_averaged_model=False))
    return root / name


def test_report_table_and_plots(tmp_path):
    a = _fake_exp(tmp_path, "zipformer", [12], [20.0], 5e6)
    b = _fake_exp(tmp_path, "ee", [2, 4, 6, 8, 10, 12], [60, 40, 30, 25, 22, 21], 6e6)
    c = _fake_exp(tmp_path, "splitformer", [2, 4, 6, 8, 10, 12], [50, 35, 28, 24, 21, 20], 7e6)
    # a stale run of the same exit must be replaced by the newer one
    update_results_json(c / "greedy_search" / "results-dev.json", dict(
        tag="epoch-3_avg-1_exit-2_greedy_search", test_set="dev", kind="fixed", exit_layer=2, wer=48.0,
        rtf_encoder=0.02, rtf_decode=0.024, macs_per_second=2e6, params=7e6, method="greedy_search", beam=4))
    update_results_json(c / "greedy_search" / "results-dev.json", dict(
        tag="epoch-3_avg-1_exit-sweep_greedy_search", test_set="dev", kind="dynamic-sweep", method="greedy_search",
        beam=4, curves={"entropy": [dict(threshold=0.0, wer=20.0, mean_exit_layer=12, macs_per_second=12e6),
                                    dict(threshold=None, wer=50.0, mean_exit_layer=2, macs_per_second=2e6)],
                        "confidence": [dict(threshold=0.0, wer=50.0, mean_exit_layer=2, macs_per_second=2e6)]}))
    out = tmp_path / "report"
    assert compare_main([str(a), str(b), str(c), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    dev, test = md.split("## test")
    assert "| splitformer | greedy_search | epoch-3_avg-1 | 2 | 48.00 |" in dev
    assert "| splitformer | greedy_search | epoch-3_avg-1 | 2 | 50.00 |" not in dev
    assert "| splitformer | greedy_search | epoch-3_avg-1 | 2 | 50.00 |" in test
    assert "| zipformer | greedy_search | epoch-3_avg-1 | 12 | 20.00 | - | 1 | 0.1200 | 0.1440 | 12.0 | 5.00 |" in md
    assert "entropy: 20.0 @ 12.0 / 12.0, 50.0 @ 2.0 / 2.0" in md
    rows = (out / "results.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (1 + 6 + 6)
    for s in ("dev", "test"):
        png = (out / f"wer-{s}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _seed_exp(root: Path, name: str, errors, ref_len: int = 10, exit_layer: int = 12):
    """One seed of a system: per-utterance word errors as decode.py records them."""
    d = root / name / "greedy_search"
    d.mkdir(parents=True)
    utt = {f"u{i}": [e, ref_len] for i, e in enumerate(errors)}
    wer = 100.0 * sum(errors) / (ref_len * len(errors))
    update_results_json(d / "results-test.json", dict(
        tag=f"exit-{exit_layer}", test_set="test", kind="fixed", exit_layer=exit_layer, wer=wer, utt_errors=utt,
        macs_per_second=1e6, params=1e6, method="greedy_search", beam=4))
    return root / name


def test_seeds_intervals_and_differences(tmp_path):
    rng = np.random.default_rng(0)
    good = [_seed_exp(tmp_path, f"good{s}", rng.binomial(10, 0.1, 200).tolist()) for s in range(3)]
    bad = [_seed_exp(tmp_path, f"bad{s}", rng.binomial(10, 0.3, 200).tolist()) for s in range(3)]
    twin = _seed_exp(tmp_path, "twin", rng.binomial(10, 0.1, 200).tolist())
    out = tmp_path / "report"
    dirs = [str(d) for d in good + bad + [twin]]
    names = ",".join(["good"] * 3 + ["bad"] * 3 + ["twin"])
    assert compare_main(dirs + ["--names", names, "--out", str(out), "--wall-seconds", "12.5"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["wall_seconds"] == 12.5
    g, b = res["models"]["good"]["test"]["12"], res["models"]["bad"]["test"]["12"]
    assert g["seeds"] == 3 and len(g["wer_per_seed"]) == 3
    assert abs(g["wer"] - np.mean(g["wer_per_seed"])) < 1e-9
    for r in (g, b):  # the interval holds the estimate and has a plausible width for 2000 words
        lo, hi = r["ci95"]
        assert lo < r["wer"] < hi and 0.5 < hi - lo < 8.0
    assert b["ci95"][0] > g["ci95"][1]
    diffs = {(d["a"], d["b"]): d for d in res["differences"]}
    gb = diffs.get(("bad", "good")) or diffs[("good", "bad")]
    assert gb["significant"]
    gt = diffs.get(("good", "twin")) or diffs[("twin", "good")]
    assert not gt["significant"] and gt["ci95"][0] < 0 < gt["ci95"][1]
    md = (out / "report.md").read_text()
    assert "inside the noise" in md and "| good | greedy_search | unknown | 12 |" in md
    assert "200 utterances, speakers unknown: intervals over utterances." in md  # ids u0..u199 name no speaker


def test_no_results_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([str(REPO / "splitformer" / "compare.py"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no results to compare" in r.stderr


def test_a_budget_run_is_set_against_the_cheapest_fixed_exit_that_costs_as_much():
    from splitformer.compare import fixed_at_cost

    def run(kind, exit_layer, macs, **kw):
        return dict(kind=kind, experiment="m", test_set="test", method="greedy_search", beam=4, exit_layer=exit_layer,
                    macs_per_second=macs, source="exp/m", chunk_size=8, chunk_ms=320, left_context_ms=2560,
                    streaming=True, **kw)

    fixed = [run("fixed", e, 16e6 * e) for e in (2, 4, 6, 8)]
    offline = dict(fixed[2], chunk_size=None, macs_per_second=70e6, exit_layer=6)  # another decode: never chosen
    dyn = run("budget", None, 50e6, achieved_cost=50e6)
    assert fixed_at_cost(fixed + [offline], dyn)["exit_layer"] == 4  # 64M is the cheapest at or above 50M
    assert fixed_at_cost(fixed, dict(dyn, achieved_cost=200e6, macs_per_second=200e6)) is None  # dearer than all


# ------------------------------------------------------------------------------------------- speakers, Holm
def _run(errors, speakers, ref_len: int = 10, **kw):
    """One fixed-exit run whose utterance ids carry ``speakers`` the AN4 way (an<i>-<speaker>-b)."""
    utt = {f"an{i}-{s}-b": [int(e), ref_len] for i, (e, s) in enumerate(zip(errors, speakers))}
    wer = 100.0 * sum(errors) / (ref_len * len(errors))
    return dict(kind="fixed", test_set="test", exit_layer=12, wer=wer, utt_errors=utt, method="greedy_search",
                beam=4, **kw)


def test_speakers_come_from_the_an4_and_librispeech_ids_or_the_run():
    from splitformer.compare import speaker_groups, speaker_of

    assert speaker_of("an406-fcaw-b") == "fcaw" and speaker_of("cen1-mdms2-b") == "mdms2"
    assert speaker_of("1089-134686-0000") == "1089"
    assert speaker_of("u7") is None and speaker_of("u7", {"u7": "alice"}) == "alice"
    groups, known = speaker_groups(["an1-fa-b", "an2-mb-b", "an3-fa-b"])
    assert groups == [[0, 2], [1]] and known
    groups, known = speaker_groups(["an1-fa-b", "x"])
    assert groups == [[0], [1]] and not known  # an unknown speaker: the utterance stands alone


def test_one_speaker_has_a_wider_interval_than_the_same_utterances_over_many():
    """With one speaker nothing says how the WER moves on other voices: no interval (unbounded). With few
    speakers the interval is wider than with the same utterances spread over many."""
    from splitformer.compare import difference_test, wer_interval

    errors = np.random.default_rng(0).binomial(10, 0.2, 120)
    assert wer_interval([_run(errors, ["fone"] * 120)]) is None
    widths = {}
    for n_spk in (3, 40):
        lo, hi = wer_interval([_run(errors, [f"f{k % n_spk}" for k in range(120)])])
        widths[n_spk] = hi - lo
        assert lo < 20.0 < hi
    assert widths[3] > 1.15 * widths[40]
    # a paired difference on one speaker is not tested either
    t = difference_test([_run(errors, ["fone"] * 120)], [_run(errors[::-1], ["fone"] * 120)])
    assert t["ci95"] is None and t["p"] is None and t["speakers"] == 1


def test_speakers_that_differ_widen_the_interval():
    """The same 120 utterance errors, once shuffled over 6 speakers and once sorted so that each speaker has a
    level of his own: resampling speakers sees the second spread, resampling utterances alone would not."""
    from splitformer.compare import wer_interval

    errors = np.sort(np.random.default_rng(1).binomial(10, 0.25, 120))
    speakers = [f"m{k // 20}" for k in range(120)]  # speaker k holds the k-th sixth of the sorted errors
    mixed = np.random.default_rng(2).permutation(errors)
    lo_c, hi_c = wer_interval([_run(errors, speakers)])
    lo_m, hi_m = wer_interval([_run(mixed, speakers)])
    assert hi_c - lo_c > 2.0 * (hi_m - lo_m)


def test_holm_on_known_p_values():
    from splitformer.compare import bootstrap_p, holm

    got = holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> kept monotone: 0.06 for the last
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([None, 0.2, 0.01]) == [None, pytest.approx(0.2), pytest.approx(0.02)]
    assert holm([0.9, 0.3]) == pytest.approx([0.9, 0.6])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    assert bootstrap_p(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(2 * 2 / 5)
    assert bootstrap_p(np.ones(999)) == pytest.approx(2 / 1000)


def test_budget_rows_are_holm_corrected_per_model_and_decode_not_across_them():
    from splitformer.compare import budget_holm

    rows = [dict(experiment="a", method="greedy_search", beam=4), dict(experiment="a", method="greedy_search", beam=4),
            dict(experiment="b", method="greedy_search", beam=4), dict(experiment="a", method="greedy_search", beam=4,
                                                                    chunk_size=8, chunk_ms=320, left_context_ms=2560,
                                                                    streaming=True)]
    tests = [dict(p=0.01), dict(p=0.04), dict(p=0.02), dict(p=0.03)]
    # a's offline rows are one family of two; b's row and a's streamed row stand alone (one family of four would
    # have given 0.04, 0.06, 0.06, 0.06)
    assert budget_holm(rows, tests) == pytest.approx([0.02, 0.04, 0.02, 0.03])
    assert budget_holm(rows[:1] + [rows[0]], [dict(p=0.01), None]) == [pytest.approx(0.01), None]


def test_differences_are_holm_corrected_over_the_exits_of_a_pair(tmp_path):
    from splitformer.decoding.results import update_results_json

    rng = np.random.default_rng(3)
    speakers = [f"f{k % 10}" for k in range(150)]
    for name, p_err in (("a", 0.10), ("b", 0.25)):
        d = tmp_path / name / "greedy_search"
        d.mkdir(parents=True)
        for e in (2, 4, 6):
            run = _run(rng.binomial(10, p_err + 0.01 * e, 150), speakers, epoch=5, iter=0, avg=2,
                       use_averaged_model=True, tag=f"epoch-5_avg-2_use-averaged-model_exit-{e}_greedy_search")
            update_results_json(d / "results-test.json", dict(run, exit_layer=e, macs_per_second=1e6 * e, params=1e6))
    out = tmp_path / "report"
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    diffs = res["differences"]
    assert len(diffs) == 3 and {d["family_size"] for d in diffs} == {3}
    ps = sorted(d["p"] for d in diffs)
    for d in diffs:
        assert d["p_holm"] >= d["p"] and d["speakers"] == 10
        assert d["significant"] == (d["p_holm"] < 0.05) and d["significant"]  # 10 % against 25 % errors
    assert min(d["p_holm"] for d in diffs) == pytest.approx(min(1.0, 3 * ps[0]))
    assert "Holm" in res["holm_family"] and res["test_sets"]["test"] == dict(utterances=150, speakers=10, condition=None)
    md = (out / "report.md").read_text()
    assert "150 utterances, 10 speakers." in md and "p (Holm, family of)" in md


# ------------------------------------------------------------------------------------------- checkpoints
def _ckpt_run(d: Path, epoch: int, avg: int, averaged: bool, wer: float, test_set: str = "test",
              exit_layer: int = 4) -> None:
    tag = f"epoch-{epoch}_avg-{avg}" + ("_use-averaged-model" if averaged else "") + f"_exit-{exit_layer}_greedy_search"
    update_results_json(d / "greedy_search" / f"results-{test_set}.json", dict(
        tag=tag, test_set=test_set, kind="fixed", exit_layer=exit_layer, wer=wer, macs_per_second=1e6, params=1e6,
        method="greedy_search", beam=4, epoch=epoch, iter=0, avg=avg, use_averaged_model=averaged))


def test_a_directory_decoded_at_two_checkpoints_is_refused_until_one_is_picked(tmp_path, capsys):
    d = tmp_path / "m"
    (d / "greedy_search").mkdir(parents=True)
    _ckpt_run(d, 10, 4, True, 30.0)
    _ckpt_run(d, 10, 2, False, 45.0)  # decoded later: before, the newest silently won
    _ckpt_run(d, 10, 2, False, 44.0, "dev")
    out = tmp_path / "report"
    assert compare_main([str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds results of 2 checkpoints" in err
    assert "epoch-10_avg-2 (dev: 1, test: 1)" in err and "epoch-10_avg-4_use-averaged-model (test: 1)" in err
    assert "--checkpoint epoch-10_avg-2" in err and "--checkpoint all" in err
    assert not out.exists()

    assert compare_main([str(d), "--out", str(out), "--checkpoint", "epoch-10_avg-4_use-averaged-model"]) == 0
    md = (out / "report.md").read_text()
    assert "| m | greedy_search | epoch-10_avg-4_use-averaged-model | 4 | 30.00 |" in md
    assert "45.00" not in md and "## dev" not in md

    assert compare_main([str(d), "--out", str(out), "--checkpoint", "all"]) == 0
    md = (out / "report.md").read_text()
    assert "| m @ epoch-10_avg-2 | greedy_search | epoch-10_avg-2 | 4 | 45.00 |" in md
    assert "| m @ epoch-10_avg-4_use-averaged-model | greedy_search | epoch-10_avg-4_use-averaged-model | 4 | 30.00 |" in md

    assert compare_main([str(d), "--out", str(out), "--checkpoint", "epoch-9_avg-1"]) == 2
    assert "has no results of checkpoint epoch-9_avg-1; it has: epoch-10_avg-2" in capsys.readouterr().err
    other = tmp_path / "n"
    (other / "greedy_search").mkdir(parents=True)
    _ckpt_run(other, 3, 1, False, 50.0)
    # one per directory, in order; empty = that directory's only checkpoint
    assert compare_main([str(d), str(other), "--out", str(out), "--checkpoint", "epoch-10_avg-2,"]) == 0
    assert "| n | greedy_search | epoch-3_avg-1 | 4 | 50.00 |" in (out / "report.md").read_text()
    assert compare_main([str(d), str(other), "--out", str(out), "--checkpoint", "a,b,c"]) == 2
    assert "3 entries for 2 directories" in capsys.readouterr().err


def test_the_average_is_chosen_on_dev_at_the_last_exit_a_tie_going_to_the_first_listed(tmp_path, capsys):
    d = tmp_path / "m"
    (d / "greedy_search").mkdir(parents=True)
    for avg, (low_exit, last_exit) in {4: (20.0, 12.0), 2: (10.0, 11.0), 6: (30.0, 11.0)}.items():
        _ckpt_run(d, 12, avg, True, low_exit, "dev", exit_layer=4)
        _ckpt_run(d, 12, avg, True, last_exit, "dev", exit_layer=12)
    _ckpt_run(d, 12, 4, True, 1.0, "test", exit_layer=12)  # the test set never takes part
    _ckpt_run(d, 12, 4, False, 1.0, "dev", exit_layer=12)  # nor weights that are not the running average
    assert compare_main([str(d), "--choose-avg", "4,2,6", "--epoch", "12"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2", "dev WER at the last exit by --avg: 4: 12.00, 2: 11.00, 6: 11.00"]
    _ckpt_run(d, 12, 6, True, 10.0, "dev", exit_layer=12)  # decoded again: the file holds the new result
    assert compare_main([str(d), "--choose-avg", "4 2 6", "--epoch", "12"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "6"
    assert compare_main([str(d), "--choose-avg", "4,8", "--epoch", "12"]) == 2
    assert "no greedy_search decode of dev at epoch 12 --avg 8" in capsys.readouterr().err
    assert compare_main([str(d), "--choose-avg", "4,x", "--epoch", "12"]) == 2
    assert compare_main([str(d), "--choose-avg", "4"]) == 2  # no --epoch


def test_the_average_is_never_chosen_over_two_beams_at_once(tmp_path, capsys):
    from splitformer.compare import CompareError, choose_average

    def run(avg, beam, wer):
        return dict(tag=f"epoch-12_avg-{avg}_use-averaged-model_exit-12_beam-{beam}", test_set="dev", kind="fixed",
                    exit_layer=12, wer=wer, method="modified_beam_search", beam=beam, epoch=12, iter=0, avg=avg,
                    use_averaged_model=True, experiment="m", source="m")

    runs = [run(4, 4, 10.0), run(2, 4, 11.0), run(4, 8, 12.0), run(2, 8, 9.0)]
    with pytest.raises(CompareError, match="modified_beam_search \\(beam 4\\) and modified_beam_search \\(beam 8\\)"):
        choose_average(runs, 12, [4, 2], method="modified_beam_search")
    assert choose_average(runs, 12, [4, 2], method="modified_beam_search", beam=4) == (4, {4: 10.0, 2: 11.0})
    assert choose_average(runs, 12, [4, 2], method="modified_beam_search", beam=8) == (2, {4: 12.0, 2: 9.0})


def test_checkpoint_of_reads_the_fields_or_an_old_tag():
    from splitformer.compare import checkpoint_of

    assert checkpoint_of(dict(epoch=30, iter=0, avg=10, use_averaged_model=True)) == "epoch-30_avg-10_use-averaged-model"
    assert checkpoint_of(dict(epoch=30, iter=4000, avg=2, use_averaged_model=False)) == "iter-4000_avg-2"
    assert checkpoint_of(dict(tag="epoch-3_avg-1_exit-2_greedy_search")) == "epoch-3_avg-1"
    assert checkpoint_of(dict(tag="exit-12")) == "unknown"


def test_condition_labels_head_their_sets(tmp_path):
    d = tmp_path / "m"
    (d / "greedy_search").mkdir(parents=True)
    for ts in ("test", "test-telephone", "test-narrowband"):
        _ckpt_run(d, 3, 1, False, 20.0, ts)
    labels = tmp_path / "an4_conditions.json"
    labels.write_text(json.dumps({
        "test-telephone": dict(matched=False, condition="telephone", source="test", what="telephone line"),
        "test-narrowband": dict(matched=True, condition="narrowband", source="test", what="8 kHz and back")}))
    out = tmp_path / "report"
    assert compare_main([str(d), "--out", str(out), "--conditions", str(labels)]) == 0
    md = (out / "report.md").read_text()
    assert "## test-telephone (unmatched: telephone line)" in md
    assert "## test-narrowband (matched: 8 kHz and back)" in md
    assert "## test\n" in md
    res = json.loads((out / "results.json").read_text())
    assert res["test_sets"]["test-telephone"]["condition"]["matched"] is False
    assert compare_main([str(d), "--out", str(out), "--conditions", str(tmp_path / "none.json")]) == 2


def test_conditions_are_tabled_against_the_clean_set_they_were_made_from(tmp_path):
    """Each condition set's WER over the clean set's, per system and exit, labelled matched or unmatched."""
    from splitformer.compare import condition_ratios, condition_table

    summary = {("m", "test", "greedy", 2): dict(wer=10.0), ("m", "test", "greedy", 4): dict(wer=8.0),
               ("m", "test-telephone", "greedy", 2): dict(wer=30.0),
               ("m", "test-telephone", "greedy", 4): dict(wer=12.0),
               ("m", "test-trimmed", "greedy", 4): dict(wer=9.0)}
    facts = {"test": {"condition": None},
             "test-telephone": {"condition": {"matched": False, "source": "test", "condition": "telephone"}},
             "test-trimmed": {"condition": {"matched": True, "source": "test", "condition": "trimmed"}}}
    ratios = {(r["test_set"], r["exit_layer"]): r["ratio"] for r in condition_ratios(summary, facts)}
    assert ratios == {("test-telephone", 2): 3.0, ("test-telephone", 4): 1.5, ("test-trimmed", 4): 9.0 / 8.0}
    table = "\n".join(condition_table(summary, facts))
    assert "test-trimmed (m) | test-telephone (u)" in table  # matched first
    assert "| m | greedy | 2 | 10.00 | - | 3.00× |" in table and "| m | greedy | 4 | 8.00 | 1.12× | 1.50× |" in table


def test_a_report_shows_only_the_search_dev_chose(tmp_path, capsys):
    d = tmp_path / "m"
    for method, beam, wer in (("greedy_search", 4, 20.0), ("modified_beam_search", 4, 18.0),
                              ("modified_beam_search", 8, 17.0)):
        (d / method).mkdir(parents=True, exist_ok=True)
        update_results_json(d / method / "results-test.json", dict(
            tag=f"epoch-12_avg-2_use-averaged-model_exit-12_{method}_beam-{beam}", test_set="test", kind="fixed",
            exit_layer=12, wer=wer, method=method, beam=beam, epoch=12, iter=0, avg=2, use_averaged_model=True,
            utt_errors={"an251-fash-b": [1, 5]}))

    def methods(out):
        rows = (out / "results.tsv").read_text().splitlines()[1:]
        return sorted((r.split("\t")[2], float(r.split("\t")[4])) for r in rows)

    assert compare_main([str(d), "--out", str(tmp_path / "all"), "--bootstrap", "10"]) == 0
    assert len(methods(tmp_path / "all")) == 3
    assert compare_main([str(d), "--out", str(tmp_path / "b8"), "--bootstrap", "10",
                         "--method", "modified_beam_search", "--beam-size", "8"]) == 0
    assert methods(tmp_path / "b8") == [("modified_beam_search (beam 8)", 17.0)]
    for beam in ([], ["--beam-size", "8"]):  # a greedy decode's recorded beam does not matter
        assert compare_main([str(d), "--out", str(tmp_path / "g"), "--method", "greedy_search", "--bootstrap", "10",
                             *beam]) == 0
        assert methods(tmp_path / "g") == [("greedy_search", 20.0)]
    capsys.readouterr()
    assert compare_main([str(d), "--out", str(tmp_path / "x"), "--method", "ctc_greedy_search"]) == 2
    assert "no decode of ctc_greedy_search" in capsys.readouterr().err
    assert compare_main([str(d), "--out", str(tmp_path / "x"), "--beam-size", "8"]) == 2
    assert "give the method too" in capsys.readouterr().err
