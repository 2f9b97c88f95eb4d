"""The mutual-information recursion behind every RNN-T loss here, in plain PyTorch.

Same contract as ``k2.mutual_information_recursion``: ``px`` is (B, S, T+1) ("regular": vertical moves
stay on a frame) or (B, S, T) ("modified": a symbol also consumes a frame), ``py`` is (B, S+1, T), and::

    p[b, s_begin, t_begin] = 0
    regular:  p[b,s,t] = logaddexp(p[b,s-1,t]   + px[b,s-1,t],   p[b,s,t-1] + py[b,s,t-1])
    modified: p[b,s,t] = logaddexp(p[b,s-1,t-1] + px[b,s-1,t-1], p[b,s,t-1] + py[b,s,t-1])
    result[b] = p[b, s_end, t_end]

How it is fast without C++: all cells that depend only on the previous "step" are computed at once. For
"regular" a step is an anti-diagonal s+t=d, for "modified" a frame t. px and py are gathered once into a
skewed (B, steps, S+1) layout so each step is two adds and one logaddexp over contiguous rows, vectorised
over batch and s. Each utterance is shifted so that its lattice starts at (0, 0); cells outside its box
get -inf weights, so one loop serves a batch of different lengths.

The backward pass is a second sweep from the end, in probability space, that turns local move posteriors
``exp(alpha[prev] + weight - alpha[next])`` into occupation probabilities of every move: those are the
gradients. No autograd graph is ever built through the loop.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

_NEG_INF = float("-inf")


class _GatherLayout:
    """Maps px/py into the skewed step layout with flat gather indices; handles any boundary, including
    lattices that start at (s_begin, t_begin) != (0, 0) (each is shifted so that it starts at (0, 0))."""

    def __init__(self, B: int, S: int, T: int, regular: bool, boundary: Optional[Tensor], device: torch.device):
        T1 = T + 1 if regular else T
        if boundary is None:
            s_beg = torch.zeros(B, dtype=torch.int64, device=device)
            t_beg = torch.zeros_like(s_beg)
            s_len = torch.full_like(s_beg, S)
            t_len = torch.full_like(s_beg, T)
        else:
            s_beg, t_beg, s_end, t_end = boundary.to(device=device, dtype=torch.int64).unbind(1)
            s_len, t_len = s_end - s_beg, t_end - t_beg
        self.end_step = t_len if not regular else s_len + t_len  # (B,) step on which each lattice ends
        self.end_s = s_len  # (B,) local s of the final cell
        self.num_steps = int(self.end_step.max().item()) if B > 0 else 0
        N, W = self.num_steps, S + 1
        d = torch.arange(N, device=device).view(1, N, 1)
        j = torch.arange(W, device=device).view(1, 1, W)
        sl, tl = s_len.view(B, 1, 1), t_len.view(B, 1, 1)
        sb, tb = s_beg.view(B, 1, 1), t_beg.view(B, 1, 1)
        # Horizontal move (blank / y) on step d leaving cell j: local source (j, t_y).
        t_y = d.expand(1, N, W) if not regular else d - j
        ok_y = (t_y >= 0) & (t_y < tl) & (j <= sl)
        self.idx_py = torch.where(ok_y, (j + sb) * T + (t_y + tb), (S + 1) * T).view(B, N * W)
        # Symbol move (x) on step d arriving in cell j: local source (j-1, t_x).
        t_x = d.expand(1, N, W) if not regular else d - j + 1
        ok_x = (j >= 1) & (j <= sl) & (t_x >= 0) & ((t_x <= tl) if regular else (t_x < tl))
        self.idx_px = torch.where(ok_x, (j - 1 + sb) * T1 + (t_x + tb), S * T1).view(B, N * W)
        self.shape = (B, S, T, T1, N, W)

    def skew(self, px: Tensor, py: Tensor) -> Tuple[Tensor, Tensor]:
        """(B,N,W+1) px (last column -inf, so a shifted view is free) and (B,N,W) py in step layout."""
        B, S, T, T1, N, W = self.shape
        pad = px.new_full((B, 1), _NEG_INF)
        pxs = torch.cat((px.reshape(B, S * T1), pad), 1).gather(1, self.idx_px).view(B, N, W)
        pxs = torch.cat((pxs, px.new_full((B, N, 1), _NEG_INF)), 2)
        pys = torch.cat((py.reshape(B, (S + 1) * T), pad), 1).gather(1, self.idx_py).view(B, N, W)
        return pxs, pys

    def unskew(self, gx: Tensor, gy: Tensor) -> Tuple[Tensor, Tensor]:
        """Scatter step-layout gradients back to px (B,S,T1) and py (B,S+1,T); padding slots are dropped."""
        B, S, T, T1, N, W = self.shape
        px_grad = gx.new_zeros(B, S * T1 + 1).scatter_(1, self.idx_px, gx.reshape(B, N * W))
        py_grad = gy.new_zeros(B, (S + 1) * T + 1).scatter_(1, self.idx_py, gy.reshape(B, N * W))
        return px_grad[:, :-1].view(B, S, T1), py_grad[:, :-1].view(B, S + 1, T)


class _StridedLayout:
    """The same step layout for lattices that all start at (0, 0) (every RNN-T loss), built without index
    tensors: px/py are copied into a -inf padded (B, S+1, L) buffer, in which step d, cell j sits at
    ``offset + d + j * (L - k)`` (k = 1 walks anti-diagonals, k = 0 columns), so one as_strided copy skews it.
    Cells outside each utterance's box are -inf in the buffer. About 5x cheaper than the gathers."""

    def __init__(self, B: int, S: int, T: int, regular: bool, boundary: Optional[Tensor], device: torch.device):
        self.regular = regular
        T1 = T + 1 if regular else T
        if boundary is None:
            self.s_len = torch.full((B,), S, dtype=torch.int64, device=device)
            self.t_len = torch.full((B,), T, dtype=torch.int64, device=device)
        else:
            self.s_len, self.t_len = boundary[:, 2].to(device), boundary[:, 3].to(device)
        self.has_boundary = boundary is not None
        self.end_step = self.t_len if not regular else self.s_len + self.t_len
        self.end_s = self.s_len
        self.num_steps = int(self.end_step.max().item()) if B > 0 else 0
        N, W = self.num_steps, S + 1
        self.pad = W  # left padding: an anti-diagonal reaches back to column -S
        self.L = N + W + 1
        self.shape = (B, S, T, T1, N, W)

    def _view(self, buf: Tensor, x_move: bool) -> Tensor:
        B, S, T, T1, N, W = self.shape
        k = 1 if self.regular else 0
        offset = self.pad + (1 if (self.regular and x_move) else 0)  # regular x into (j, d-j) is from (j-1, d-j+1)
        return buf.as_strided((B, N, W), (W * self.L, 1, self.L - k), buf.storage_offset() + offset)

    def _buffer(self, src: Tensor, x_move: bool) -> Tensor:
        """src (B, rows, cols) into a -inf buffer (B, W, L); px rows go one down (row j holds moves into j)."""
        B, S, T, T1, N, W = self.shape
        buf = src.new_full((B, W, self.L), _NEG_INF)
        first = 1 if x_move else 0
        buf[:, first: first + src.shape[1], self.pad: self.pad + src.shape[2]] = src
        if self.has_boundary:
            j = torch.arange(W, device=src.device).view(1, W, 1)
            t = torch.arange(self.L, device=src.device).view(1, 1, self.L) - self.pad
            sl, tl = self.s_len.view(B, 1, 1), self.t_len.view(B, 1, 1)
            t_bad = (t > tl) if (x_move and self.regular) else (t >= tl)
            buf.masked_fill_((j > sl) | t_bad, _NEG_INF)
        return buf

    def skew(self, px: Tensor, py: Tensor) -> Tuple[Tensor, Tensor]:
        B, S, T, T1, N, W = self.shape
        pxs = px.new_full((B, N, W + 1), _NEG_INF)
        pxs[:, :, :W] = self._view(self._buffer(px, True), True)
        pys = self._view(self._buffer(py, False), False).contiguous()
        return pxs, pys

    def unskew(self, gx: Tensor, gy: Tensor) -> Tuple[Tensor, Tensor]:
        B, S, T, T1, N, W = self.shape
        out = []
        for g, x_move, rows, cols in ((gx, True, S, T1), (gy, False, S + 1, T)):
            buf = g.new_zeros(B, W, self.L)
            self._view(buf, x_move).copy_(g)  # each (d, j) has its own slot: no overlap
            first = 1 if x_move else 0
            out.append(buf[:, first: first + rows, self.pad: self.pad + cols].contiguous())
        return out[0], out[1]


def _make_layout(B: int, S: int, T: int, regular: bool, boundary: Optional[Tensor], device: torch.device):
    if boundary is None or not bool((boundary[:, :2] != 0).any()):
        return _StridedLayout(B, S, T, regular, boundary, device)
    return _GatherLayout(B, S, T, regular, boundary, device)


def _forward_sweep(pxs: Tensor, pys: Tensor) -> Tensor:
    """alpha as (B, N+1, W+1): alpha at step d, cell j lives in column j+1 (column 0 is a -inf pad)."""
    B, N, W = pys.shape
    alpha = pys.new_full((B, N + 1, W + 1), _NEG_INF)
    alpha[:, 0, 1] = 0.0
    for d in range(N):
        prev = alpha[:, d]
        torch.logaddexp(prev[:, 1:] + pys[:, d], prev[:, :-1] + pxs[:, d, :W], out=alpha[:, d + 1, 1:])
    return alpha


def _occupation_sweep(alpha: Tensor, pxs: Tensor, pys: Tensor, end_step: Tensor, end_s: Tensor):
    """Occupation probabilities of every move, (B,N,W) for x (arriving in cell j) and y (leaving cell j).

    Works backwards in probability space, like a beta sweep but on local ratios: the posterior of each
    move into a cell, exp(alpha[prev] + weight - alpha[cell]), is a number in [0, 1] whose float32 error does
    not grow with the lattice size (exp(alpha + weight + beta - total) loses ~|alpha| * eps). Then
    occupation(move) = occupation(cell it enters) * posterior, and occupation(cell) = sum over its moves out.
    """
    B, N, W = pys.shape
    nxt = alpha[:, 1:, 1:]  # alpha of the cell each move arrives in, (B,N,W)
    nxt = torch.where(torch.isfinite(nxt), nxt, torch.zeros_like(nxt))  # unreachable cells: posterior 0 below
    q_x = (alpha[:, :N, :W] + pxs[:, :, :W] - nxt).exp_()
    # The two posteriors of a cell sum to 1: taking one as the complement keeps the sweep conserving
    # probability exactly, as k2's C++ does (exp'ing both independently drifts by ~|alpha| * eps per step).
    y_impossible = torch.isneginf(alpha[:, :N, 1:] + pys)
    q_y = torch.where(y_impossible, torch.zeros_like(q_x), 1.0 - q_x)
    gamma = pys.new_zeros(B, N + 1, W + 1)  # occupation of step d, cell j in column j (column W: 0 pad)
    seeds: Dict[int, List[int]] = {}
    for b, d in enumerate(end_step.tolist()):
        seeds.setdefault(d, []).append(b)
    end_s_list = end_s.tolist()

    def seed(d: int) -> None:
        # A lattice's final cell has no moves out inside its box: it is occupied by every path.
        for b in seeds.get(d, ()):
            gamma[b, d, end_s_list[b]] = 1.0

    seed(N)
    q_x_out = torch.cat((q_x[:, :, 1:], q_x.new_zeros(B, N, 1)), dim=2)  # x move leaving cell j lands in j+1
    for d in range(N - 1, -1, -1):
        g_next = gamma[:, d + 1]
        out = gamma[:, d, :W]
        torch.mul(g_next[:, :W], q_y[:, d], out=out)
        out.addcmul_(g_next[:, 1:], q_x_out[:, d])
        seed(d)
    g_arrive = gamma[:, 1:, :W]
    return q_x.mul_(g_arrive), q_y.mul_(g_arrive)


def _recursion(px: Tensor, py: Tensor, boundary: Optional[Tensor], need_grad: bool):
    """Scores (B,) and, if asked, d scores / d (px, py), all without autograd."""
    B, S, T1 = px.shape
    T = py.shape[-1]
    layout = _make_layout(B, S, T, T1 == T + 1, boundary, px.device)
    pxs, pys = layout.skew(px, py)
    alpha = _forward_sweep(pxs, pys)
    b_idx = torch.arange(B, device=px.device)
    scores = alpha[b_idx, layout.end_step, layout.end_s + 1]
    if not need_grad:
        return scores, None, None
    gx, gy = _occupation_sweep(alpha, pxs, pys, layout.end_step, layout.end_s)
    # Impossible lattices (score -inf) get a zero gradient.
    dead = ~torch.isfinite(scores)
    if bool(dead.any()):
        gx[dead] = 0.0
        gy[dead] = 0.0
    px_grad, py_grad = layout.unskew(gx, gy)
    return scores, px_grad, py_grad


class _ApplyGrads(torch.autograd.Function):
    """Attaches precomputed occupation probabilities as the gradient of the scores."""

    @staticmethod
    def forward(ctx, px: Tensor, py: Tensor, scores: Tensor, px_grad: Tensor, py_grad: Tensor) -> Tensor:
        ctx.save_for_backward(px_grad, py_grad)
        return scores.clone()

    @staticmethod
    def backward(ctx, score_grad: Tensor):
        px_grad, py_grad = ctx.saved_tensors
        g = score_grad.view(-1, 1, 1)
        return px_grad * g, py_grad * g, None, None, None


def _check(px: Tensor, py: Tensor, boundary: Optional[Tensor]) -> None:
    if px.ndim != 3 or py.ndim != 3:
        raise ValueError(f"px and py must be 3-D, got {tuple(px.shape)} and {tuple(py.shape)}")
    B, S, T1 = px.shape
    T = py.shape[-1]
    if T1 not in (T, T + 1) or tuple(py.shape) != (B, S + 1, T):
        raise ValueError(f"want px (B,S,T+1) or (B,S,T) and py (B,S+1,T); got {tuple(px.shape)}, {tuple(py.shape)}")
    if px.dtype != py.dtype:
        raise ValueError(f"px and py dtypes differ: {px.dtype} vs {py.dtype}")
    if boundary is not None:
        if tuple(boundary.shape) != (B, 4):
            raise ValueError(f"boundary must be (B, 4) = ({B}, 4), got {tuple(boundary.shape)}")
        sb, tb, se, te = boundary.to("cpu", torch.int64).unbind(1)
        if not ((0 <= sb) & (sb <= se) & (se <= S) & (0 <= tb) & (tb <= te) & (te <= T)).all():
            raise ValueError(f"boundary rows must satisfy 0<=s_begin<=s_end<={S}, 0<=t_begin<=t_end<={T}")


def mutual_information_recursion(
    px: Tensor,
    py: Tensor,
    boundary: Optional[Tensor] = None,
    return_grad: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, Tensor]]]:
    """Log-sum over all monotonic paths, per utterance (see the module docstring for the recursion).

    Returns ``scores`` (B,), or ``(scores, (px_grad, py_grad))`` with ``return_grad=True``, where the
    grads are d scores.sum() / d px, d py (occupation probabilities), as k2 returns them.
    float16/bfloat16 inputs are computed in float32; the scores come back in float32.
    """
    _check(px, py, boundary)
    if px.dtype in (torch.float16, torch.bfloat16):
        px, py = px.float(), py.float()
    need_grad = return_grad or (torch.is_grad_enabled() and (px.requires_grad or py.requires_grad))
    with torch.no_grad():
        scores, px_grad, py_grad = _recursion(px.detach(), py.detach(), boundary, need_grad)
    if need_grad and torch.is_grad_enabled() and (px.requires_grad or py.requires_grad):
        scores = _ApplyGrads.apply(px, py, scores, px_grad, py_grad)
    return (scores, (px_grad, py_grad)) if return_grad else scores
