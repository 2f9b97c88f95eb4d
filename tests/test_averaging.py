"""Running-average model and averaging between checkpoints: the arithmetic, exactly."""
import pytest
import torch

from splitformer.averaging import (
    average_checkpoints_with_averaged_model,
    average_state_dict,
    load_averaged_state,
    make_averaged_model,
    update_averaged_model,
)
from splitformer.checkpoint import CheckpointError, save_checkpoint

torch.set_num_threads(1)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5)
        self.out.weight = self.emb.weight  # tied: must be averaged once, not twice
        self.register_buffer("count", torch.tensor(0))


def test_running_average_is_uniform_mean_of_snapshots():
    torch.manual_seed(0)
    model = Tied()
    model_avg = make_averaged_model(model)
    assert model_avg.emb.weight.dtype == torch.float64 and not model_avg.emb.weight.requires_grad
    period = 3
    snapshots = [model.emb.weight.detach().double().clone()]  # the copy at batch 0
    biases = [model.out.bias.detach().double().clone()]
    for batch in range(1, 13):
        with torch.no_grad():
            model.emb.weight.add_(torch.randn(5, 3))
            model.out.bias.add_(torch.randn(5))
            model.count += 1
        if batch % period == 0:
            update_averaged_model(model_avg, model, period, batch)
            snapshots.append(model.emb.weight.detach().double().clone())
            biases.append(model.out.bias.detach().double().clone())
    # w = period / batch makes model_avg the mean of the snapshots taken at batches 3, 6, 9, 12
    want = torch.stack(snapshots[1:]).mean(0)
    assert torch.allclose(model_avg.emb.weight, want, atol=1e-12)
    assert torch.allclose(model_avg.out.weight, want, atol=1e-12)
    assert torch.allclose(model_avg.out.bias, torch.stack(biases[1:]).mean(0), atol=1e-12)
    assert model_avg.count.item() == 12  # counters are copied


def test_one_update_weighting():
    a = {"w": torch.full((2,), 1.0, dtype=torch.float64), "n": torch.tensor(1)}
    b = {"w": torch.full((2,), 5.0), "n": torch.tensor(7)}
    average_state_dict(a, b, 0.75, 0.25)
    assert torch.equal(a["w"], torch.full((2,), 2.0, dtype=torch.float64)) and a["n"].item() == 7
    m, avg = torch.nn.Linear(2, 2), None
    avg = make_averaged_model(m)
    with pytest.raises(ValueError, match="average_period"):
        update_averaged_model(avg, m, 200, 100)


def _save_run(tmp_path, values_at):
    """Checkpoints whose model_avg is the running mean of per-batch values (period 1)."""
    total, paths = 0.0, {}
    for b in range(1, max(values_at) + 1):
        total += float(b * b)  # the "model" at batch b has weight b^2
        if b in values_at:
            avg = {"w": torch.full((3,), total / b, dtype=torch.float64), "steps": torch.tensor(b)}
            p = tmp_path / values_at[b]
            save_checkpoint(p, model={"w": torch.full((3,), float(b * b)), "steps": torch.tensor(b)}, model_avg=avg, batch_idx_train=b)
            paths[b] = p
    return paths


def test_average_between_checkpoints_recovers_interval_mean(tmp_path):
    paths = _save_run(tmp_path, {4: "epoch-1.pt", 10: "epoch-2.pt", 16: "epoch-3.pt"})
    avg = average_checkpoints_with_averaged_model(paths[4], paths[10])
    want = sum(b * b for b in range(5, 11)) / 6  # mean over batches 5..10
    assert torch.allclose(avg["w"], torch.full((3,), want, dtype=torch.float64), rtol=1e-12)
    assert avg["steps"].item() == 10  # counters come from the later checkpoint
    via_decode = load_averaged_state(tmp_path, epoch=3, avg=2, use_averaged_model=True)
    assert torch.allclose(via_decode["w"], torch.full((3,), sum(b * b for b in range(5, 17)) / 12, dtype=torch.float64))
    plain = load_averaged_state(tmp_path, epoch=3, avg=2)
    assert torch.equal(plain["w"], torch.full((3,), (100.0 + 256.0) / 2))
    with pytest.raises(CheckpointError, match="later"):
        average_checkpoints_with_averaged_model(paths[10], paths[4])
    from_start = load_averaged_state(tmp_path, epoch=3, avg=3, use_averaged_model=True)
    assert torch.allclose(from_start["w"], torch.full((3,), sum(b * b for b in range(1, 17)) / 16, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="must be <= --epoch"):
        load_averaged_state(tmp_path, epoch=3, avg=4, use_averaged_model=True)


def test_load_averaged_state_by_iteration(tmp_path):
    _save_run(tmp_path, {4: "checkpoint-4.pt", 10: "checkpoint-10.pt", 16: "checkpoint-16.pt"})
    two = load_averaged_state(tmp_path, iteration=12, avg=2)  # checkpoint-4 and checkpoint-10
    assert torch.equal(two["w"], torch.full((3,), (16.0 + 100.0) / 2))
    between = load_averaged_state(tmp_path, iteration=16, avg=1, use_averaged_model=True)
    assert torch.allclose(between["w"], torch.full((3,), sum(b * b for b in range(11, 17)) / 6, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="needs 3"):
        load_averaged_state(tmp_path, iteration=12, avg=2, use_averaged_model=True)
