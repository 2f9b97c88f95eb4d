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
    assert "| zipformer | greedy_search | 12 | 20.00 | 0.1200 | 0.1440 | 12.0 | 5.00 |" in md
    assert "entropy: 20.0 @ 12.0 / 12.0, 50.0 @ 2.0 / 2.0" in md
    rows = (out / "results.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (1 + 6 + 6)
    for s in ("dev", "test"):
        png = (out / f"wer-{s}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_no_results_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([str(REPO / "splitformer" / "compare.py"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no results to compare" in r.stderr
