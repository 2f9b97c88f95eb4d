"""Zipformer2: activations, attention pieces, lengths, padding invariance, parameter counts, training."""
import math

import pytest
import torch

from splitformer.model.encoder_embed import Conv2dSubsampling
from splitformer.model.scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    BiasNorm,
    ScheduledFloat,
    SwooshL,
    SwooshR,
    Whiten,
    set_batch_count,
    whitening_metric,
)
from splitformer.model.zipformer import (
    CompactRelPositionalEncoding,
    SimpleDownsample,
    Zipformer2,
    Zipformer2EncoderLayer,
    _rel_shift,
)

torch.set_num_threads(1)

TINY = dict(
    downsampling_factor=(1, 2, 4, 2), encoder_dim=(32, 48, 64, 48), num_encoder_layers=(1, 1, 2, 1),
    encoder_unmasked_dim=(16, 16, 32, 16), query_head_dim=8, pos_head_dim=4, value_head_dim=6,
    num_heads=(2, 2, 4, 2), feedforward_dim=(48, 64, 96, 64), cnn_module_kernel=(7, 7, 5, 7), pos_dim=16)

ZIPFORMER_S = dict(
    num_encoder_layers=(2, 2, 2, 2, 2, 2), feedforward_dim=(512, 768, 768, 768, 768, 768),
    encoder_dim=(192, 256, 256, 256, 256, 256), encoder_unmasked_dim=(192,) * 6, num_heads=(4, 4, 4, 8, 4, 4),
    cnn_module_kernel=(31, 31, 15, 15, 15, 31))
ZIPFORMER_M = dict(
    num_encoder_layers=(2, 2, 3, 4, 3, 2), feedforward_dim=(512, 768, 1024, 1536, 1024, 768),
    encoder_dim=(192, 256, 384, 512, 384, 256), encoder_unmasked_dim=(192, 192, 256, 256, 256, 192),
    num_heads=(4, 4, 4, 8, 4, 4), cnn_module_kernel=(31, 31, 15, 15, 15, 31))


def _count(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- activations

def _ref(x, shift, const):
    return [math.log1p(math.exp(v - shift)) - 0.08 * v - const for v in x.tolist()]


X_VALUES = torch.tensor([-60.0, -20.0, -5.0, -1.0, 0.0, 0.5, 1.0, 3.0, 4.0, 7.5, 20.0, 60.0, 85.0])


@pytest.mark.parametrize("cls,shift,const", [(SwooshL, 4.0, 0.035), (SwooshR, 1.0, 0.313261687)])
def test_swoosh_matches_formula(cls, shift, const):
    y = cls()(X_VALUES)
    ref = torch.tensor([v if abs(x) < 50 else (x - shift if x > 0 else 0.0) - 0.08 * x - const
                        for v, x in zip(_ref(X_VALUES.clamp(-50, 50), shift, const), X_VALUES.tolist())])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    if cls is SwooshR:
        assert abs(cls()(torch.tensor([0.0])).item()) < 1e-6  # the constant makes SwooshR(0) = 0


@pytest.mark.parametrize("cls,shift,const", [(SwooshL, 4.0, 0.035), (SwooshR, 1.0, 0.313261687)])
def test_swoosh_gradient_close_to_autograd(cls, shift, const):
    torch.manual_seed(0)
    x = (torch.randn(4000) * 6.0).requires_grad_(True)
    g = torch.randn(4000)
    cls()(x).backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.softplus(x2 - shift) - 0.08 * x2 - const).backward(g)
    err = (x.grad - x2.grad).abs() / g.abs()
    step = (0.925 + 0.08) / 255
    assert err.max() <= step / 2 + 1e-6  # uint8 derivative: within half a quantization step
    assert err.mean() < step / 3


@pytest.mark.parametrize("activation,shift,const", [("SwooshL", 4.0, 0.035), ("SwooshR", 1.0, 0.313261687)])
def test_activation_dropout_linear_matches_plain_torch(activation, shift, const):
    torch.manual_seed(0)
    mod = ActivationDropoutAndLinear(12, 5, activation=activation, dropout_p=0.0).double().train()
    x = (torch.randn(7, 3, 12, dtype=torch.float64) * 4).requires_grad_(True)
    y = mod(x)
    w = mod.weight.detach().clone().requires_grad_(True)
    b = mod.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(torch.nn.functional.softplus(x2 - shift) - 0.08 * x2 - const, w, b)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(mod.weight.grad, w.grad)
    torch.testing.assert_close(mod.bias.grad, b.grad)


def test_activation_dropout_linear_gradcheck_with_dropout():
    torch.manual_seed(0)
    mod = ActivationDropoutAndLinear(6, 4, activation="SwooshL", dropout_p=0.5, dropout_shared_dim=0)
    mod = mod.double().train()
    x = torch.randn(5, 2, 6, dtype=torch.float64, requires_grad=True)

    def f(inp, weight, bias):
        torch.manual_seed(123)  # same dropout mask at every call
        mod.weight.data, mod.bias.data = weight, bias
        from splitformer.model.scaling import _ActivationDropoutLinearFunction
        mask = (torch.rand(1, 2, 6) > 0.5).double() * 2.0
        return _ActivationDropoutLinearFunction.apply(inp, weight, bias, "SwooshL", mask)

    w = mod.weight.detach().clone().requires_grad_(True)
    b = mod.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, w, b))
    # dropout really drops, and the mask is shared along time (dim 0)
    torch.manual_seed(1)
    h = mod(torch.ones(5, 2, 6, dtype=torch.float64) * 6.0)
    assert torch.allclose(h[0], h[4])


# ----------------------------------------------------------------------------- small modules

def test_rel_shift_indexes_by_offset(monkeypatch):
    t = 5
    offsets = torch.arange(-(t - 1), t).float()  # column j <-> offset j - (t-1)
    scores = offsets.expand(2, 3, t, 2 * t - 1) + 100 * torch.arange(t).view(1, 1, t, 1)
    out = _rel_shift(scores)
    for q in range(t):
        for k in range(t):
            assert out[1, 2, q, k].item() == (k - q) + 100 * q
    import splitformer.model.zipformer as zf
    monkeypatch.setattr(zf, "_exporting", lambda: True)  # the export path (gather) agrees
    assert zf._rel_shift(scores).equal(out)


def test_compact_rel_pos_encoding():
    enc = CompactRelPositionalEncoding(16, dropout=0.0).eval()
    pe = enc(torch.zeros(7, 2, 3))
    assert pe.shape == (1, 13, 16)
    mid = pe[0, 6]
    assert torch.allclose(mid[0:-1:2], torch.ones(8)) and torch.allclose(mid[1:-1:2], torch.zeros(7))
    assert torch.allclose(pe[0, :, 0], pe[0].flip(0)[:, 0])  # cos parts are even in the offset
    assert torch.allclose(pe[0, :, 1], -pe[0].flip(0)[:, 1])  # sin parts are odd
    assert torch.all(pe[0, :, -1] == 1.0)
    # the same offsets get the same embedding whatever the sequence length (also past max_len)
    long = enc(torch.zeros(1500, 1, 1))
    torch.testing.assert_close(long[0, 1499 - 6: 1499 + 7], pe[0])


def test_simple_downsample_repeats_each_utterances_last_frame():
    ds = SimpleDownsample(4)
    with torch.no_grad():
        ds.bias.copy_(torch.tensor([0.1, -0.3, 0.7, 0.2]))
    x = torch.randn(10, 2, 3)
    lens = torch.tensor([10, 5])
    y = ds(x, lens)
    assert y.shape == (3, 2, 3)
    w = ds.bias.softmax(0)
    alone = x[:5, 1]
    padded = torch.cat([alone, alone[-1:].expand(3, 3)])  # 5 -> 8 frames, repeating frame 4
    torch.testing.assert_close(y[:2, 1], (padded.view(2, 4, 3) * w.view(1, 4, 1)).sum(1))


def test_bias_norm_normalises_around_bias():
    bn = BiasNorm(6)
    with torch.no_grad():
        bn.bias.copy_(torch.arange(6.0))
        bn.log_scale.fill_(0.0)
    x = torch.randn(4, 6) + torch.arange(6.0)
    y = bn(x)
    rms = ((x - torch.arange(6.0)) ** 2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(y, x / rms)


def test_scheduled_float_and_set_batch_count():
    m = torch.nn.Module()
    m.rate = ScheduledFloat((0.0, 0.4), (100.0, 0.0), default=0.05)
    assert float(m.rate) == 0.05  # no batch count yet
    set_batch_count(m, 25)
    assert float(m.rate) == pytest.approx(0.3)
    set_batch_count(m, 1000)
    assert float(m.rate) == 0.0
    m.eval()
    assert float(m.rate) == 0.05


def test_balancer_pushes_channels_into_range():
    torch.manual_seed(0)
    bal = Balancer(4, channel_dim=-1, min_positive=0.4, max_positive=0.6, min_abs=0.0, max_abs=100.0, prob=1.0)
    x = torch.randn(200, 4).requires_grad_(True)
    with torch.no_grad():
        x[:, 0] = -x[:, 0].abs() - 0.1  # channel 0 all negative
    bal(x).backward(torch.zeros(200, 4) + 1e-3)
    # gradient descent moves channel 0 up (extra gradient -grad_scale * mean|grad|); channels in range are untouched
    torch.testing.assert_close(x.grad[:, 0], torch.full((200,), 1e-3 * (1 - 0.04)))
    assert (x.grad[:, 1:] == 1e-3).all()
    assert bal(x.detach()).equal(x.detach())


def test_whiten_metric_and_gradient():
    torch.manual_seed(0)
    white = torch.randn(2000, 8)
    assert whitening_metric(white, 1).item() == pytest.approx(1.0, abs=0.1)
    skewed = white.clone()
    skewed[:, 0] *= 20.0
    assert whitening_metric(skewed, 1).item() > 4.0
    wh = Whiten(whitening_limit=2.0, prob=1.0, grad_scale=0.1)
    x = skewed.clone().requires_grad_(True)
    g = torch.randn(2000, 8)
    wh(x).backward(g)
    extra = x.grad - g
    assert extra.norm() == pytest.approx(0.1 * g.norm().item(), rel=1e-3)
    # following the extra gradient downhill reduces the metric
    assert whitening_metric(skewed - 10.0 * extra, 1) < whitening_metric(skewed, 1)


# ----------------------------------------------------------------------------- the encoder

def _embed_and_encoder(**over):
    torch.manual_seed(0)
    cfg = dict(TINY, **over)
    return Conv2dSubsampling(80, cfg["encoder_dim"][0]).eval(), Zipformer2(**cfg).eval()


@pytest.mark.parametrize("t", [9, 10, 23, 60, 97])
def test_output_lengths_and_frame_rate(t):
    embed, enc = _embed_and_encoder()
    with torch.no_grad():
        y, y_lens = embed(torch.randn(1, t, 80), torch.tensor([t]))
        [(out, out_lens)] = enc(y, y_lens)
    t1 = (t - 7) // 2
    assert y.shape[1] == t1 == y_lens.item()
    assert out.shape == (1, (t1 + 1) // 2, 64) and out_lens.item() == (t1 + 1) // 2
    assert enc.exits == [5] and enc.output_dims == [64]


def test_output_downsampling_factor_one_keeps_the_frame_rate_and_padding():
    """The zipformer-cpu-lite form: no x2 output average, so the output has the input's frames and
    lengths, and a padded utterance gives what it gives alone."""
    _, enc = _embed_and_encoder(output_downsampling_factor=1)
    x = torch.randn(2, 31, 32)
    lens = torch.tensor([31, 18])
    with torch.no_grad():
        [(out, out_lens)] = enc(x, lens)
        [(alone, _)] = enc(x[1:, :18], lens[1:])
    assert out.shape == (2, 31, 64) and out_lens.tolist() == [31, 18]
    torch.testing.assert_close(out[1, :18], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="output_downsampling_factor"):
        Zipformer2(**dict(TINY, output_downsampling_factor=4))


def test_padding_invariance_embed_and_encoder():
    embed, enc = _embed_and_encoder()
    lens = [157, 120, 63, 40]  # after the front end: 75, 56, 28, 16 (odd and even, not multiples of 4)
    torch.manual_seed(1)
    x = torch.randn(len(lens), max(lens), 80)
    for i, n in enumerate(lens):
        x[i, n:] = 50.0
    with torch.no_grad():
        y, y_lens = embed(x, torch.tensor(lens))
        [(out, out_lens)] = enc(y, y_lens)
        for i, n in enumerate(lens):
            y1, y1_lens = embed(x[i: i + 1, :n], torch.tensor([n]))
            [(o1, o1_lens)] = enc(y1, y1_lens)
            assert o1_lens.item() == out_lens[i].item() == o1.shape[1]
            torch.testing.assert_close(o1[0], out[i, : o1.shape[1]], atol=1e-4, rtol=1e-4)


def test_layer_padding_invariance_and_contract():
    torch.manual_seed(0)
    layer = Zipformer2EncoderLayer(24, 16, 2, 8, 4, 6, 40, 0.1, 5).eval()
    pos = CompactRelPositionalEncoding(16, 0.0).eval()
    x = torch.randn(12, 2, 24)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 7:] = True
    with torch.no_grad():
        out = layer(x, pos(x), src_key_padding_mask=mask)
        alone = layer(x[:7, 1:2], pos(x[:7]), src_key_padding_mask=mask[1:2, :7])
    assert out.shape == x.shape
    torch.testing.assert_close(alone[:, 0], out[:7, 1], atol=1e-5, rtol=1e-5)


def test_max_exit_and_input_checks():
    _, enc = _embed_and_encoder()
    y = torch.randn(1, 20, 32)
    assert len(enc(y, torch.tensor([20]), max_exit=5)) == 1
    with pytest.raises(ValueError, match="single exit"):
        enc(y, torch.tensor([20]), max_exit=3)
    with pytest.raises(ValueError, match="expects"):
        enc(torch.randn(1, 20, 31), torch.tensor([20]))
    with pytest.raises(ValueError, match="stacks"):
        Zipformer2(**dict(TINY, num_heads=(2, 2)))


@pytest.mark.parametrize("regularisers", [False, True])
def test_training_step_gives_finite_gradients(regularisers):
    torch.manual_seed(0)
    embed = Conv2dSubsampling(80, 32, use_balancers=regularisers, use_whiten=regularisers)
    enc = Zipformer2(**TINY, use_balancers=regularisers, use_whiten=regularisers)
    model = torch.nn.ModuleList([embed, enc]).train()
    x = torch.randn(3, 70, 80)
    # early in training (skip and dropout rates high; some parts randomly skipped), then late
    for batch_count in (100, 100000):
        model.zero_grad(set_to_none=True)
        set_batch_count(model, batch_count)
        y, y_lens = embed(x, torch.tensor([70, 55, 30]))
        [(out, out_lens)] = enc(y, y_lens)
        mask = torch.arange(out.shape[1])[None, :] < out_lens[:, None]
        (out.pow(2).sum(-1) * mask).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_parameter_counts_match_icefall():
    """Encoder + front end of icefall's zipformer-s and zipformer-m (icefall also has one unused
    bypass_scale vector per layer, which we leave out: 2,944 and 5,760 parameters)."""
    with torch.device("meta"):
        s_enc = _count(Zipformer2(**ZIPFORMER_S))
        m_enc = _count(Zipformer2(**ZIPFORMER_M))
        embed = _count(Conv2dSubsampling(80, 192))
    assert (s_enc, m_enc, embed) == (21374882, 63376390, 611953)

    def rest(enc_dim, vocab=500, dec=512, join=512):
        decoder = vocab * dec + dec * 4 * 2  # embedding + grouped context conv (context 2, groups dec/4)
        joiner = (enc_dim * join + join) + (dec * join + join) + (join * vocab + vocab)
        simple = (enc_dim * vocab + vocab) + (dec * vocab + vocab)  # pruned-RNN-T simple projections
        return decoder + joiner + simple

    # icefall RESULTS.md (transducer without CTC): 23,285,615 and 65,549,011
    assert s_enc + embed + rest(256) == 23285615 - 2944
    assert m_enc + embed + rest(512) == 65549011 - 5760
    with_ctc_s = s_enc + embed + rest(256) + 256 * 500 + 500
    with_ctc_m = m_enc + embed + rest(512) + 512 * 500 + 500
    assert abs(with_ctc_s / 23.3e6 - 1) < 0.03 and abs(with_ctc_m / 65.5e6 - 1) < 0.03


def test_training_step_under_bf16_autocast():
    torch.manual_seed(0)
    embed, enc = Conv2dSubsampling(80, 32), Zipformer2(**TINY)
    model = torch.nn.ModuleList([embed, enc]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_lens = embed(torch.randn(2, 40, 80), torch.tensor([40, 33]))
        [(out, _)] = enc(y, y_lens)
        loss = out.float().pow(2).mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()), n


def test_onnx_export_with_dynamic_shapes(tmp_path):
    """The traced/ONNX path (gather rel-shift, last-frame padding) matches eager at another shape."""
    import warnings

    import onnxruntime as ort

    class EmbedEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.encoder = _embed_and_encoder()

        def forward(self, x, x_lens):
            y, y_lens = self.embed(x, x_lens)
            [(out, out_lens)] = self.encoder(y, y_lens)
            return out, out_lens

    model = EmbedEncoder().eval()
    path = tmp_path / "enc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 100, 80), torch.tensor([100, 80])), str(path), dynamo=False,
                          opset_version=17, input_names=["x", "x_lens"], output_names=["out", "out_lens"],
                          dynamic_axes={"x": {0: "B", 1: "T"}, "x_lens": {0: "B"}, "out": {0: "B", 1: "T2"},
                                        "out_lens": {0: "B"}})
    x, x_lens = torch.randn(3, 157, 80), torch.tensor([157, 120, 63])
    out, out_lens = ort.InferenceSession(str(path)).run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
    with torch.no_grad():
        ref, ref_lens = model(x, x_lens)
    assert out_lens.tolist() == ref_lens.tolist()
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=1e-4)
