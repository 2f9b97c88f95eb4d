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
