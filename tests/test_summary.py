"""Preset sizes against the published figures, and per-exit compute from the summary tool."""
import subprocess
import sys
from pathlib import Path

import pytest

from splitformer.model.config import PRESETS, build_model, default_model_args
from splitformer.summary import count_params, exit_macs

REPO = Path(__file__).resolve().parents[1]


def params(preset: str, vocab: int, **overrides) -> int:
    return count_params(build_model(default_model_args(preset=preset, **overrides), vocab))


@pytest.mark.parametrize(
    "preset,vocab,published,tol",
    [
        ("zipformer-s", 500, 23.3e6, 0.03),  # icefall's small Zipformer
        ("zipformer-m", 500, 65.5e6, 0.03),  # icefall's default (medium) Zipformer
        ("ee-conformer-paper", 256, 31.5e6, 0.02),  # the papers' EE baseline
        ("splitformer-paper", 256, 36.7e6, 0.02),  # the Splitformer
    ],
)
def test_published_parameter_counts(preset, vocab, published, tol):
    n = params(preset, vocab)
    assert abs(n - published) / published <= tol, f"{preset}: {n} params, published {published:.0f}"


def test_zipformer_lite_matches_the_early_exit_models_last_exit_in_compute():
    """zipformer-cpu-lite exists to compare at equal MACs: within 5 % of ee-zipformer-cpu's top exit on
    3 s utterances (AN4's mean length; attention makes the figure grow with length)."""
    import torch

    from splitformer.model.config import encoder_output_frames
    from splitformer.summary import encoder_macs_per_second

    ee = build_model(default_model_args(preset="ee-zipformer-cpu"), 30)
    lite_args = default_model_args(preset="zipformer-cpu-lite")
    lite = build_model(lite_args, 30)
    ee_macs, lite_macs = encoder_macs_per_second(ee, seconds=3.0), encoder_macs_per_second(lite, seconds=3.0)
    assert abs(lite_macs - ee_macs) / ee_macs < 0.05, (lite_macs, ee_macs)
    # and at the same 25 Hz output rate, which the cut filter predicts without building the model
    with torch.no_grad():
        out, out_lens = lite.eval().encode(torch.randn(1, 203, 80), torch.tensor([203]))
    assert out.shape[1] == out_lens.item() == encoder_output_frames(lite_args, 203) == (203 - 3) // 4


def test_the_matched_control_costs_what_the_splitformer_costs_at_every_exit():
    """ee-zipformer-cpu-matched is the Splitformer's equal-compute control: its wider blocks 0 and 5 cost what the
    branches cost, within 0.5 % at every exit (3 s, AN4's mean), with fewer parameters; only those blocks widen."""
    split = build_model(default_model_args(preset="splitformer-cpu"), 30)
    matched = build_model(default_model_args(preset="ee-zipformer-cpu-matched"), 30)
    plain = build_model(default_model_args(preset="ee-zipformer-cpu"), 30)
    a, b, c = exit_macs(split, 3.0), exit_macs(matched, 3.0), exit_macs(plain, 3.0)
    for e in split.exits:
        assert abs(b[e] - a[e]) / a[e] < 0.005, (e, a[e], b[e])
        assert a[e] - c[e] > 3e6  # the plain early-exit model does not: each branch costs 3.6M MACs/s
    assert count_params(plain) < count_params(matched) < count_params(split)
    assert matched.encoder.feedforward_dims == [384, 256, 256, 256, 256, 384] and not matched.encoder.branches
    # one width per block, or one for all; another count is refused with the rule
    with pytest.raises(ValueError, match="one per block"):
        build_model(default_model_args(preset="ee-zipformer-cpu", feedforward_dim="256,384"), 30)


def test_every_preset_builds():
    for name in PRESETS:
        # the pretrained-backbone presets name hub checkpoints, which this machine cannot download: architecture only
        extra = dict(hf_weights="random") if PRESETS[name].get("encoder") == "hf" else {}
        assert params(name, 64, **extra) > 0


def test_summary_cli_prints_totals_and_exits():
    out = subprocess.run(
        [sys.executable, "-m", "splitformer.summary", "--preset", "ee-zipformer-cpu", "--vocab-size", "64",
         "--encoder-dim", "64", "--encoder-unmasked-dim", "64", "--feedforward-dim", "128", "--seconds", "2"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    lines = out.splitlines()
    total = [l for l in lines if l.startswith("total_params: ")]
    assert len(total) == 1 and int(total[0].split()[1]) > 0
    exits = [l.split() for l in lines if l.startswith("exit_layer: ")]
    assert [int(e[1]) for e in exits] == [2, 4, 6, 8, 10, 12]
    top = [l for l in lines if l.startswith("macs_per_second: ")]
    assert int(top[0].split()[1]) == int(exits[-1][3])


def _small(preset: str, **kw):
    args = default_model_args(preset=preset, encoder_dim="64", encoder_unmasked_dim="64", feedforward_dim="128", **kw)
    return build_model(args, 32)


@pytest.mark.parametrize("layer_type", ["zipformer", "conformer"])
def test_exit_macs_grow_linearly_with_depth(layer_type):
    pos = "rel" if layer_type == "zipformer" else "abs"
    macs = exit_macs(_small("ee-zipformer-cpu", layer_type=layer_type, pos_encoding=pos), seconds=2.0)
    steps = [macs[b] - macs[a] for a, b in zip(list(macs)[:-1], list(macs)[1:])]
    assert all(s > 0 for s in steps)
    assert max(steps) / min(steps) < 1.02, f"per-block MACs not constant: {steps}"


def test_split_branches_cost_about_half_a_block_layer():
    plain = exit_macs(_small("ee-zipformer-cpu"), seconds=2.0)
    split = exit_macs(_small("splitformer-cpu"), seconds=2.0)
    # Block 0 carries a one-layer branch at half the frame rate: a quarter to three quarters of one layer's cost.
    layer = (plain[4] - plain[2]) / 2
    extra = split[2] - plain[2]
    assert 0.25 * layer < extra < 0.75 * layer, (extra, layer)
    # Middle blocks are untouched; the last block has a branch again.
    assert split[8] - split[6] == pytest.approx(plain[8] - plain[6], rel=1e-3)
    assert split[12] - split[10] > plain[12] - plain[10]
