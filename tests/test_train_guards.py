"""Guards: a NaN batch and an OOM batch are skipped (weights untouched) and logged with their
cut ids; --max-bad-batches 0 stops at the first bad batch; a --max-duration shorter than the
longest cut is refused before training."""
import torch

from test_train_support import CUT_SECONDS, load_weights, max_abs_diff, tiny_data, train_here  # noqa: F401

COMMON = ["--num-epochs", "1", "--max-duration", "8", "--seed", "5"]


def _log(exp):
    return "".join(p.read_text() for p in (exp / "log").glob("log-train-*"))


def test_nan_and_oom_batches_are_skipped_and_counted(tiny_data, tmp_path):
    exp = tmp_path / "exp"
    rc, err = train_here([*COMMON, "--exp-dir", str(exp), "--save-every-n", "1", "--keep-last-k", "0",
                          "--debug-nan-batches", "2", "--debug-oom-batches", "3", "--max-bad-batches", "1",
                          "--debug-dump-batches", str(tmp_path / "batches")], tiny_data)
    assert rc == 0, err[-3000:]
    cuts = {int(b): ids.split() for _, b, ids in
            (line.split("\t") for line in (tmp_path / "batches.rank0").read_text().splitlines())}
    log = _log(exp)
    nan_line = next(line for line in log.splitlines() if "non-finite loss" in line)
    assert "batch 2:" in nan_line and "bad batch 1" in nan_line
    assert nan_line.split("cut ids: ")[1].split(", ") == cuts[2]
    oom_line = next(line for line in log.splitlines() if "out of memory" in line)
    assert "batch 3:" in oom_line and all(c in oom_line for c in cuts[3])
    assert f"longest {cuts[3][0]} ({CUT_SECONDS:.2f} s)" in oom_line
    assert f"4 cuts, {4 * CUT_SECONDS:.1f} s in total" in oom_line
    assert "bad batches 1," in (exp / "log" / "epochs.txt").read_text()  # OOMs are not "bad" batches

    w = {b: load_weights(exp / f"checkpoint-{b}.pt") for b in (1, 2, 3, 4)}
    assert max_abs_diff(w[1], w[2]) == 0.0, "the NaN batch changed the weights"
    assert max_abs_diff(w[2], w[3]) == 0.0, "the OOM batch changed the weights"
    assert max_abs_diff(w[3], w[4]) > 0.0, "training did not go on after the skipped batches"
    assert all(torch.isfinite(t).all() for t in w[4].values())
    assert torch.load(exp / "epoch-1.pt", weights_only=True)["bad_batches"] == 1


def test_max_bad_batches_zero_stops_at_the_first(tiny_data, tmp_path):
    rc, err = train_here([*COMMON, "--exp-dir", str(tmp_path / "exp"), "--debug-nan-batches", "2",
                          "--max-bad-batches", "0"], tiny_data)
    assert rc == 1, err[-3000:]
    assert "train.py: error: stopping: 1 batch(es) with a non-finite loss or gradient" in err
    assert "--max-bad-batches 0" in err and "Traceback" not in err
    assert not (tmp_path / "exp" / "epoch-1.pt").exists()


def test_max_duration_below_longest_cut_is_refused_up_front(tiny_data, tmp_path):
    rc, err = train_here(["--num-epochs", "1", "--max-duration", "1.5", "--exp-dir", str(tmp_path / "exp")], tiny_data)
    assert rc == 1
    assert "--max-duration 1.5 s is shorter than 16 of 16 cuts" in err
    assert f"lasts {CUT_SECONDS:.2f} s" in err
