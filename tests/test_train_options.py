"""Options beyond plain training: --print-diagnostics, --use-bf16, --train-exits last,
TensorBoard and the per-epoch summary."""
from test_train_support import load_weights, tiny_data, train_here  # noqa: F401

COMMON = ["--num-epochs", "1", "--max-duration", "8", "--seed", "2"]


def test_print_diagnostics_reports_norms_per_module(tiny_data, tmp_path):
    exp = tmp_path / "exp"
    rc, err = train_here([*COMMON, "--exp-dir", str(exp), "--print-diagnostics", "true",
                          "--diagnostics-batches", "2"], tiny_data)
    assert rc == 0, err[-3000:]
    rows = [line.split() for line in (exp / "diagnostics.txt").read_text().splitlines()[1:]]
    kinds = {(r[0], r[1]) for r in rows}
    for kind in ("param", "grad", "output"):
        assert ("joiner.output_linear", kind) in kinds
    assert any(name.startswith("encoder.") and kind == "grad" for name, kind in kinds)
    for r in rows:
        rms, amax = float(r[2]), float(r[3])
        assert 0.0 <= rms <= amax + 1e-6, r  # an RMS never exceeds the largest magnitude
    assert not (exp / "epoch-1.pt").exists()  # diagnostics only, no training run


def test_bf16_and_single_exit_training_with_tensorboard(tiny_data, tmp_path):
    # Conformer layers: the Zipformer's custom autograd functions (scaling.py) are not yet autocast-aware.
    exp = tmp_path / "exp"
    rc, err = train_here([*COMMON, "--exp-dir", str(exp), "--use-bf16", "true", "--train-exits", "last",
                          "--tensorboard", "true", "--layer-type", "conformer", "--pos-encoding", "abs"], tiny_data)
    assert rc == 0, err[-3000:]
    summary = (exp / "log" / "epochs.txt").read_text()
    assert "epoch 1: train loss" in summary and "(per exit: exit2=" in summary and "exit1=" not in summary
    assert "nan" not in summary.split("valid loss")[1].split("(")[0]
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    log = "".join(p.read_text() for p in (exp / "log").glob("log-train-*"))
    assert "exit2/loss=" in log and "exit1/loss" not in log
    ckpt = load_weights(exp / "epoch-1.pt", "args")
    assert ckpt["train_exits"] == "last"
