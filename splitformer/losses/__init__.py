"""Pruned RNN-T and CTC losses with k2's names and signatures.

Model code calls these exactly as icefall calls k2::

    from splitformer import losses
    simple, (px_grad, py_grad) = losses.rnnt_loss_smoothed(lm=..., am=..., symbols=..., termination_symbol=0,
        lm_only_scale=0.25, am_only_scale=0.0, boundary=boundary, reduction="sum", return_grad=True)
    ranges = losses.get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad, boundary=boundary, s_range=5)
    am_pruned, lm_pruned = losses.do_rnnt_pruning(am=am, lm=lm, ranges=ranges)
    pruned = losses.rnnt_loss_pruned(logits=joiner(am_pruned, lm_pruned), symbols=..., ranges=ranges,
        termination_symbol=0, boundary=boundary, reduction="sum")

Where they run is chosen by ``set_backend("auto"|"torch"|"k2"|"fast_rnnt")`` (or ``--rnnt-backend`` through
``add_arguments``): "auto" uses k2 if it imports, else fast_rnnt, else the plain PyTorch implementation in
``rnnt.py``. The choice is logged once. All backends get float32 (half inputs are upcast first); empty
transcripts (U = 0, which k2 and fast_rnnt reject) and CUDA tensors given to a CPU-only build of k2/fast_rnnt
go to the torch implementation.
"""
import argparse
import logging
from typing import Any, Optional

import torch
from torch import Tensor

from . import rnnt as _torch_impl
from .ctc import ctc_infeasible, ctc_loss
from .mutual_information import mutual_information_recursion as _torch_mi

__all__ = [
    "add_arguments", "set_backend", "get_backend", "ctc_infeasible", "ctc_loss", "mutual_information_recursion",
    "rnnt_loss", "rnnt_loss_simple", "rnnt_loss_smoothed", "rnnt_loss_pruned",
    "get_rnnt_prune_ranges", "do_rnnt_pruning", "get_rnnt_logprobs", "get_rnnt_logprobs_joint",
    "get_rnnt_logprobs_pruned", "get_rnnt_logprobs_smoothed",
]

BACKENDS = ("auto", "torch", "k2", "fast_rnnt")
_requested = "auto"
_resolved: Optional[str] = None
_module: Any = None


def _import(name: str):
    """The backend's module, or None if it cannot be imported (optional dependency)."""
    if name == "torch":
        return None
    try:
        if name == "k2":
            import k2  # noqa: F401  (optional accelerator)

            return k2
        if name == "fast_rnnt":
            import fast_rnnt  # noqa: F401  (optional accelerator)

            return fast_rnnt
    except Exception as e:  # ImportError, or a broken binary build (OSError, undefined symbols)
        logging.debug(f"rnnt backend {name} not importable: {e}")
    return None


def set_backend(name: str) -> None:
    """Choose where the RNN-T losses run; raises if an explicitly named backend cannot be imported."""
    global _requested, _resolved, _module
    if name not in BACKENDS:
        raise ValueError(f"--rnnt-backend must be one of {BACKENDS}, got {name!r}")
    if name in ("k2", "fast_rnnt") and _import(name) is None:
        raise ImportError(f"--rnnt-backend {name}: `import {name}` fails; install it "
                          f"(fast_rnnt: tools/install_fast_rnnt.sh) or use --rnnt-backend auto")
    _requested, _resolved, _module = name, None, None


def get_backend() -> str:
    """The backend actually in use ("torch", "k2" or "fast_rnnt"); resolves "auto" on first call."""
    global _resolved, _module
    if _resolved is None:
        candidates = ("k2", "fast_rnnt", "torch") if _requested == "auto" else (_requested,)
        for name in candidates:
            mod = _import(name)
            if name == "torch" or mod is not None:
                _resolved, _module = name, mod
                break
        logging.info(f"RNN-T loss backend: {_resolved} (requested: {_requested})")
    return _resolved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rnnt-backend", type=str, default="auto", choices=BACKENDS,
                        help="Where the pruned RNN-T loss runs: auto = k2, else fast_rnnt, else plain torch.")


def _has_device(mod: Any, device: torch.device) -> bool:
    """A CPU-only build of k2/fast_rnnt cannot take CUDA tensors."""
    if device.type == "cpu":
        return True
    with_cuda = getattr(mod, "with_cuda", False)
    return bool(with_cuda() if callable(with_cuda) else with_cuda)


def _external(symbols: Optional[Tensor], boundary: Optional[Tensor], device: torch.device):
    """The k2/fast_rnnt module to call, or None when the torch implementation must run."""
    if get_backend() == "torch" or not _has_device(_module, device):
        return None
    if symbols is not None and symbols.shape[1] == 0:
        return None  # k2/fast_rnnt assert S >= 1
    if boundary is not None and bool((boundary[:, 2] == 0).any()):
        return None
    return _module


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mutual_information_recursion(px: Tensor, py: Tensor, boundary: Optional[Tensor] = None,
                                 return_grad: bool = False):
    mod = _external(None, None, px.device)
    if mod is None:
        return _torch_mi(px, py, boundary=boundary, return_grad=return_grad)
    return mod.mutual_information_recursion(_f32(px), _f32(py), boundary=boundary, return_grad=return_grad)


def rnnt_loss_simple(lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
                     boundary: Optional[Tensor] = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
                     reduction: Optional[str] = "mean", return_grad: bool = False):
    mod = _external(symbols, boundary, am.device) or _torch_impl
    kw = dict(delay_penalty=delay_penalty) if delay_penalty else {}
    return mod.rnnt_loss_simple(lm=_f32(lm), am=_f32(am), symbols=symbols, termination_symbol=termination_symbol,
                                boundary=boundary, rnnt_type=rnnt_type, reduction=reduction,
                                return_grad=return_grad, **kw)


def rnnt_loss_smoothed(lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
                       lm_only_scale: float = 0.1, am_only_scale: float = 0.1, boundary: Optional[Tensor] = None,
                       rnnt_type: str = "regular", delay_penalty: float = 0.0, reduction: Optional[str] = "mean",
                       return_grad: bool = False):
    mod = _external(symbols, boundary, am.device) or _torch_impl
    kw = dict(delay_penalty=delay_penalty) if delay_penalty else {}
    return mod.rnnt_loss_smoothed(lm=_f32(lm), am=_f32(am), symbols=symbols,
                                  termination_symbol=termination_symbol, lm_only_scale=lm_only_scale,
                                  am_only_scale=am_only_scale, boundary=boundary, rnnt_type=rnnt_type,
                                  reduction=reduction, return_grad=return_grad, **kw)


def rnnt_loss(logits: Tensor, symbols: Tensor, termination_symbol: int, boundary: Optional[Tensor] = None,
              rnnt_type: str = "regular", delay_penalty: float = 0.0, reduction: Optional[str] = "mean",
              return_grad: bool = False):
    mod = _external(symbols, boundary, logits.device) or _torch_impl
    kw = dict(delay_penalty=delay_penalty) if delay_penalty else {}
    return mod.rnnt_loss(logits=_f32(logits), symbols=symbols, termination_symbol=termination_symbol,
                         boundary=boundary, rnnt_type=rnnt_type, reduction=reduction, return_grad=return_grad, **kw)


def rnnt_loss_pruned(logits: Tensor, symbols: Tensor, ranges: Tensor, termination_symbol: int,
                     boundary: Optional[Tensor] = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
                     reduction: Optional[str] = "mean", return_grad: bool = False):
    mod = _external(symbols, boundary, logits.device) or _torch_impl
    kw = dict(delay_penalty=delay_penalty) if delay_penalty else {}
    return mod.rnnt_loss_pruned(logits=_f32(logits), symbols=symbols, ranges=ranges,
                                termination_symbol=termination_symbol, boundary=boundary, rnnt_type=rnnt_type,
                                reduction=reduction, return_grad=return_grad, **kw)


def get_rnnt_prune_ranges(px_grad: Tensor, py_grad: Tensor, boundary: Tensor, s_range: int) -> Tensor:
    mod = _external(None, boundary, px_grad.device) if px_grad.shape[1] > 0 else None
    return (mod or _torch_impl).get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad, boundary=boundary,
                                                     s_range=s_range)


def do_rnnt_pruning(am: Tensor, lm: Tensor, ranges: Tensor):
    mod = _external(None, None, am.device) or _torch_impl
    return mod.do_rnnt_pruning(am=am, lm=lm, ranges=ranges)


# Helpers that expose the lattice log-probs (same names as k2); always the torch implementation.
get_rnnt_logprobs = _torch_impl.get_rnnt_logprobs
get_rnnt_logprobs_joint = _torch_impl.get_rnnt_logprobs_joint
get_rnnt_logprobs_pruned = _torch_impl.get_rnnt_logprobs_pruned
get_rnnt_logprobs_smoothed = _torch_impl.get_rnnt_logprobs_smoothed
