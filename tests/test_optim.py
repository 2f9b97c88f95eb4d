"""ScaledAdam and Eden: formula, scale-awareness, clipping, exact resume, convergence."""
import argparse
import io
import logging
import math

import pytest
import torch

from splitformer.optim import Eden, ScaledAdam, add_arguments

torch.set_num_threads(1)


def eden_reference(base_lr, batch, epoch, lr_batches, lr_epochs, warmup_batches, warmup_start):
    """The schedule written out independently of the implementation."""
    f_batch = ((batch**2 + lr_batches**2) / lr_batches**2) ** -0.25
    f_epoch = ((epoch**2 + lr_epochs**2) / lr_epochs**2) ** -0.25
    warm = 1.0 if batch >= warmup_batches else warmup_start + (1 - warmup_start) * batch / warmup_batches
    return base_lr * f_batch * f_epoch * warm


@pytest.mark.parametrize(
    "batch,epoch",
    [(0, 0), (1, 0), (250, 0), (499, 0), (500, 0), (7500, 0), (7500, 3.5), (20000, 2), (100000, 30)],
)
def test_eden_lr_matches_formula(batch, epoch):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ScaledAdam([p], lr=0.045)
    sched = Eden(opt, lr_batches=7500, lr_epochs=3.5, warmup_batches=500, warmup_start=0.5)
    sched.step_epoch(epoch)
    sched.step_batch(batch)
    want = eden_reference(0.045, batch, epoch, 7500, 3.5, 500, 0.5)
    assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-12, abs=0)
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_eden_known_values_and_resume():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ScaledAdam([p], lr=0.045)
    sched = Eden(opt, lr_batches=7500, lr_epochs=3.5)
    assert sched.get_last_lr()[0] == pytest.approx(0.0225)  # warmup starts at half
    sched.step_batch(7500)
    sched.step_epoch(3.5)
    assert sched.get_last_lr()[0] == pytest.approx(0.045 * 2**-0.5)  # both factors at 2^-0.25
    state = torch.load(io.BytesIO(_save(sched.state_dict())), weights_only=True)
    opt2 = ScaledAdam([torch.nn.Parameter(torch.zeros(3))], lr=0.045)
    sched2 = Eden(opt2, lr_batches=7500, lr_epochs=3.5)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    sched.step_batch()
    sched2.step_batch()
    assert sched2.batch == 7501 and sched2.get_last_lr() == sched.get_last_lr()


def test_add_arguments_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.base_lr, args.lr_batches, args.lr_epochs, args.warmup_batches) == (0.045, 7500, 3.5, 500.0)
    assert parser.parse_args(["--lr-batches", "100"]).lr_batches == 100


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _with_rms(shape, rms, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return torch.nn.Parameter(x * (rms / x.pow(2).mean().sqrt()))


@pytest.mark.parametrize("same_shape", [True, False])
def test_update_follows_parameter_scale(same_shape):
    small = _with_rms((4, 5), 0.1, 0)
    big = _with_rms((4, 5) if same_shape else (20,), 1.0, 1)
    opt = ScaledAdam([("small", small), ("big", big)], lr=0.05, clipping_scale=None)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # before the first scale update (size_update_period=4)
        grad = torch.randn(20, generator=g)
        before_s, before_b = small.detach().clone(), big.detach().clone()
        small.grad = grad.reshape(4, 5).clone()
        big.grad = grad.reshape(big.shape).clone()
        opt.step()
        ds = (small.detach() - before_s).pow(2).mean().sqrt().item()
        db = (big.detach() - before_b).pow(2).mean().sqrt().item()
        assert db / ds == pytest.approx(10.0, rel=1e-3)
    # first step: Adam-normalized grad is sign(grad), so the step is lr*(1-beta1)*rms exactly
    assert ds > 0


def test_first_step_size_is_lr_times_rms():
    w = _with_rms((8, 8), 0.5, 3)
    before = w.detach().clone()
    opt = ScaledAdam([w], lr=0.04, clipping_scale=None)
    w.grad = torch.randn(8, 8)
    opt.step()
    step = (w.detach() - before).abs()
    assert torch.allclose(step, torch.full_like(step, 0.04 * 0.1 * 0.5), rtol=1e-4)


def test_scale_pushed_back_inside_max_rms():
    w = _with_rms((16, 16), 5.0, 4)  # above param_max_rms=3
    opt = ScaledAdam([w], lr=0.05, clipping_scale=None)
    for _ in range(200):
        w.grad = torch.zeros_like(w)
        opt.step()
    rms = w.detach().pow(2).mean().sqrt().item()
    assert rms < 4.0, rms


def test_scalar_clamped():
    s = torch.nn.Parameter(torch.tensor(20.0))
    opt = ScaledAdam([s], lr=0.05, clipping_scale=None)
    s.grad = torch.tensor(0.0)
    opt.step()
    assert s.item() == pytest.approx(10.0)


def _grads_for(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, seeds, scale=1.0):
    for s in seeds:
        for p, g in zip(params, _grads_for(params, s)):
            p.grad = g * scale
        opt.step()


def test_clipping_caps_huge_gradient(caplog):
    def make(clipping_scale):
        torch.manual_seed(0)
        params = [("w", _with_rms((6, 6), 0.5, 5)), ("b", _with_rms((6,), 0.2, 6)), ("s", torch.nn.Parameter(torch.tensor(0.3)))]
        plist = [p for _, p in params]
        return ScaledAdam(params, lr=0.02, clipping_scale=clipping_scale, clipping_update_period=10), plist

    opt, params = make(2.0)
    ref, ref_params = make(None)
    _run(opt, params, range(11))  # threshold estimated at step 10
    _run(ref, ref_params, range(11))
    state = opt.state[params[0]]
    threshold = state["clip_threshold"]
    assert threshold > 0
    assert opt.last_clip_factors[0] == 1.0
    rms_w = state["param_rms"].item()  # the clipping norm uses the rms from before the step
    rms_b = opt.state[params[1]]["param_rms"].item()

    with caplog.at_level(logging.INFO):
        _run(opt, params, [100], scale=1e6)
        _run(ref, ref_params, [100], scale=1e6)
    factor = opt.last_clip_factors[0]
    assert 0 < factor < 1e-4
    # the clipped gradient has norm == threshold (in the optimizer's metric)
    gw, gb, gs = _grads_for(params, 100)
    norm = math.sqrt((gw * rms_w).pow(2).sum() + (gb * rms_b).pow(2).sum() + (gs * 0.1).pow(2).sum()) * 1e6
    assert factor * norm == pytest.approx(threshold, rel=1e-4)
    assert "scaling gradients" in caplog.text and "dominant parameters: w" in caplog.text
    # second-moment stats stay sane when clipped, explode without clipping
    assert opt.state[params[0]]["exp_avg_sq"].max() < 10
    assert ref.state[ref_params[0]]["exp_avg_sq"].max() > 1e9


def test_clipped_step_equals_step_with_scaled_gradient():
    def make():
        p = _with_rms((5, 7), 0.3, 7)
        return ScaledAdam([p], lr=0.03, clipping_update_period=10), [p]

    a, pa = make()
    b, pb = make()
    _run(a, pa, range(12))
    _run(b, pb, range(12))
    _run(a, pa, [50], scale=1e3)
    factor = a.last_clip_factors[0]
    assert factor < 1
    b.param_groups[0]["clipping_scale"] = None
    _run(b, pb, [50], scale=1e3 * factor)
    assert torch.allclose(pa[0], pb[0], rtol=1e-5, atol=1e-7)


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def test_state_dict_round_trip_gives_identical_steps():
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))

    def train(model, opt, sched, steps, start):
        for i in range(start, start + steps):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step_batch(i + 1)

    model = _tiny_model()
    opt = ScaledAdam(model.named_parameters(), lr=0.05, clipping_update_period=8)
    sched = Eden(opt, lr_batches=20, lr_epochs=2, warmup_batches=5)
    train(model, opt, sched, 23, 0)  # past scale updates and two clipping estimates
    blob = _save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    loaded = torch.load(io.BytesIO(blob), weights_only=True)
    model2 = _tiny_model()
    model2.load_state_dict(loaded["model"])
    opt2 = ScaledAdam(model2.named_parameters(), lr=0.05, clipping_update_period=8)
    sched2 = Eden(opt2, lr_batches=20, lr_epochs=2, warmup_batches=5)
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    first2 = opt2.state[next(iter(model2.parameters()))]
    assert first2["clip_threshold"] == opt.state[next(iter(model.parameters()))]["clip_threshold"]

    train(model, opt, sched, 20, 23)
    train(model2, opt2, sched2, 20, 23)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_trains_tiny_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = torch.sin(x[:, :2]) + 0.5 * x[:, 2:4]
    model = _tiny_model()
    scale = torch.nn.Parameter(torch.tensor(1.0))
    opt = ScaledAdam(list(model.named_parameters()) + [("scale", scale)], lr=0.05, clipping_update_period=20)
    sched = Eden(opt, lr_batches=200, lr_epochs=10, warmup_batches=20)
    losses = []
    for i in range(300):
        loss = ((model(x) * scale - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_batch(i + 1)
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_parameters_without_grad_and_groups():
    a = torch.nn.Parameter(torch.ones(3, 3))
    b = torch.nn.Parameter(torch.ones(3, 3))
    opt = ScaledAdam([{"named_params": [("a", a)], "lr": 0.1}, {"params": [b], "lr": 0.0}])
    a.grad = torch.ones(3, 3)
    opt.step()  # b has no grad: treated as zero, must not crash
    assert not torch.equal(a.detach(), torch.ones(3, 3))
    assert torch.equal(b.detach(), torch.ones(3, 3))
    assert opt.param_names == [["a"], ["group1.param0"]]


def test_tiny_parameter_steps_at_min_rms():
    w = _with_rms((8, 8), 1e-8, 8)  # below param_min_rms=1e-5
    before = w.detach().clone()
    opt = ScaledAdam([w], lr=0.04, clipping_scale=None)
    w.grad = torch.randn(8, 8)
    opt.step()
    step = (w.detach() - before).abs()
    assert torch.allclose(step, torch.full_like(step, 0.04 * 0.1 * 1e-5), rtol=1e-3)


def test_a_group_without_gradients_waits():
    """A group that no loss reached (a backbone under --freeze-backbone-steps) is left as it is: no step count,
    no zero norms in its clipping history, so its first real update is clipped and bias-corrected as a first step."""
    torch.manual_seed(0)
    heads, backbone = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = ScaledAdam([{"params": [heads]}, {"params": [backbone], "lr": 0.01}], lr=0.05)
    before = backbone.detach().clone()
    for _ in range(150):  # frozen: only the heads get gradients
        heads.grad = torch.randn(8, 8)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.equal(backbone, before) and len(opt.state[backbone]) == 0
    for _ in range(3):  # unfrozen: it moves at once, by about lr * rms on its first step
        backbone.grad = torch.randn(8, 8)
        heads.grad = torch.randn(8, 8)
        opt.step()
        assert opt.last_clip_factors[1] > 0.0
    assert opt.state[backbone]["step"] == 3
    assert not torch.equal(backbone, before)
