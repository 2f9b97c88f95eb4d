"""Early-exit encoder and Splitformer branches: which layers run, lengths, gradients, padding invariance."""

import pytest
import torch

from splitformer.model.early_exit import (
    Downsample,
    EarlyExitEncoder,
    Splitformer,
    make_pad_mask,
    upsample_repeat,
)

torch.set_num_threads(1)

LAYER_TYPES = ["conformer", "zipformer"]
D = 32


def tiny(layer_type: str = "conformer", **kw) -> EarlyExitEncoder:
    args = dict(d_model=D, num_layers=6, exit_layers=(2, 4, 6), layer_type=layer_type, num_heads=4,
                feedforward_dim=48, cnn_module_kernel=5, dropout=0.1, query_head_dim=8, pos_head_dim=2,
                value_head_dim=4, pos_dim=8)
    args.update(kw)
    return EarlyExitEncoder(**args)


def count_calls(enc: EarlyExitEncoder):
    """Forward-hook counters on every trunk layer and every branch layer."""
    calls = {}

    def hook(name):
        def fn(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
        return fn

    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(hook(f"layer{i}"))
    for b, branch in enc.branches.items():
        for j, layer in enumerate(branch.layers):
            layer.register_forward_hook(hook(f"branch{b}.{j}"))
    return calls


def batch(lens=(23, 17, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    return torch.randn(len(lens), int(lens.max()), D, generator=g), lens


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_running_to_exit_k_executes_exactly_its_layers(layer_type):
    enc = tiny(layer_type, split_blocks=(0, 2), split_num_layers=2).eval()
    calls = count_calls(enc)
    x, lens = batch()
    b0, b2 = ["branch0.0", "branch0.1"], ["branch2.0", "branch2.1"]
    for max_exit, n_layers, branches in [(2, 2, b0), (3, 2, b0), (4, 4, b0), (6, 6, b0 + b2), (None, 6, b0 + b2)]:
        calls.clear()
        outs = enc(x, lens, max_exit=max_exit)
        assert len(outs) == enc.num_exits_upto(max_exit) == n_layers // 2
        want = {f"layer{i}": 1 for i in range(n_layers)}
        want.update({name: 1 for name in branches})
        assert calls == want, (max_exit, calls)


def test_iter_exits_is_lazy():
    enc = tiny(split_blocks=(0, -1)).eval()
    calls = count_calls(enc)
    x, lens = batch()
    it = enc.iter_exits(x, lens)
    assert calls == {}  # a generator runs nothing until asked
    next(it)
    assert calls == {"layer0": 1, "layer1": 1, "branch0.0": 1}
    next(it)
    assert calls == {"layer0": 1, "layer1": 1, "branch0.0": 1, "layer2": 1, "layer3": 1}


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_iter_exits_equals_forward(layer_type):
    enc = tiny(layer_type, split_blocks=(1,)).eval()
    x, lens = batch()
    full = enc(x, lens)
    stepped = list(enc.iter_exits(x, lens))
    assert len(stepped) == len(enc.exits) == 3
    for (out, olens), (sout, slens) in zip(full, stepped):
        torch.testing.assert_close(out, sout)
        assert torch.equal(olens, slens)
    partial = enc(x, lens, max_exit=4)
    assert len(partial) == 2
    torch.testing.assert_close(partial[1][0], full[1][0])


@pytest.mark.parametrize("input_downsample,mode", [(1, "learned"), (2, "learned"), (2, "drop")])
def test_exit_lengths(input_downsample, mode):
    enc = tiny(input_downsample=input_downsample, input_downsample_mode=mode, split_blocks=(0, 2)).eval()
    x, lens = batch(lens=(23, 18, 5))
    outs = enc(x, lens)
    assert enc.output_dims == [D, D, D]
    want = (lens + input_downsample - 1) // input_downsample
    for out, olens in outs:
        assert out.shape == (3, (23 + input_downsample - 1) // input_downsample, D)
        assert olens.tolist() == want.tolist()


@pytest.mark.parametrize("t", [1, 2, 7, 8, 13])
def test_upsample_restores_exact_length(t):
    y = torch.arange((t + 1) // 2, dtype=torch.float32).view(1, -1, 1)
    up = upsample_repeat(y, 2, t)
    assert up.shape == (1, t, 1)
    assert up.view(-1).tolist() == [float(i // 2) for i in range(t)]


@pytest.mark.parametrize("t", [9, 10])
@pytest.mark.parametrize("downsample", ["learned", "drop"])
def test_branch_output_matches_block_length(t, downsample):
    enc = tiny(split_blocks=(0,), split_downsample=downsample).eval()
    x, lens = batch(lens=(t, t - 3))
    branch = enc.branches["0"]
    block_out = torch.zeros_like(x)
    y = branch(x, block_out, lens, enc._pos_emb)
    assert y.shape == x.shape


def test_paper_branch_is_frame_drop_layer_repeat_sum():
    """split_downsample=drop + split_combine=sum: block output + repeat(layer(x[:, ::2])) trimmed."""
    torch.manual_seed(0)
    enc = tiny(pos_encoding="abs", split_blocks=(0,), split_downsample="drop", split_combine="sum").eval()
    x = torch.randn(1, 11, D)
    lens = torch.tensor([11])
    block_out = torch.randn(1, 11, D)
    got = enc.branches["0"](x, block_out, lens, enc._pos_emb)
    low = enc.branches["0"].layers[0](x[:, ::2], None, None)  # 6 frames
    want = block_out + low.repeat_interleave(2, dim=1)[:, :11]
    torch.testing.assert_close(got, want)


def test_branch_takes_its_block_input():
    """The branch of block 1 sees layer 1's output (block 1's input), frame-dropped, not block 1's output."""
    enc = tiny(split_blocks=(1,), split_downsample="drop").eval()
    seen = {}
    enc.layers[1].register_forward_hook(lambda m, i, o: seen.__setitem__("block_in", o))
    enc.layers[3].register_forward_hook(lambda m, i, o: seen.__setitem__("block_out", o))
    enc.branches["1"].layers[0].register_forward_hook(lambda m, i, o: seen.__setitem__("branch_in", i[0]))
    x, lens = batch()
    out4 = enc(x, lens, max_exit=4)[1][0]
    torch.testing.assert_close(seen["branch_in"], seen["block_in"][:, ::2])
    assert not torch.allclose(enc.exit_norms[1](seen["block_out"]), out4)  # the branch really was added


def test_learned_downsample_weights_train_under_scaled_adam():
    """ScaledAdam scales updates by the parameter's RMS: weights that started at exactly zero never moved."""
    from splitformer.optim import ScaledAdam

    def moved(zero_start: bool) -> torch.Tensor:
        torch.manual_seed(0)
        ds = Downsample(2, "learned")
        if zero_start:
            ds.weights.data.zero_()
        before = ds.weights.detach().clone()
        opt = ScaledAdam([("weights", ds.weights)], lr=0.05)
        x = torch.randn(4, 10, 3)
        for _ in range(20):
            y, _ = ds(x, torch.full((4,), 10))
            (y - x[:, ::2]).pow(2).sum().backward()  # the target favours the first frame of each pair
            opt.step()
            opt.zero_grad()
        return ds.weights.detach() - before

    d = moved(zero_start=False)
    assert d[0] > 0.04 and d[1] < -0.04  # towards the first frame
    assert moved(zero_start=True).abs().max() < 1e-3  # the old all-zero start: stuck


def test_weighted_downsample_averages_and_ignores_padding():
    ds = Downsample(2, "learned")
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0, 9.0], [2.0, 4.0, 6.0, 100.0, 100.0]]).unsqueeze(-1)
    y, ylens = ds(x, torch.tensor([5, 3]))
    assert ylens.tolist() == [3, 2]
    # a weighted average (near-plain at the start); an incomplete group is completed with the last valid frame
    w0, w1 = torch.softmax(ds.weights.detach(), 0).tolist()
    assert 0.4 < w0 < 0.5 < w1 < 0.6
    assert y[0, :, 0].tolist() == pytest.approx([1 * w0 + 3 * w1, 5 * w0 + 7 * w1, 9.0])
    assert y[1, :2, 0].tolist() == pytest.approx([2 * w0 + 4 * w1, 6.0])
    drop, dlens = Downsample(2, "drop")(x, torch.tensor([5, 3]))
    assert drop[0, :, 0].tolist() == [1.0, 5.0, 9.0] and dlens.tolist() == [3, 2]


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("combine", ["sum", "bypass"])
def test_gradients_reach_every_layer_and_branch(layer_type, combine):
    torch.manual_seed(0)
    enc = tiny(layer_type, split_blocks=(0, 2), split_combine=combine, input_downsample=2).train()
    x, lens = batch()
    outs = enc(x, lens)
    g = torch.Generator().manual_seed(1)
    # a random projection: the plain sum of a LayerNorm output is constant, which would hide missing gradients
    loss = sum((out * torch.randn(out.shape, generator=g)).sum() for out, _ in outs)
    loss.backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    for name in ["layers.0", "layers.5", "branches.0", "branches.2", "exit_norms.0", "input_downsample"]:
        assert any(n.startswith(name) for n, _ in enc.named_parameters())


CONFIGS = [
    dict(pos_encoding="abs"),
    dict(pos_encoding="rel", conv_norm="layer"),
    dict(pos_encoding="abs", split_blocks=(0, 2), split_downsample="drop", split_combine="sum"),
    dict(pos_encoding="rel", split_blocks=(1,), split_downsample="learned", split_combine="bypass",
         input_downsample=2),
    dict(pos_encoding="rel", split_blocks=(0, 2), input_downsample=2, input_downsample_mode="drop"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_padding_invariance_conformer(kw):
    check_padding_invariance(tiny("conformer", **kw))


@pytest.mark.parametrize("kw", [dict(), dict(split_blocks=(0, 2), input_downsample=2)])
def test_padding_invariance_zipformer(kw):
    check_padding_invariance(tiny("zipformer", **kw))


def check_padding_invariance(enc: EarlyExitEncoder) -> None:
    torch.manual_seed(0)
    x, lens = batch(lens=(23, 16, 7))
    enc.train()
    enc(x, lens)  # move BatchNorm running statistics away from their initial values
    enc.eval()
    x[make_pad_mask(lens, x.size(1))] = 50.0  # garbage in the padding must not matter
    outs = enc(x, lens)
    for b in range(len(lens)):
        single = enc(x[b:b + 1, : lens[b]], lens[b:b + 1])
        for (out, olens), (sout, slens) in zip(outs, single):
            n = int(slens[0])
            assert int(olens[b]) == n == sout.size(1)
            assert (out[b, :n] - sout[0]).abs().max().item() < 1e-4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="exit_layers"):
        tiny(exit_layers=(2, 4))  # last exit must be the last layer
    with pytest.raises(ValueError, match="exit_layers"):
        tiny(exit_layers=(4, 2, 6))
    with pytest.raises(ValueError, match="split_blocks"):
        tiny(split_blocks=(3,))
    with pytest.raises(ValueError, match="split_blocks"):
        tiny(split_blocks=(2, -1))  # the same block twice
    with pytest.raises(ValueError, match="pos_encoding"):
        tiny("zipformer", pos_encoding="abs")
    with pytest.raises(ValueError, match="layer_type"):
        tiny("lstm")
    with pytest.raises(ValueError, match="max_exit"):
        tiny()(*batch(), max_exit=1)


def test_splitformer_defaults_to_first_and_last_block():
    enc = Splitformer(d_model=D, num_layers=6, exit_layers=(2, 4, 6), layer_type="conformer", num_heads=4,
                      feedforward_dim=48, cnn_module_kernel=5)
    assert enc.split_blocks == [0, 2]
    assert sorted(enc.branches) == ["0", "2"]


# --- the papers' models: 31.5M (EE baseline) and 36.7M (Splitformer) with front end and 6 Linear CTC heads ---

PAPER_EE = dict(d_model=256, num_layers=12, exit_layers=(2, 4, 6, 8, 10, 12), layer_type="conformer", num_heads=8,
                feedforward_dim=2048, cnn_module_kernel=31, dropout=0.1, pos_encoding="abs", conv_norm="batch",
                input_downsample=1)
PAPER_SPLIT = dict(PAPER_EE, split_blocks=(0, 5), split_downsampling_factor=2, split_num_layers=1,
                   split_downsample="drop", split_combine="sum")


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("kw,encoder_params,total_m", [(PAPER_EE, 30_885_888, 31.5), (PAPER_SPLIT, 36_033_024, 36.7)])
def test_paper_parameter_counts(kw, encoder_params, total_m):
    enc = EarlyExitEncoder(**kw)
    # 12 torchaudio-sized Conformer layers (2,573,568 each), 6 exit LayerNorms, (2 branch layers)
    assert n_params(enc) == encoder_params
    heads = torch.nn.ModuleList([torch.nn.Linear(256, 256) for _ in enc.exits])  # CTC heads, BPE 256
    from splitformer.model.encoder_embed import Conv1dSubsampling

    front = Conv1dSubsampling(in_channels=80, out_channels=256)
    total = n_params(enc) + n_params(heads) + n_params(front)
    assert abs(total / 1e6 - total_m) / total_m < 0.02, total


@pytest.mark.parametrize("preset,encoder_params", [("ee-conformer-paper", 30_885_888),
                                                   ("splitformer-paper", 36_033_024)])
def test_config_presets_build_the_paper_encoders(preset, encoder_params):
    """The lead's presets reach this constructor with the papers' arguments."""
    from splitformer.model import config
    enc, dim = config.build_encoder(config.default_model_args(preset=preset))
    assert isinstance(enc, EarlyExitEncoder) and dim == 256
    assert n_params(enc) == encoder_params
    assert enc.exits == [2, 4, 6, 8, 10, 12] and enc.layer_type == "conformer" and enc.pos_encoding == "abs"
    if preset == "splitformer-paper":
        assert enc.split_blocks == [0, 5]
        assert all(b.downsample.mode == "drop" and b.combine == "sum" for b in enc.branches.values())


def test_input_projection_when_front_end_dim_differs():
    enc = tiny(input_dim=20).eval()
    x = torch.randn(2, 9, 20)
    outs = enc(x, torch.tensor([9, 4]))
    assert outs[-1][0].shape == (2, 9, D)
    with pytest.raises(ValueError, match="expects"):
        enc(torch.randn(2, 9, D), torch.tensor([9, 4]))


def test_zipformer_layers_are_called_time_major_with_matching_positions(monkeypatch):
    """Wiring of layer_type="zipformer" against the DESIGN.md signatures, with recording test doubles:
    layers get (T, B, C), a (B, T) padding mask and position embeddings made for their own length (the
    branch's lower rate included); exits are BiasNorm'ed."""
    import sys
    import types

    seen = []

    class FakeLayer(torch.nn.Module):
        def __init__(self, embed_dim, pos_dim, num_heads, query_head_dim, pos_head_dim, value_head_dim,
                     feedforward_dim, dropout, cnn_module_kernel, bypass_skip_rate=None):
            super().__init__()
            self.lin = torch.nn.Linear(embed_dim, embed_dim)

        def forward(self, src, pos_emb, src_key_padding_mask=None):
            seen.append((tuple(src.shape), tuple(pos_emb.shape), tuple(src_key_padding_mask.shape)))
            return src + self.lin(src)

    class FakePos(torch.nn.Module):
        def __init__(self, pos_dim, dropout):
            super().__init__()
            self.pos_dim = pos_dim

        def forward(self, x):
            return torch.zeros(1, 2 * x.size(0) - 1, self.pos_dim)

    class FakeBiasNorm(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            return x - self.bias

    zip_mod = types.ModuleType("splitformer.model.zipformer")
    zip_mod.Zipformer2EncoderLayer, zip_mod.CompactRelPositionalEncoding = FakeLayer, FakePos
    scaling_mod = types.ModuleType("splitformer.model.scaling")
    scaling_mod.BiasNorm = FakeBiasNorm
    monkeypatch.setitem(sys.modules, "splitformer.model.zipformer", zip_mod)
    monkeypatch.setitem(sys.modules, "splitformer.model.scaling", scaling_mod)

    enc = tiny("zipformer", split_blocks=(0,), input_downsample=2).eval()
    assert all(isinstance(n, FakeBiasNorm) for n in enc.exit_norms)
    x, lens = batch(lens=(23, 11))
    outs = enc(x, lens, max_exit=2)
    assert len(outs) == 1 and outs[0][0].shape == (2, 12, D) and outs[0][1].tolist() == [12, 6]
    # two trunk layers at 12 frames, then the branch layer at 6 frames
    assert seen == [((12, 2, D), (1, 23, 8), (2, 12))] * 2 + [((6, 2, D), (1, 11, 8), (2, 6))]
