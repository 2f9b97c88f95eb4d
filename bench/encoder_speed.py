#!/usr/bin/env python3
"""Time the Zipformer2 encoder (front end + stacks) per second of audio, forward and forward+backward.

Usage:
  PYTHONPATH=. python bench/encoder_speed.py [--configs cpu-small,zipformer-s] [--batch 10] [--seconds 10]
      [--repeats 5] [--threads 2] [--device cpu] [--icefall-dir DIR]

With ``--icefall-dir`` (an icefall checkout, or its egs/librispeech/ASR/zipformer directory) it also
builds icefall's Conv2dSubsampling + Zipformer2 at the same configuration and times it in the same run.
icefall needs k2 only for SwooshL/SwooshR; here a stand-in ``k2`` module with pure-torch formulas is put
in ``sys.modules`` (inside this script only), and ``icefall.utils`` is replaced by the one helper that
scaling.py imports from it. Prints medians of wall and CPU (process) time; "RTF" is wall seconds per
second of audio. The two implementations are timed in turns so that load changes on a shared machine
hit both alike; on a busy machine use --threads 1 and compare CPU times.
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


_ZIPFORMER_KEYS = ("num_encoder_layers", "downsampling_factor", "feedforward_dim", "num_heads", "encoder_dim",
                   "encoder_unmasked_dim", "cnn_module_kernel", "query_head_dim", "pos_head_dim", "value_head_dim")


def resolve_config(name: str) -> dict:
    """A config above, or a Zipformer2 preset of splitformer.model.config.PRESETS (e.g. zipformer-cpu)."""
    if name in CONFIGS:
        return CONFIGS[name]
    from splitformer.model.config import PRESETS, to_int_tuple

    preset = PRESETS.get(name)
    if preset is None or preset.get("encoder", "zipformer") != "zipformer" or preset.get("encoder_embed") == "conv1d":
        zips = [k for k, v in PRESETS.items() if v.get("encoder") == "zipformer"]
        raise SystemExit(f"unknown config {name!r}: use one of {list(CONFIGS)} or a zipformer preset {zips}")
    cfg = dict(CONFIGS["zipformer-m"])  # the flags' defaults, then the preset's values
    for k in _ZIPFORMER_KEYS:
        if k in preset:
            cfg[k] = to_int_tuple(preset[k])
    if "pos_dim" in preset:
        cfg["pos_dim"] = int(preset["pos_dim"])
    return cfg


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

    # the same softplus formulas that splitformer uses, so that the comparison is not about them
    def swoosh_l(x):
        return torch.nn.functional.softplus(x - 4.0, threshold=15.0) - 0.08 * x - 0.035

    def swoosh_r(x):
        return torch.nn.functional.softplus(x - 1.0, threshold=15.0) - 0.08 * x - 0.313261687

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


def make_steps(model: EmbedAndEncoder, batch: int, seconds: float, device: torch.device):
    """(forward in eval mode without grad, forward+backward in train mode) closures on one batch."""
    frames = int(seconds * 100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, frames, 80, generator=g).to(device)
    x_lens = torch.full((batch,), frames, dtype=torch.int64, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fwd():
        model.eval()
        with torch.no_grad():
            model(x, x_lens)
        sync()

    def fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        model(x, x_lens).pow(2).mean().backward()
        sync()

    return fwd, fwd_bwd


def time_interleaved(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, Tuple[float, float]]:
    """Median (wall, CPU) seconds of each step. The steps take turns, so that a change in machine load
    (this CPU is shared) hits all of them alike; CPU time (this process, all threads) is the steadier
    figure on a busy machine, and equals compute time with --threads 1."""
    for fn in steps.values():
        fn()  # warm-up
    times: Dict[str, List[Tuple[float, float]]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k].append((time.perf_counter() - w0, time.process_time() - c0))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="cpu-small,zipformer-s",
                   help=f"comma list of {list(CONFIGS)} or zipformer presets of splitformer.model.config")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of audio per utterance")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--icefall-dir", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    icefall_mods = load_icefall(args.icefall_dir) if args.icefall_dir else None
    audio = args.batch * args.seconds
    print(f"batch {args.batch} x {args.seconds:g} s = {audio:g} s of audio; device {device}; "
          f"threads {torch.get_num_threads()}; medians of {args.repeats}, implementations interleaved")
    for name in args.configs.split(","):
        cfg = resolve_config(name)
        models = {}
        torch.manual_seed(0)
        models["splitformer"] = build_ours(cfg).to(device)
        if icefall_mods is not None:
            torch.manual_seed(0)
            models["icefall"] = build_icefall(icefall_mods, cfg).to(device)
        steps = {}
        for impl, model in models.items():
            fwd, fwd_bwd = make_steps(model, args.batch, args.seconds, device)
            steps[(impl, "fwd")] = fwd
            steps[(impl, "fwd+bwd")] = fwd_bwd
        med = time_interleaved(steps, args.repeats)
        for impl, model in models.items():
            n = sum(q.numel() for q in model.parameters())
            (wf, cf), (wb, cb) = med[(impl, "fwd")], med[(impl, "fwd+bwd")]
            print(f"{name:12s} {impl:11s} params {n:>10,d}  fwd wall {wf:7.3f} s cpu {cf:7.3f} s "
                  f"(RTF {wf / audio:.4f})  fwd+bwd wall {wb:7.3f} s cpu {cb:7.3f} s (RTF {wb / audio:.4f})",
                  flush=True)
        if "icefall" in models:
            ratio = {k: [med[("icefall", k)][i] / med[("splitformer", k)][i] for i in (0, 1)]
                     for k in ("fwd", "fwd+bwd")}
            print(f"{name:12s} icefall/splitformer time ratio (wall, cpu): fwd {ratio['fwd'][0]:.2f}, "
                  f"{ratio['fwd'][1]:.2f}  fwd+bwd {ratio['fwd+bwd'][0]:.2f}, {ratio['fwd+bwd'][1]:.2f}")


if __name__ == "__main__":
    main()
