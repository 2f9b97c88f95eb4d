"""Conformer layer: parameter count equal to torchaudio's layer, relative positions, padding invariance."""
import math

import pytest
import torch

from splitformer.model.conformer import (
    ConformerLayer,
    MultiHeadSelfAttention,
    RelativePositionalEncoding,
    rel_shift,
    sinusoid,
)

torch.set_num_threads(1)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def torchaudio_layer_params(d: int, ffn: int, k: int) -> int:
    """Parameter count of torchaudio.models.conformer.ConformerLayer (the papers' layer), written out."""
    ln = 2 * d
    ffn_module = ln + (d * ffn + ffn) + (ffn * d + d)
    mha = ln + (3 * d * d + 3 * d) + (d * d + d)
    conv = ln + (d * 2 * d + 2 * d) + (d * k + d) + 2 * d + (d * d + d)  # LN, pw1, depthwise, BatchNorm, pw2
    return 2 * ffn_module + mha + conv + ln


def test_paper_layer_param_count_matches_torchaudio():
    layer = ConformerLayer(256, 8, 2048, 31, pos_encoding="abs")
    assert n_params(layer) == torchaudio_layer_params(256, 2048, 31) == 2_573_568


def test_rel_layer_adds_only_position_projection_and_biases():
    d, h = 64, 4
    extra = n_params(ConformerLayer(d, h, 128, 7, pos_encoding="rel")) - n_params(ConformerLayer(d, h, 128, 7))
    assert extra == d * d + 2 * d


def test_sinusoid_matches_formula():
    pe = sinusoid(torch.tensor([0.0, 3.0, -2.0]), 8)
    for row, pos in enumerate([0.0, 3.0, -2.0]):
        for i in range(4):
            freq = 1.0 / 10000 ** (2 * i / 8)
            assert pe[row, 2 * i].item() == pytest.approx(math.sin(pos * freq), abs=1e-6)
            assert pe[row, 2 * i + 1].item() == pytest.approx(math.cos(pos * freq), abs=1e-6)


def test_rel_shift_picks_query_minus_key_column():
    b, h, t = 2, 3, 5
    scores = torch.randn(b, h, t, 2 * t - 1)
    shifted = rel_shift(scores)
    assert shifted.shape == (b, h, t, t)
    for i in range(t):
        for j in range(t):
            # column k holds relative distance T-1-k, and query i / key j are at distance i-j
            torch.testing.assert_close(shifted[:, :, i, j], scores[:, :, i, t - 1 - (i - j)])


def test_relative_attention_equals_explicit_formula():
    torch.manual_seed(0)
    d, h, t = 16, 2, 6
    attn = MultiHeadSelfAttention(d, h, relative=True).eval()
    x = torch.randn(1, t, d)
    pos = RelativePositionalEncoding(d)(x)
    got = attn(x, None, pos)
    dk = d // h
    q = attn.linear_q(x).view(t, h, dk)
    k = attn.linear_k(x).view(t, h, dk)
    v = attn.linear_v(x).view(t, h, dk)
    p = attn.linear_pos(sinusoid((torch.arange(t)[:, None] - torch.arange(t)[None, :]).reshape(-1), d))
    p = p.view(t, t, h, dk)  # relative embedding of (i - j)
    scores = torch.einsum("ihd,jhd->hij", q + attn.pos_bias_u, k) + torch.einsum(
        "ihd,ijhd->hij", q + attn.pos_bias_v, p)
    probs = (scores / math.sqrt(dk)).softmax(-1)
    want = attn.linear_out(torch.einsum("hij,jhd->ihd", probs, v).reshape(1, t, d))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_encoding,conv_norm", [("abs", "batch"), ("rel", "batch"), ("rel", "layer")])
def test_layer_padding_invariance(pos_encoding, conv_norm):
    torch.manual_seed(0)
    d = 32
    layer = ConformerLayer(d, 4, 64, 7, dropout=0.1, pos_encoding=pos_encoding, conv_norm=conv_norm)
    layer.train()
    pe = RelativePositionalEncoding(d)
    warm = torch.randn(4, 20, d)
    layer(warm, None, pe(warm) if pos_encoding == "rel" else None)  # move BatchNorm running stats off identity
    layer.eval()
    lens = torch.tensor([20, 13, 5])
    x = torch.randn(3, 20, d)
    mask = torch.arange(20)[None, :] >= lens[:, None]
    out = layer(x, mask, pe(x) if pos_encoding == "rel" else None)
    for b in range(3):
        xb = x[b:b + 1, : lens[b]]
        ob = layer(xb, None, pe(xb) if pos_encoding == "rel" else None)
        assert (out[b:b + 1, : lens[b]] - ob).abs().max().item() < 1e-4
    # and the padded frames really were different input: garbage in padding must not change valid frames
    x2 = x.clone()
    x2[mask] = 100.0
    out2 = layer(x2, mask, pe(x2) if pos_encoding == "rel" else None)
    assert (out2 - out)[~mask].abs().max().item() < 1e-4
