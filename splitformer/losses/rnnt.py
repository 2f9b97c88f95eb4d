"""RNN-T losses with k2's names, signatures and numbers, in plain PyTorch (the "torch" backend).

Lattice convention (k2's): S symbols, T frames, ``px[b,s,t]`` = log-prob of emitting symbol s+1 at
(s, t), ``py[b,s,t]`` = log-prob of the termination symbol (blank) at (s, t). ``boundary`` rows are
``[s_begin, t_begin, s_end, t_end]``, typically ``[0, 0, U_b, T_b]``.

``rnnt_type``: "regular" (any number of symbols per frame), "modified" (at most one symbol per frame: a
symbol also moves to the next frame), "constrained" (as modified, but a symbol pays the blank's log-prob too).

float16/bfloat16 inputs are computed in float32 (the losses come back in float32).
"""
import logging
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .mutual_information import mutual_information_recursion

_NEG_INF = float("-inf")
_RNNT_TYPES = ("regular", "modified", "constrained")


def _float32(*xs: Tensor):
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


_CHUNK_ELEMS = 1 << 22  # rows of logits are normalised this many elements at a time (16 MB temporaries)


class _LogProbsAt(torch.autograd.Function):
    """log_softmax(logits)[..., sym] and log_softmax(logits)[..., blank] without a full-size log_softmax.

    The forward keeps only the (...,) normaliser; the backward writes softmax * -(g_x + g_y) straight into
    the gradient buffer and adds the two one-hot terms, so the peak is logits + one gradient-sized buffer
    (logsumexp + gather through autograd needs about three).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, sym: Tensor, blank: int) -> Tuple[Tensor, Tensor]:
        C = logits.shape[-1]
        flat = logits.reshape(-1, C)
        lse = flat.new_empty(flat.shape[0])
        step = max(1, _CHUNK_ELEMS // max(C, 1))
        for i in range(0, flat.shape[0], step):
            torch.logsumexp(flat[i: i + step], dim=1, out=lse[i: i + step])
        lse = lse.view(logits.shape[:-1])
        if bool(torch.isneginf(lse).any()):  # an all -inf row: its log-probs are -inf, not -inf - -inf = nan
            lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        x = torch.gather(logits, -1, sym.unsqueeze(-1)).squeeze(-1) - lse
        y = logits[..., blank] - lse
        ctx.save_for_backward(logits, sym, lse)
        ctx.blank = blank
        return x, y

    @staticmethod
    def backward(ctx, g_x: Optional[Tensor], g_y: Optional[Tensor]):
        logits, sym, lse = ctx.saved_tensors
        g_x = torch.zeros_like(lse) if g_x is None else g_x
        g_y = torch.zeros_like(lse) if g_y is None else g_y
        C = logits.shape[-1]
        flat = logits.reshape(-1, C)
        grad = torch.empty_like(flat)
        lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).reshape(-1, 1)
        w = (g_x + g_y).neg_().reshape(-1, 1)
        step = max(1, _CHUNK_ELEMS // max(C, 1))
        for i in range(0, flat.shape[0], step):
            chunk = grad[i: i + step]
            torch.sub(flat[i: i + step], lse_f[i: i + step], out=chunk)
            chunk.exp_().mul_(w[i: i + step])
        grad = grad.view(logits.shape)
        grad.scatter_add_(-1, sym.unsqueeze(-1), g_x.unsqueeze(-1))
        grad[..., ctx.blank] += g_y
        return grad, None, None


def _validate(S: int, T: int, rnnt_type: str, boundary: Optional[Tensor]) -> None:
    if rnnt_type not in _RNNT_TYPES:
        raise ValueError(f"rnnt_type must be one of {_RNNT_TYPES}, got {rnnt_type!r}")
    if rnnt_type == "regular":
        return
    if boundary is None:
        ok = T >= S
    else:
        ok = bool((boundary[:, 3] >= boundary[:, 2]).all())
    if not ok:
        raise ValueError(f"rnnt_type={rnnt_type!r} emits at most one symbol per frame, so it needs T >= U")


def _mask_final_frame(px: Tensor, boundary: Optional[Tensor]) -> Tensor:
    """Regular RNN-T: no symbol may be emitted at t = t_end (there is no frame there). px is (B,S,T+1)."""
    if boundary is None:
        return px  # column T is already -inf
    B, S, T1 = px.shape
    t_end = boundary[:, 3].to(px.device).view(B, 1, 1).expand(B, S, 1)
    return px.scatter(2, t_end, _NEG_INF)


def _finish_px_py(px: Tensor, py: Tensor, rnnt_type: str, boundary: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """px (B,S,T) and py (B,S+1,T) -> the layout the recursion wants for this rnnt_type."""
    if rnnt_type == "regular":
        B, S, T = px.shape
        px = torch.cat((px, px.new_full((B, S, 1), _NEG_INF)), dim=2)
        px = _mask_final_frame(px, boundary)
    elif rnnt_type == "constrained":
        px = px + py[:, 1:, :]
    return px, py


def _delay_penalty(px: Tensor, delay_penalty: float, rnnt_type: str, boundary: Optional[Tensor]) -> Tensor:
    """Reward early symbols (k2's delay_penalty): +penalty*((T_b-1)/2 - t) on every symbol at frame t."""
    if delay_penalty <= 0.0:
        return px
    B, S, T0 = px.shape
    T = T0 - 1 if rnnt_type == "regular" else T0
    if boundary is None:
        centre = torch.full((B,), (T - 1) / 2, dtype=px.dtype, device=px.device)
    else:
        centre = (boundary[:, 3].to(px.device) - 1) / 2
    frames = torch.arange(T0, device=px.device)
    penalty = (centre.view(B, 1, 1) - frames.view(1, 1, T0)) * delay_penalty
    return px + penalty.to(px.dtype)


def _reduce(scores: Tensor, reduction: Optional[str]) -> Tensor:
    if reduction == "none":
        return -scores
    if reduction == "mean":
        return -scores.mean()
    if reduction == "sum":
        return -scores.sum()
    raise ValueError(f"reduction should be 'none' | 'mean' | 'sum', got {reduction!r}")


def _run(px, py, boundary, reduction, return_grad):
    out = mutual_information_recursion(px, py, boundary=boundary, return_grad=return_grad)
    if return_grad:
        scores, grads = out
        return _reduce(scores, reduction), grads
    return _reduce(out, reduction)


def _check_lm_am(lm: Tensor, am: Tensor, symbols: Tensor) -> Tuple[int, int, int, int]:
    if lm.ndim != 3 or am.ndim != 3 or lm.shape[0] != am.shape[0] or lm.shape[2] != am.shape[2]:
        raise ValueError(f"want lm (B,S+1,C) and am (B,T,C); got {tuple(lm.shape)}, {tuple(am.shape)}")
    B, T, C = am.shape
    S = lm.shape[1] - 1
    if tuple(symbols.shape) != (B, S):
        raise ValueError(f"symbols must be (B,S) = ({B},{S}) to match lm (B,S+1,C); got {tuple(symbols.shape)}")
    return B, S, T, C


def _log_normalizers(lm: Tensor, am: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """log sum_c exp(lm[b,s,c] + am[b,t,c]) as (B,S+1,T) through one batched matmul of shifted exps."""
    am_max = am.amax(dim=2, keepdim=True)  # (B,T,1)
    lm_max = lm.amax(dim=2, keepdim=True)  # (B,S+1,1)
    am_probs = (am - am_max).exp()
    lm_probs = (lm - lm_max).exp()
    tiny = torch.finfo(am_probs.dtype).tiny
    norm = (torch.matmul(lm_probs, am_probs.transpose(1, 2)) + tiny).log() + lm_max + am_max.transpose(1, 2)
    return norm, am_probs, lm_probs, am_max, lm_max


def get_rnnt_logprobs(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    rnnt_type: str = "regular", boundary: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """px, py of the "simple" joiner logits = lm[b,s,:] + am[b,t,:] (never materialised)."""
    lm, am = _float32(lm, am)
    B, S, T, C = _check_lm_am(lm, am, symbols)
    _validate(S, T, rnnt_type, boundary)
    norm, *_ = _log_normalizers(lm, am)
    am_sym = torch.gather(am.transpose(1, 2), 1, symbols.unsqueeze(2).expand(B, S, T))  # (B,S,T)
    lm_sym = torch.gather(lm[:, :S], 2, symbols.unsqueeze(2))  # (B,S,1)
    px = am_sym + lm_sym - norm[:, :S]
    py = am[:, :, termination_symbol].unsqueeze(1) + lm[:, :, termination_symbol].unsqueeze(2) - norm
    return _finish_px_py(px, py, rnnt_type, boundary)


def rnnt_loss_simple(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: Optional[str] = "mean", return_grad: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, Tensor]]]:
    """Transducer loss with the joiner replaced by lm + am (cheap, used to find the pruning ranges)."""
    px, py = get_rnnt_logprobs(lm, am, symbols, termination_symbol, rnnt_type, boundary)
    px = _delay_penalty(px, delay_penalty, rnnt_type, boundary)
    return _run(px, py, boundary, reduction, return_grad)


def get_rnnt_logprobs_smoothed(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    lm_only_scale: float = 0.1, am_only_scale: float = 0.1,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular",
) -> Tuple[Tensor, Tensor]:
    """px, py of the simple joiner interpolated (in log space) with an lm-only and an am-only model.

    The am-only model pairs am with the batch's average lm distribution (a unigram prior); the
    interpolation keeps either part from taking over the pruning bounds early in training.
    """
    lm, am = _float32(lm, am)
    B, S, T, C = _check_lm_am(lm, am, symbols)
    _validate(S, T, rnnt_type, boundary)
    norm, am_probs, lm_probs, am_max, lm_max = _log_normalizers(lm, am)
    tiny = torch.finfo(lm_probs.dtype).tiny
    lm_sums = lm_probs.sum(dim=2, keepdim=True)  # (B,S+1,1)
    unigram = (lm_probs / lm_sums).mean(dim=(0, 1)) + tiny  # (C,)
    am_only_norm = (torch.mv(am_probs.reshape(-1, C), unigram).reshape(B, 1, T)).log() + am_max.transpose(1, 2)
    log_unigram = unigram.log()
    lm_only_norm = lm_sums.log() + lm_max  # (B,S+1,1)

    am_sym = torch.gather(am.transpose(1, 2), 1, symbols.unsqueeze(2).expand(B, S, T))  # (B,S,T)
    lm_sym = torch.gather(lm[:, :S], 2, symbols.unsqueeze(2))  # (B,S,1)
    px = am_sym + lm_sym - norm[:, :S]
    px_am_only = am_sym + log_unigram[symbols].unsqueeze(2) - am_only_norm
    px_lm_only = lm_sym - lm_only_norm[:, :S]

    py_am = am[:, :, termination_symbol].unsqueeze(1)  # (B,1,T)
    py_lm = lm[:, :, termination_symbol].unsqueeze(2)  # (B,S+1,1)
    py = py_am + py_lm - norm
    py_am_only = py_am + log_unigram[termination_symbol] - am_only_norm
    py_lm_only = py_lm - lm_only_norm

    both = 1.0 - lm_only_scale - am_only_scale
    # A zero scale still has to keep -inf parts from turning into nan (0 * -inf), as in k2.
    lm_w = lm_only_scale if lm_only_scale != 0.0 else 1e-20
    am_w = am_only_scale if am_only_scale != 0.0 else 1e-20
    px = px * both + px_lm_only * lm_w + px_am_only * am_w
    py = py * both + py_lm_only * lm_w + py_am_only * am_w
    return _finish_px_py(px, py, rnnt_type, boundary)


def rnnt_loss_smoothed(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    lm_only_scale: float = 0.1, am_only_scale: float = 0.1,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: Optional[str] = "mean", return_grad: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, Tensor]]]:
    """The simple loss on smoothed log-probs; with return_grad=True also the (px, py) occupation
    probabilities that get_rnnt_prune_ranges needs (icefall calls it exactly so)."""
    px, py = get_rnnt_logprobs_smoothed(
        lm, am, symbols, termination_symbol, lm_only_scale, am_only_scale, boundary, rnnt_type
    )
    px = _delay_penalty(px, delay_penalty, rnnt_type, boundary)
    return _run(px, py, boundary, reduction, return_grad)


def get_rnnt_logprobs_joint(
    logits: Tensor, symbols: Tensor, termination_symbol: int,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular",
) -> Tuple[Tensor, Tensor]:
    """px, py from full joiner logits (B,T,S+1,C)."""
    (logits,) = _float32(logits)
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B,T,S+1,C), got {tuple(logits.shape)}")
    B, T, S1, C = logits.shape
    S = S1 - 1
    if tuple(symbols.shape) != (B, S):
        raise ValueError(f"symbols must be (B,S) = ({B},{S}) to match logits; got {tuple(symbols.shape)}")
    _validate(S, T, rnnt_type, boundary)
    # The symbol that leaves cell (t, s) is symbols[s]; for s = S there is none (use blank, then drop row S).
    padded = torch.cat((symbols, symbols.new_full((B, 1), termination_symbol)), dim=1)  # (B,S+1)
    x, y = _LogProbsAt.apply(logits, padded.unsqueeze(1).expand(B, T, S1), termination_symbol)  # (B,T,S+1)
    return _finish_px_py(x[:, :, :S].transpose(1, 2), y.transpose(1, 2), rnnt_type, boundary)


def rnnt_loss(
    logits: Tensor, symbols: Tensor, termination_symbol: int,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: Optional[str] = "mean", return_grad: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, Tensor]]]:
    """The full-lattice transducer loss (the reference the pruned loss approximates)."""
    px, py = get_rnnt_logprobs_joint(logits, symbols, termination_symbol, boundary, rnnt_type)
    px = _delay_penalty(px, delay_penalty, rnnt_type, boundary)
    return _run(px, py, boundary, reduction, return_grad)


def _suffix_min(x: Tensor) -> Tensor:
    """y[..., t] = min(x[..., t:]) (the largest non-decreasing sequence that is <= x)."""
    return torch.cummin(x.flip(-1), dim=-1).values.flip(-1)


def _limit_growth(s_begin: Tensor, s_range: int) -> Tensor:
    """Make s_begin non-decreasing with steps of at most s_range-1, only ever lowering it, so that
    consecutive frames' windows overlap and a path through the pruned lattice always exists."""
    T = s_begin.shape[-1]
    slope = (s_range - 1) * torch.arange(T, device=s_begin.device)
    s_begin = _suffix_min(s_begin)
    slack = _suffix_min(slope - s_begin).clamp(min=0)  # growth limit, applied backwards in time
    return slope - slack


def get_rnnt_prune_ranges(px_grad: Tensor, py_grad: Tensor, boundary: Tensor, s_range: int) -> Tensor:
    """For each frame, the s_range consecutive symbol positions to keep: (B, T, s_range) int64.

    The window at frame t is the one holding most blank occupation probability (py_grad), minus the
    symbol occupation entering it from below; then windows are made monotonic and overlapping.
    """
    B, S, T1 = px_grad.shape
    T = py_grad.shape[-1]
    regular = T1 == T + 1
    if T1 not in (T, T + 1) or tuple(py_grad.shape) != (B, S + 1, T) or tuple(boundary.shape) != (B, 4):
        raise ValueError(
            f"want px_grad (B,S,T+1|T), py_grad (B,S+1,T), boundary (B,4); got "
            f"{tuple(px_grad.shape)}, {tuple(py_grad.shape)}, {tuple(boundary.shape)}"
        )
    u_len, t_len = boundary[:, 2], boundary[:, 3]
    if regular:
        needed = int((torch.div(u_len - 1, t_len.clamp(min=1), rounding_mode="trunc") + 2).max().item())
        if s_range < needed:
            logging.warning(f"get_rnnt_prune_ranges: s_range={s_range} too small for U={u_len.tolist()}, "
                            f"T={t_len.tolist()}; using {needed}")
            s_range = needed
    if s_range > S:
        s_range = S + 1
    min_range = 2 if (regular and S > 0) else 1
    if s_range < min_range:
        raise ValueError(f"s_range={s_range} < {min_range}: no path could survive pruning")

    n_win = S + 1 - s_range + 1
    sb, ss, st = py_grad.stride()
    windows = torch.as_strided(py_grad, (B, n_win, s_range, T), (sb, ss, ss, st)).sum(dim=2)  # (B,n_win,T)
    px_in = torch.cat((px_grad.new_zeros(B, 1, T1), px_grad), dim=1)[:, :n_win, :T]
    s_begin = torch.argmax(windows - px_in, dim=1)  # (B,T)

    # The last frame must reach the end of the transcript.
    frames = torch.arange(T, device=px_grad.device).view(1, T)
    inside = frames < (t_len.to(px_grad.device).view(B, 1) - 1)
    last = (u_len.to(px_grad.device).view(B, 1) - s_range + 1).clamp(min=0)
    s_begin = torch.where(inside, s_begin, last)
    s_begin = _limit_growth(s_begin, s_range if regular else 2)
    return s_begin.unsqueeze(2) + torch.arange(s_range, device=px_grad.device)


def do_rnnt_pruning(am: Tensor, lm: Tensor, ranges: Tensor) -> Tuple[Tensor, Tensor]:
    """am (B,T,C), lm (B,S+1,C) -> both as (B,T,s_range,C) on the kept lattice cells (am is a view)."""
    B, T, s_range = ranges.shape
    if am.shape[0] != B or lm.shape[0] != B or am.shape[1] != T:
        raise ValueError(f"ranges {tuple(ranges.shape)} do not match am {tuple(am.shape)} / lm {tuple(lm.shape)}")
    C = lm.shape[2]
    am_pruned = am.unsqueeze(2).expand(B, T, s_range, am.shape[2])
    lm_pruned = torch.gather(lm, 1, ranges.reshape(B, T * s_range, 1).expand(B, T * s_range, C))
    return am_pruned, lm_pruned.view(B, T, s_range, C)


def get_rnnt_logprobs_pruned(
    logits: Tensor, symbols: Tensor, ranges: Tensor, termination_symbol: int,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular",
) -> Tuple[Tensor, Tensor]:
    """px, py on the full (S, T) lattice from pruned logits (B,T,s_range,C); cells not kept are -inf."""
    (logits,) = _float32(logits)
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B,T,s_range,C), got {tuple(logits.shape)}")
    B, T, s_range, C = logits.shape
    if tuple(ranges.shape) != (B, T, s_range):
        raise ValueError(f"ranges must be (B,T,s_range) = ({B},{T},{s_range}), got {tuple(ranges.shape)}")
    S = symbols.shape[1]
    _validate(S, T, rnnt_type, boundary)
    # The symbol that leaves cell (s, t) is symbols[s]; for s = S there is none (use blank, then drop row S).
    padded = torch.cat((symbols, symbols.new_full((B, 1), termination_symbol)), dim=1)  # (B,S+1)
    kept_sym = torch.gather(padded.unsqueeze(1).expand(B, T, S + 1), 2, ranges)  # (B,T,R)
    px_kept, py_kept = _LogProbsAt.apply(logits, kept_sym, termination_symbol)  # (B,T,R) each
    rows = ranges.transpose(1, 2)  # (B,R,T): the s of each kept cell
    px = logits.new_full((B, S + 1, T), _NEG_INF).scatter(1, rows, px_kept.transpose(1, 2))[:, :S]
    py = logits.new_full((B, S + 1, T), _NEG_INF).scatter(1, rows, py_kept.transpose(1, 2))
    return _finish_px_py(px, py, rnnt_type, boundary)


def rnnt_loss_pruned(
    logits: Tensor, symbols: Tensor, ranges: Tensor, termination_symbol: int,
    boundary: Optional[Tensor] = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: Optional[str] = "mean", return_grad: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, Tensor]]]:
    """The transducer loss restricted to the cells in ``ranges`` (logits from do_rnnt_pruning + joiner)."""
    px, py = get_rnnt_logprobs_pruned(logits, symbols, ranges, termination_symbol, boundary, rnnt_type)
    px = _delay_penalty(px, delay_penalty, rnnt_type, boundary)
    return _run(px, py, boundary, reduction, return_grad)
