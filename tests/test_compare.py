"""compare.py on synthetic results of three experiments, as decode.py writes them."""
import subprocess
from pathlib import Path

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
                method="greedy_search", beam=4))
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
    assert "| splitformer | greedy_search | 2 | 48.00 |" in dev
    assert "| splitformer | greedy_search | 2 | 50.00 |" not in dev
    assert "| splitformer | greedy_search | 2 | 50.00 |" in test
    assert "| zipformer | greedy_search | 12 | 20.00 | - | 1 | 0.1200 | 0.1440 | 12.0 | 5.00 |" in md
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
    import json

    import numpy as np

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
    assert "inside the noise" in md and "| good | greedy_search | 12 |" in md


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
