"""AsrModel over a small stand-in encoder: exit bookkeeping, losses and where gradients go."""
from typing import List, Optional

import pytest
import torch
import torch.nn as nn

from splitformer.model.asr_model import AsrModel, pad_targets
from splitformer.model.config import exit_loss_weights, default_model_args


class StackEncoder(nn.Module):
    """Linear layers at one rate with an exit after some of them; counts layer calls."""

    def __init__(self, dim: int, num_layers: int, exits: List[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        self.exits = exits
        self.output_dims = [dim] * len(exits)
        self.calls = 0

    def forward(self, x, x_lens, max_exit: Optional[int] = None):
        outs = []
        top = max_exit or self.exits[-1]
        for i, layer in enumerate(self.layers, start=1):
            if i > top:
                break
            self.calls += 1
            x = torch.tanh(layer(x))
            if i in self.exits:
                outs.append((x, x_lens))
        return outs


class Embed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(80, dim)

    def forward(self, x, x_lens):
        return self.proj(x[:, ::4]), (x_lens + 3) // 4


def make_model(use_transducer=True, use_ctc=True) -> AsrModel:
    torch.manual_seed(0)
    enc = StackEncoder(16, 6, [2, 4, 6])
    return AsrModel(Embed(16), enc, vocab_size=10, decoder_dim=8, joiner_dim=8,
                    use_transducer=use_transducer, use_ctc=use_ctc)


def batch():
    torch.manual_seed(1)
    x = torch.randn(3, 40, 80)
    lens = torch.tensor([40, 33, 21])
    targets = [[1, 2, 3], [4, 5], [9]]
    return x, lens, targets


def test_pad_targets():
    y, lens = pad_targets([[1, 2], [], [3]], pad=0, device=torch.device("cpu"))
    assert y.tolist() == [[1, 2], [0, 0], [3, 0]]
    assert lens.tolist() == [2, 0, 1]


def test_exit_validation_lists_valid_exits():
    model = make_model()
    with pytest.raises(ValueError, match="valid exits: 2, 4, 6"):
        model.encode(*batch()[:2], exit_layer=3)


def test_encode_runs_only_layers_below_exit():
    model = make_model()
    x, lens, _ = batch()
    model.encoder.calls = 0
    out, out_lens = model.encode(x, lens, exit_layer=2)
    assert model.encoder.calls == 2
    assert out.shape == (3, 10, 16) and out_lens.tolist() == [10, 9, 6]


def test_forward_gives_finite_losses_per_exit():
    model = make_model()
    x, lens, targets = batch()
    res = model(x, lens, targets)
    assert sorted(res) == [2, 4, 6]
    for r in res.values():
        for k in ("simple", "pruned", "ctc"):
            assert torch.isfinite(r[k]) and r[k].item() > 0
        assert int(r["ctc_num_inf"]) == 0


def test_last_exit_only_leaves_lower_heads_without_gradient():
    model = make_model()
    x, lens, targets = batch()
    args = default_model_args(train_exits="last")
    weights = exit_loss_weights(args, model.exits)
    assert weights == {6: 1.0}
    res = model(x, lens, targets, exit_layers=list(weights))
    loss = sum(w * (r["simple"] + r["pruned"] + r["ctc"]) for e, w in weights.items() for r in [res[e]])
    loss.backward()
    for i in (0, 1):
        assert model.ctc_output[i][1].weight.grad is None
        assert model.encoder_proj[i].weight.grad is None
    assert model.ctc_output[2][1].weight.grad.abs().sum() > 0
    assert model.encoder_proj[2].weight.grad.abs().sum() > 0


def test_every_exit_head_gets_gradient_with_all_exits():
    model = make_model()
    x, lens, targets = batch()
    res = model(x, lens, targets)
    sum(r["simple"] + r["pruned"] + r["ctc"] for r in res.values()).backward()
    for i in range(3):
        assert model.ctc_output[i][1].weight.grad.abs().sum() > 0
        assert model.simple_am_proj[i].weight.grad.abs().sum() > 0
        assert model.encoder_proj[i].weight.grad.abs().sum() > 0


def test_exit_loss_weights_validation():
    args = default_model_args(exit_loss_weights="1,2")
    with pytest.raises(ValueError, match="2 values but the model has 3 exits"):
        exit_loss_weights(args, [2, 4, 6])
    assert exit_loss_weights(default_model_args(exit_loss_weights="1,0.5,2"), [2, 4, 6]) == {2: 1.0, 4: 0.5, 6: 2.0}


def test_ctc_only_model_has_no_transducer():
    model = make_model(use_transducer=False)
    x, lens, targets = batch()
    res = model(x, lens, targets)
    assert set(res[6]) == {"ctc", "ctc_num_inf"}
    with pytest.raises(RuntimeError, match="no transducer"):
        model.project_encoder(torch.zeros(1, 2, 16))


def _losses_and_grads(model, x, lens, targets, exits):
    """Per-exit losses of ``exits`` and the gradient of their sum w.r.t. every parameter."""
    model.zero_grad()
    res = model(x, lens, targets, exit_layers=exits)
    total = sum(v for r in res.values() for k, v in r.items() if k != "ctc_num_inf")
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {e: {k: v.detach() for k, v in r.items()} for e, r in res.items()}, grads


def test_stacked_exits_equal_the_per_exit_loop():
    """All exits in one loss call (stacked along the batch) give the losses and gradients of one call per exit."""
    model = make_model().double().eval()  # eval: no CTC-head dropout, so both runs see the same function
    x, lens, targets = batch()
    x = x.double()
    stacked, g_stacked = _losses_and_grads(model, x, lens, targets, None)
    looped: dict = {}
    g_looped: dict = {}
    for e in model.exits:  # one exit per call: no stacking
        res, g = _losses_and_grads(model, x, lens, targets, [e])
        looped.update(res)
        for n, v in g.items():
            g_looped[n] = g_looped.get(n, 0) + v
    assert set(stacked) == set(looped) == {2, 4, 6}
    for e in model.exits:
        for k in ("simple", "pruned", "ctc"):
            torch.testing.assert_close(stacked[e][k], looped[e][k], rtol=1e-5, atol=1e-5)
        assert int(stacked[e]["ctc_num_inf"]) == int(looped[e]["ctc_num_inf"]) == 0
    assert set(g_stacked) == set(g_looped)
    for n in g_stacked:
        torch.testing.assert_close(g_stacked[n], g_looped[n], rtol=1e-5, atol=1e-5, msg=n)


def test_exits_of_different_lengths_fall_back_to_the_loop():
    from splitformer.model.asr_model import stack_groups

    a, b = torch.zeros(2, 10, 4), torch.zeros(2, 5, 4)
    lens10, lens5 = torch.tensor([10, 8]), torch.tensor([5, 4])
    groups = stack_groups([(2, a, lens10), (4, a, lens10), (6, b, lens5), (8, b, lens5), (10, a, lens10)])
    assert [[e for e, _, _ in g] for g in groups] == [[2, 4], [6, 8], [10]]
    # equal shapes but other lengths are not stacked either
    assert len(stack_groups([(2, a, lens10), (4, a, torch.tensor([10, 7]))])) == 2


def test_ctc_infeasible_counts_repeats():
    from splitformer.losses import ctc_infeasible

    lens = torch.tensor([3, 3, 4, 2])
    # [1,1,2] needs 4 frames (a blank between the 1s); [1,2,3] needs 3; [5,5,5] needs 5; [] fits anywhere
    assert ctc_infeasible(lens, [[1, 2, 3], [1, 1, 2], [5, 5, 5], []]) == 2


@pytest.mark.parametrize("preset,extra", [
    ("splitformer-cpu", dict(split_blocks="0,1")),  # Zipformer layers with Splitformer branches
    ("ee-conformer-paper", dict(use_transducer=True, use_ctc=True)),  # Conformer layers
])
def test_real_early_exit_models_take_the_stacked_path(preset, extra, monkeypatch):
    from splitformer.model import asr_model
    from splitformer.model.config import build_model

    args = default_model_args(preset=preset, encoder_dim="32", encoder_unmasked_dim="32", feedforward_dim="64",
                              num_heads="4", num_encoder_layers="4", exit_layers="2,4", cnn_module_kernel="7",
                              decoder_dim=16, joiner_dim=16, dropout=0.0, **extra)
    torch.manual_seed(0)
    model = build_model(args, 10).double().eval()
    sizes = []
    real = asr_model.AsrModel._transducer_losses

    def spy(self, idxs, *a, **k):
        sizes.append(len(idxs))
        return real(self, idxs, *a, **k)

    monkeypatch.setattr(asr_model.AsrModel, "_transducer_losses", spy)
    x, lens, targets = batch()
    x = x.double()
    stacked, g_stacked = _losses_and_grads(model, x, lens, targets, None)
    assert sizes == [2]  # both exits in one call
    looped: dict = {}
    g_looped: dict = {}
    for e in model.exits:
        res, g = _losses_and_grads(model, x, lens, targets, [e])
        looped.update(res)
        for n, v in g.items():
            g_looped[n] = g_looped.get(n, 0) + v
    for e in model.exits:
        for k in ("simple", "pruned", "ctc"):
            torch.testing.assert_close(stacked[e][k], looped[e][k], rtol=1e-5, atol=1e-5)
    for n in g_stacked:
        torch.testing.assert_close(g_stacked[n], g_looped[n], rtol=1e-5, atol=1e-5, msg=n)
