"""Front ends: output lengths, padding invariance, parameter count."""
import pytest
import torch

from splitformer.model.encoder_embed import Conv1dSubsampling, Conv2dSubsampling

torch.set_num_threads(1)


@pytest.mark.parametrize("t", [9, 10, 11, 57, 100, 101])
def test_conv2d_subsampling_lengths(t):
    torch.manual_seed(0)
    embed = Conv2dSubsampling(80, 32).eval()
    x = torch.randn(2, t, 80)
    y, y_lens = embed(x, torch.tensor([t, 9]))
    assert y.shape == (2, (t - 7) // 2, 32)
    assert y_lens.tolist() == [(t - 7) // 2, 1]


@pytest.mark.parametrize("t", [7, 8, 10, 11, 12, 57, 100, 103])
def test_conv1d_subsampling_lengths(t):
    torch.manual_seed(0)
    embed = Conv1dSubsampling(80, 16).eval()
    y, y_lens = embed(torch.randn(1, t, 80), torch.tensor([t]))
    # two valid convs, kernel 3, stride 2: ((t - 1) // 2 - 1) // 2 == (t - 3) // 4
    assert y.shape == (1, (t - 3) // 4, 16)
    assert y_lens.tolist() == [((t - 1) // 2 - 1) // 2]


@pytest.mark.parametrize("cls", [Conv2dSubsampling, Conv1dSubsampling])
def test_front_end_padding_invariance(cls):
    torch.manual_seed(0)
    embed = cls(80, 24).eval()
    lens = [83, 60, 31]
    x = torch.randn(3, 83, 80) * 3.0
    for i, n in enumerate(lens):
        x[i, n:] = 100.0  # loud padding: must not leak into real frames
    with torch.no_grad():
        y, y_lens = embed(x, torch.tensor(lens))
        for i, n in enumerate(lens):
            y1, y1_lens = embed(x[i: i + 1, :n], torch.tensor([n]))
            assert y1_lens.item() == y_lens[i].item()
            torch.testing.assert_close(y1[0], y[i, : y1_lens.item()], atol=1e-4, rtol=1e-4)


def test_conv2d_subsampling_param_count():
    # same layout as icefall's Conv2dSubsampling(80, 192): 3 convs, ConvNeXt(128), Linear(19*128, 192), BiasNorm
    embed = Conv2dSubsampling(80, 192)
    convs = (1 * 8 * 9 + 8) + (8 * 32 * 9 + 32) + (32 * 128 * 9 + 128)
    convnext = (128 * 49 + 128) + (128 * 384 + 384) + (384 * 128 + 128)
    out = 19 * 128 * 192 + 192 + 192 + 1
    assert sum(p.numel() for p in embed.parameters()) == convs + convnext + out == 611953


def test_front_ends_reject_bad_input():
    with pytest.raises(ValueError, match="80"):
        Conv2dSubsampling(80, 8)(torch.randn(1, 20, 40), torch.tensor([20]))
    with pytest.raises(ValueError, match="9 input frames"):
        Conv2dSubsampling(80, 8)(torch.randn(1, 8, 80), torch.tensor([8]))
    with pytest.raises(ValueError, match="activation"):
        Conv1dSubsampling(80, 8, activation="tanh")


def test_conv2d_subsampling_trains():
    torch.manual_seed(0)
    embed = Conv2dSubsampling(80, 16).train()
    y, _ = embed(torch.randn(2, 40, 80), torch.tensor([40, 30]))
    y.pow(2).mean().backward()
    grads = [p.grad for p in embed.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert embed.conv[0].weight.grad.abs().sum() > 0
