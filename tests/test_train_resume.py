"""A run killed with SIGKILL mid-epoch and resumed with --start-batch ends with the same
weights as an uninterrupted run (dropout and SpecAugment on: the RNG and sampler states
in checkpoint-B.pt must be restored exactly)."""
import signal

import torch

from test_train_support import load_weights, max_abs_diff, run_train, tiny_data, train_here  # noqa: F401

# 16 cuts of 2 s, 8 s per batch: 4 batches per epoch, 8 in two epochs.
COMMON = ["--num-epochs", "2", "--max-duration", "8", "--save-every-n", "2", "--keep-last-k", "2",
          "--average-period", "1", "--seed", "7", "--dropout", "0.1", "--warm-step", "4"]


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train_here([*COMMON, "--exp-dir", str(ref)], tiny_data)[0] == 0

    # Killed after batch 3 of epoch 1: checkpoint-2.pt exists, batch 3's update is lost.
    p = run_train([*COMMON, "--exp-dir", str(cut), "--debug-kill-after-batch", "3"], tiny_data, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (cut / "checkpoint-2.pt").is_file() and not (cut / "epoch-1.pt").exists()

    assert train_here([*COMMON, "--exp-dir", str(cut), "--start-batch", "2"], tiny_data)[0] == 0
    a, b = ref / "epoch-2.pt", cut / "epoch-2.pt"
    diff = max_abs_diff(load_weights(a), load_weights(b))
    assert diff <= 1e-5, f"resumed weights differ from the uninterrupted run by {diff}"
    assert max_abs_diff(load_weights(a, "model_avg"), load_weights(b, "model_avg")) <= 1e-5
    # the run really trained, and the checkpoints agree on the bookkeeping
    assert max_abs_diff(load_weights(ref / "epoch-1.pt"), load_weights(a)) > 1e-3
    ca, cb = (torch.load(x, weights_only=True) for x in (a, b))
    assert ca["batch_idx_train"] == cb["batch_idx_train"] == 8
    assert ca["scheduler"] == cb["scheduler"]
    # --keep-last-k 2: checkpoint-2 was deleted once 6 and 8 were written
    assert sorted(x.name for x in ref.glob("checkpoint-*.pt")) == ["checkpoint-6.pt", "checkpoint-8.pt"]
    assert ca["args"]["encoder_dim"] == "16" and ca["args"]["vocab_size"] == 30

    # --start-epoch 2 from the interrupted run's epoch-1.pt lands on the same weights too
    again = tmp_path / "again"
    again.mkdir()
    (again / "epoch-1.pt").write_bytes((cut / "epoch-1.pt").read_bytes())
    assert train_here([*COMMON, "--exp-dir", str(again), "--start-epoch", "2"], tiny_data)[0] == 0
    assert max_abs_diff(load_weights(a), load_weights(again / "epoch-2.pt")) <= 1e-5


def test_resume_with_data_loader_workers_is_exact_for_a_splitformer(tiny_data, tmp_path):
    """With 2 workers, SpecAugment on and Splitformer branches on, a killed and resumed run lands on the
    uninterrupted run's weights: each batch draws its augmentation from its own seed (seed, epoch, batch index),
    not from a worker's stream. The same seeds make the worker count irrelevant: 0 workers give the same run."""
    split = ["--split-blocks", "0,1", "--enable-spec-aug", "true", "--num-workers", "2"]
    ref, cut, inline = tmp_path / "ref", tmp_path / "cut", tmp_path / "inline"
    assert train_here([*COMMON, *split, "--exp-dir", str(ref)], tiny_data)[0] == 0
    p = run_train([*COMMON, *split, "--exp-dir", str(cut), "--debug-kill-after-batch", "3"], tiny_data, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert train_here([*COMMON, *split, "--exp-dir", str(cut), "--start-batch", "2"], tiny_data)[0] == 0
    a = load_weights(ref / "epoch-2.pt")
    assert any("branch" in k for k in a), "the Splitformer's branches are not in the model"
    assert max_abs_diff(a, load_weights(cut / "epoch-2.pt")) <= 1e-5
    assert max_abs_diff(load_weights(ref / "epoch-2.pt", "model_avg"), load_weights(cut / "epoch-2.pt", "model_avg")) <= 1e-5
    assert train_here([*COMMON, *split[:-2], "--num-workers", "0", "--exp-dir", str(inline)], tiny_data)[0] == 0
    assert max_abs_diff(a, load_weights(inline / "epoch-2.pt")) <= 1e-5
