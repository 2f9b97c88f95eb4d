#!/usr/bin/env python3
"""Time the Zipformer2 encoder (front end + stacks) per second of audio, forward and forward+backward.

Usage:
  PYTHONPATH=. python bench/encoder_speed.py [--configs cpu-small,zipformer-s] [--batch 10] [--seconds 10]
      [--repeats 5] [--threads 2] [--icefall-dir DIR]

With ``--icefall-dir`` (an icefall checkout, or its egs/librispeech/ASR/zipformer directory) it also
builds icefall's Conv2dSubsampling + Zipformer2 at the same configuration and times it in the same run.
icefall needs k2 only for SwooshL/SwooshR; here a stand-in ``k2`` module with pure-torch formulas is put
in ``sys.modules`` (inside this script only), and ``icefall.utils`` is replaced by the one helper that
scaling.py imports from it. Prints medians; "RTF" is compute seconds per second of audio.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from splitformer.model.encoder_embed import Conv2dSubsampling
from splitformer.model.zipformer import Zipformer2

# Encoder configurations, in icefall's flag names. "cpu-small" is the proposed CPU preset.
CONFIGS: Dict[str, dict] = {
    "cpu-small": dict(
        num_encoder_layers=(1, 1, 1, 1, 1, 1), downsampling_factor=(1, 2, 4, 8, 4, 2),
        feedforward_dim=(384, 384, 512, 512, 512, 384), num_heads=(4, 4, 4, 4, 4, 4),
        encoder_dim=(128, 128, 192, 192, 192, 128), encoder_unmasked_dim=(128, 128, 128, 128, 128, 128),
        cnn_module_kernel=(31, 31, 15, 15, 15, 31), query_head_dim=32, pos_head_dim=4, value_head_dim=12,
        pos_dim=48),
    "zipformer-s": dict(
        num_encoder_layers=(2, 2, 2, 2, 2, 2), downsampling_factor=(1, 2, 4, 8, 4, 2),
        feedforward_dim=(512, 768, 768, 768, 768, 768), num_heads=(4, 4, 4, 8, 4, 4),
        encoder_dim=(192, 256, 256, 256, 256, 256), encoder_unmasked_dim=(192, 192, 192, 192, 192, 192),
        cnn_module_kernel=(31, 31, 15, 15, 15, 31), query_head_dim=32, pos_head_dim=4, value_head_dim=12,
        pos_dim=48),
    "zipformer-m": dict(
        num_encoder_layers=(2, 2, 3, 4, 3, 2), downsampling_factor=(1, 2, 4, 8, 4, 2),
        feedforward_dim=(512, 768, 1024, 1536, 1024, 768), num_heads=(4, 4, 4, 8, 4, 4),
        encoder_dim=(192, 256, 384, 512, 384, 256), encoder_unmasked_dim=(192, 192, 256, 256, 256, 192),
        cnn_module_kernel=(31, 31, 15, 15, 15, 31), query_head_dim=32, pos_head_dim=4, value_head_dim=12,
        pos_dim=48),
}


class EmbedAndEncoder(nn.Module):
    """Front end + encoder with one call signature, for either implementation."""

    def __init__(self, embed: nn.Module, encoder: nn.Module, icefall: bool):
        super().__init__()
        self.embed, self.encoder, self.icefall = embed, encoder, icefall

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> torch.Tensor:
        y, y_lens = self.embed(x, x_lens)
        if self.icefall:
            mask = torch.arange(y.shape[1]).unsqueeze(0) >= y_lens.unsqueeze(1)
            out, _ = self.encoder(y.transpose(0, 1), y_lens, mask)
            return out
        return self.encoder(y, y_lens)[-1][0]


def build_ours(cfg: dict) -> EmbedAndEncoder:
    return EmbedAndEncoder(Conv2dSubsampling(80, cfg["encoder_dim"][0]), Zipformer2(**cfg), icefall=False)


def _install_icefall_shims() -> None:
    """Pure-torch stand-ins for what icefall's zipformer imports from k2 and icefall.utils."""

    def swoosh_l(x):
        return torch.logaddexp(torch.zeros_like(x), x - 4.0) - 0.08 * x - 0.035

    def swoosh_r(x):
        return torch.logaddexp(torch.zeros_like(x), x - 1.0) - 0.08 * x - 0.313261687

    def fwd_and_deriv(fn, shift):
        return lambda x: (fn(x), torch.sigmoid(x - shift) - 0.08)

    k2 = types.ModuleType("k2")
    k2.swoosh_l = k2.swoosh_l_forward = swoosh_l
    k2.swoosh_r = k2.swoosh_r_forward = swoosh_r
    k2.swoosh_l_forward_and_deriv = fwd_and_deriv(swoosh_l, 4.0)
    k2.swoosh_r_forward_and_deriv = fwd_and_deriv(swoosh_r, 1.0)
    sys.modules.setdefault("k2", k2)

    utils = types.ModuleType("icefall.utils")

    @contextlib.contextmanager
    def torch_autocast(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            yield

    utils.torch_autocast = torch_autocast
    pkg = types.ModuleType("icefall")
    pkg.utils = utils
    sys.modules.setdefault("icefall", pkg)
    sys.modules.setdefault("icefall.utils", utils)
    iface = types.ModuleType("encoder_interface")
    iface.EncoderInterface = nn.Module
    sys.modules.setdefault("encoder_interface", iface)


def load_icefall(icefall_dir: str):
    """Import icefall's zipformer.py and subsampling.py from a checkout; returns (zipformer, subsampling)."""
    d = Path(icefall_dir)
    if not (d / "zipformer.py").is_file():
        d = d / "egs" / "librispeech" / "ASR" / "zipformer"
    if not (d / "zipformer.py").is_file():
        raise SystemExit(f"--icefall-dir {icefall_dir}: no zipformer.py there or in egs/librispeech/ASR/zipformer")
    _install_icefall_shims()
    sys.path.insert(0, str(d))
    try:
        return importlib.import_module("zipformer"), importlib.import_module("subsampling")
    finally:
        sys.path.remove(str(d))


def build_icefall(mods, cfg: dict) -> EmbedAndEncoder:
    zipformer, subsampling = mods
    enc = zipformer.Zipformer2(output_downsampling_factor=2, causal=False, **cfg)
    embed = subsampling.Conv2dSubsampling(80, cfg["encoder_dim"][0])
    return EmbedAndEncoder(embed, enc, icefall=True)


def time_it(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(model: EmbedAndEncoder, batch: int, seconds: float, repeats: int) -> Tuple[float, float]:
    """Median seconds for forward (eval, no grad) and forward+backward (train mode) on one batch."""
    frames = int(seconds * 100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, frames, 80, generator=g)
    x_lens = torch.full((batch,), frames, dtype=torch.int64)

    def fwd():
        with torch.no_grad():
            model(x, x_lens)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x, x_lens).pow(2).mean().backward()

    model.eval()
    t_fwd = time_it(fwd, repeats)
    model.train()
    t_fb = time_it(fwd_bwd, repeats)
    return t_fwd, t_fb


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="cpu-small,zipformer-s", help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of audio per utterance")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--icefall-dir", default=None)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    icefall_mods = load_icefall(args.icefall_dir) if args.icefall_dir else None
    audio = args.batch * args.seconds
    print(f"batch {args.batch} x {args.seconds:g} s = {audio:g} s of audio; threads {torch.get_num_threads()}; "
          f"medians of {args.repeats}")
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        impls = [("splitformer", build_ours)]
        if icefall_mods is not None:
            impls.append(("icefall", lambda c: build_icefall(icefall_mods, c)))
        results = {}
        for impl, build in impls:
            torch.manual_seed(0)
            model = build(cfg)
            n = sum(q.numel() for q in model.parameters())
            t_fwd, t_fb = bench(model, args.batch, args.seconds, args.repeats)
            results[impl] = (t_fwd, t_fb)
            print(f"{name:12s} {impl:11s} params {n:>10,d}  fwd {t_fwd:7.3f} s (RTF {t_fwd / audio:.4f})  "
                  f"fwd+bwd {t_fb:7.3f} s (RTF {t_fb / audio:.4f})", flush=True)
        if "icefall" in results:
            (a, b), (c, d) = results["splitformer"], results["icefall"]
            print(f"{name:12s} icefall/splitformer time ratio: fwd {c / a:.2f}  fwd+bwd {d / b:.2f}")


if __name__ == "__main__":
    main()
