"""Building blocks of the Zipformer2 encoder, in plain PyTorch (no k2).

What is here, and why:
- ``swoosh_l`` / ``swoosh_r``: the Zipformer activations. ``SwooshL`` / ``SwooshR`` modules use a custom
  autograd function that keeps only a uint8-quantized derivative for backward (1 byte per element instead
  of the 4-byte input), since the activations sit on wide tensors.
- ``ActivationDropoutAndLinear``: activation + dropout + linear that stores only the (narrower) input of the
  activation and recomputes the activation in backward, so the wide hidden output is never kept.
- ``BiasNorm``: LayerNorm replacement: divide by the RMS of ``x - bias`` (the bias is used only inside the
  RMS, so one large constant channel cannot dominate the norm), times a learned scalar ``exp(log_scale)``.
- ``ScheduledFloat``: a float that follows a piecewise-linear schedule of the training batch count
  (dropout and layer-skip rates); ``set_batch_count(model, n)`` updates every one in a model.
- ``limit_param_value``: keeps a parameter inside a range by steering its gradient, not by clamping its
  value (a clamp would stop the gradient dead at the bound, and a value initialised outside the range would
  never move).
- ``Balancer`` and ``Whiten``: optional gradient-only regularisers (identity in forward), off by default.
"""
from __future__ import annotations

import random
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Schedules


class ScheduledFloat(nn.Module):
    """A float whose value is a piecewise-linear function of the training batch count.

    It is a Module (with no parameters) only so that ``model.modules()`` finds it and
    ``set_batch_count`` can update it. Outside training, or before any batch count is set,
    ``float()`` gives ``default``.
    """

    def __init__(self, *points: Tuple[float, float], default: float = 0.0):
        super().__init__()
        if not points:
            raise ValueError("ScheduledFloat needs at least one (batch_count, value) point")
        xs = [float(p[0]) for p in points]
        if xs != sorted(xs):
            raise ValueError(f"ScheduledFloat points must be sorted by batch count, got {points}")
        self.points = [(float(x), float(y)) for x, y in points]
        self.default = float(default)
        self.batch_count: Optional[float] = None

    def value_at(self, batch_count: float) -> float:
        pts = self.points
        if batch_count <= pts[0][0]:
            return pts[0][1]
        if batch_count >= pts[-1][0]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            if x0 <= batch_count <= x1:
                return y0 + (y1 - y0) * (batch_count - x0) / (x1 - x0) if x1 > x0 else y1
        return pts[-1][1]  # unreachable

    def __float__(self) -> float:
        if self.batch_count is None or not self.training:
            return self.default
        return self.value_at(self.batch_count)

    def extra_repr(self) -> str:
        return f"points={self.points}, default={self.default}, batch_count={self.batch_count}"


FloatLike = Union[float, ScheduledFloat]


def set_batch_count(model: nn.Module, batch_count: float) -> None:
    """Tell every ScheduledFloat in ``model`` the current training batch index."""
    for m in model.modules():
        if isinstance(m, ScheduledFloat):
            m.batch_count = float(batch_count)


# ---------------------------------------------------------------------------------------------
# Range limits on parameters


class _LimitParamValue(torch.autograd.Function):
    """Identity in forward; in backward, a gradient that would push an out-of-range element further out
    has its sign flipped, so the optimizer walks it back into ``[lo, hi]``."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # a descent step moves x by -grad: below lo a positive grad pushes it further down, above hi a negative one
        away = ((x < ctx.lo) & (grad > 0)) | ((x > ctx.hi) & (grad < 0))
        return torch.where(away, -grad, grad), None, None


def limit_param_value(x: Tensor, lo: float, hi: float, training: bool = True) -> Tensor:
    """``x`` unchanged in value; in training its gradient is steered to keep it in ``[lo, hi]``."""
    if lo > hi:
        raise ValueError(f"limit_param_value: lo={lo} > hi={hi}")
    if not training or not x.requires_grad:
        return x
    return _LimitParamValue.apply(x, float(lo), float(hi))


# ---------------------------------------------------------------------------------------------
# Activations

# The derivatives of both Swoosh functions lie in (-0.08, 0.92); quantize them on this range.
_D_FLOOR = -0.08
_D_CEIL = 0.925
_D_STEP = (_D_CEIL - _D_FLOOR) / 255.0


def _softplus_shifted(x: Tensor, shift: float) -> Tensor:
    # log(1 + e^(x - shift)), stable for large x (softplus switches to the identity past the threshold)
    return F.softplus(x - shift, threshold=15.0)


def swoosh_l(x: Tensor) -> Tensor:
    """SwooshL(x) = log(1 + e^(x-4)) - 0.08 x - 0.035."""
    y = _softplus_shifted(x, 4.0)
    if y.requires_grad:
        return y - 0.08 * x - 0.035
    return y.add_(x, alpha=-0.08).sub_(0.035)  # in place: two fewer passes over wide tensors


def swoosh_r(x: Tensor) -> Tensor:
    """SwooshR(x) = log(1 + e^(x-1)) - 0.08 x - 0.313261687 (so that SwooshR(0) = 0)."""
    y = _softplus_shifted(x, 1.0)
    if y.requires_grad:
        return y - 0.08 * x - 0.313261687
    return y.add_(x, alpha=-0.08).sub_(0.313261687)


def swoosh_l_deriv(x: Tensor) -> Tensor:
    return torch.sigmoid(x - 4.0).sub_(0.08)


def swoosh_r_deriv(x: Tensor) -> Tensor:
    return torch.sigmoid(x - 1.0).sub_(0.08)


_SWOOSH = {"SwooshL": (swoosh_l, swoosh_l_deriv, 4.0, 0.035),
           "SwooshR": (swoosh_r, swoosh_r_deriv, 1.0, 0.313261687)}


class _SwooshQuantizedFunction(torch.autograd.Function):
    """y = swoosh(x); saves only the derivative, quantized to uint8 on [-0.08, 0.925], for backward.

    The derivative is sigmoid(x - shift) - 0.08 = 0.92 - exp(-softplus(x - shift)), so it comes from
    the softplus already computed for y. Gradient error: at most half a step (about 0.002) times the
    upstream gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kind: str) -> Tensor:
        _, _, shift, const = _SWOOSH[kind]
        xf = x.detach().float()
        sp = _softplus_shifted(xf, shift)
        # (d - floor) / step with d + 0.08 = 1 - exp(-sp)
        q = torch.exp(-sp).mul_(-1.0 / _D_STEP).add_(1.0 / _D_STEP).round_().clamp_(0, 255).to(torch.uint8)
        ctx.save_for_backward(q)
        return sp.add_(xf, alpha=-0.08).sub_(const).to(x.dtype)

    @staticmethod
    def backward(ctx, y_grad: Tensor):
        (q,) = ctx.saved_tensors
        d = q.to(y_grad.dtype).mul_(_D_STEP).add_(_D_FLOOR)
        return y_grad * d, None


class SwooshL(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return swoosh_l(x)
        return _SwooshQuantizedFunction.apply(x, "SwooshL")


class SwooshR(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return swoosh_r(x)
        return _SwooshQuantizedFunction.apply(x, "SwooshR")


class _ActivationDropoutLinearFunction(torch.autograd.Function):
    """linear(swoosh(x) * mask, W, b), storing x (not the activation output) for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str,
                mask: Optional[Tensor]) -> Tensor:
        fn = _SWOOSH[kind][0]
        y = fn(x)
        if mask is not None:
            y = y * mask
        ctx.kind = kind
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mask)
        return F.linear(y, weight, bias)

    @staticmethod
    def backward(ctx, out_grad: Tensor):
        x, weight, mask = ctx.saved_tensors
        fn, deriv = _SWOOSH[ctx.kind][:2]
        y = fn(x)
        if mask is not None:
            y = y * mask
        # Under autocast the forward matmul ran in a lower precision and out_grad comes in that dtype:
        # do the matmuls in it too, and hand back gradients in the dtypes of the inputs.
        dt = out_grad.dtype
        g2 = out_grad.reshape(-1, out_grad.shape[-1])
        weight_grad = g2.t().matmul(y.reshape(-1, y.shape[-1]).to(dt)).to(weight.dtype)
        bias_grad = g2.sum(0).to(weight.dtype) if ctx.has_bias else None
        x_grad = out_grad.matmul(weight.to(dt)).to(x.dtype) * deriv(x)
        if mask is not None:
            x_grad = x_grad * mask
        return x_grad, weight_grad, bias_grad, None, None


class ActivationDropoutAndLinear(nn.Module):
    """SwooshL/SwooshR, then dropout (mask shared along ``dropout_shared_dim``), then a linear layer.

    Equivalent to ``nn.Sequential(Swoosh(), Dropout(p), Linear(...))`` but memory-light in training.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True,
                 activation: str = "SwooshL", dropout_p: FloatLike = 0.0,
                 dropout_shared_dim: Optional[int] = -1, initial_scale: float = 1.0):
        super().__init__()
        if activation not in _SWOOSH:
            raise ValueError(f"activation must be one of {list(_SWOOSH)}, got {activation!r}")
        lin = ScaledLinear(in_channels, out_channels, bias=bias, initial_scale=initial_scale)
        self.weight = lin.weight
        self.bias = lin.bias
        self.activation = activation
        self.dropout_p = dropout_p
        self.dropout_shared_dim = dropout_shared_dim

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not torch.is_grad_enabled():
            return F.linear(_SWOOSH[self.activation][0](x), self.weight, self.bias)
        p = float(self.dropout_p)
        mask = None
        if p > 0.0:
            shape = list(x.shape)
            if self.dropout_shared_dim is not None:
                shape[self.dropout_shared_dim] = 1
            mask = (torch.rand(shape, device=x.device) > p).to(x.dtype) * (1.0 / (1.0 - p))
        return _ActivationDropoutLinearFunction.apply(x, self.weight, self.bias, self.activation, mask)


# ---------------------------------------------------------------------------------------------
# Linear layers with a chosen initial scale, normalisation, dropout


def ScaledLinear(*args, initial_scale: float = 1.0, **kwargs) -> nn.Linear:
    """nn.Linear whose initial weights (and bias range) are scaled by ``initial_scale``.

    Small initial scales on output projections make freshly initialised residual branches start
    near zero, which is what lets Zipformer train without warmup tricks.
    """
    lin = nn.Linear(*args, **kwargs)
    with torch.no_grad():
        lin.weight.mul_(initial_scale)
        if lin.bias is not None:
            nn.init.uniform_(lin.bias, -0.1 * initial_scale, 0.1 * initial_scale)
    return lin


def ScaledConv2d(*args, initial_scale: float = 1.0, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(*args, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(initial_scale)
        if conv.bias is not None:
            nn.init.uniform_(conv.bias, -0.1 * initial_scale, 0.1 * initial_scale)
    return conv


class BiasNorm(nn.Module):
    """y = x / RMS(x - bias) * exp(log_scale), over ``channel_dim``.

    Unlike LayerNorm, the output is not re-centred: the bias only enters the RMS. ``log_scale`` is
    kept in [log_scale_min, log_scale_max] in training by ``limit_param_value`` (its gradient, not its value).
    """

    def __init__(self, num_channels: int, channel_dim: int = -1, log_scale: float = 1.0,
                 log_scale_min: float = -1.5, log_scale_max: float = 1.5):
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))
        self.bias = nn.Parameter(torch.empty(num_channels).normal_(mean=0.0, std=1e-4))
        self.log_scale_min = log_scale_min
        self.log_scale_max = log_scale_max

    def forward(self, x: Tensor) -> Tensor:
        cdim = self.channel_dim % x.ndim
        if x.shape[cdim] != self.num_channels:
            raise ValueError(f"BiasNorm expected {self.num_channels} channels on dim {cdim}, got {tuple(x.shape)}")
        bias = self.bias.reshape([-1] + [1] * (x.ndim - cdim - 1))
        log_scale = limit_param_value(self.log_scale, self.log_scale_min, self.log_scale_max, self.training)
        scales = torch.mean((x - bias) ** 2, dim=cdim, keepdim=True).add(1e-20).rsqrt() * log_scale.exp()
        return x * scales


class SharedDropout(nn.Module):
    """Dropout whose mask is shared along one dimension (e.g. time), with a schedulable rate."""

    def __init__(self, p: FloatLike, shared_dim: Optional[int] = None):
        super().__init__()
        self.p = p
        self.shared_dim = shared_dim

    def forward(self, x: Tensor) -> Tensor:
        p = float(self.p)
        if not self.training or p == 0.0:
            return x
        if self.shared_dim is None:
            return F.dropout(x, p, training=True)
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        mask = (torch.rand(shape, device=x.device) > p).to(x.dtype) * (1.0 / (1.0 - p))
        return x * mask


def convert_num_channels(x: Tensor, num_channels: int) -> Tensor:
    """Truncate, or zero-pad, the last dimension of ``x`` to ``num_channels``."""
    c = x.shape[-1]
    if num_channels <= c:
        return x[..., :num_channels]
    return F.pad(x, (0, num_channels - c))


# ---------------------------------------------------------------------------------------------
# Optional regularisers: identity in forward, they only add a small term to the gradient.


class _BalancerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, channel_dim: int, min_positive: float, max_positive: float,
                min_abs: float, max_abs: float, grad_scale: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.cfg = (channel_dim, min_positive, max_positive, min_abs, max_abs, grad_scale)
        return x

    @staticmethod
    def backward(ctx, x_grad: Tensor):
        (x,) = ctx.saved_tensors
        channel_dim, min_pos, max_pos, min_abs, max_abs, grad_scale = ctx.cfg
        with torch.enable_grad():
            xd = x.detach().float().requires_grad_(True)
            dims = [d for d in range(x.ndim) if d != channel_dim]
            # smooth proxies of the proportion of positive values and of the mean absolute value
            pos = torch.sigmoid(xd * 4.0).mean(dim=dims)
            mabs = xd.abs().mean(dim=dims)
            penalty = (F.relu(min_pos - pos) + F.relu(pos - max_pos)
                       + F.relu(min_abs - mabs) / max(min_abs, 1e-3)
                       + F.relu(mabs - max_abs) / max_abs).sum()
            (pen_grad,) = torch.autograd.grad(penalty, xd)
        # push with a strength proportional to the size of the real gradient, only in the sign direction
        scale = grad_scale * x_grad.abs().mean()
        extra = pen_grad.sign() * scale
        return x_grad + extra.to(x_grad.dtype), None, None, None, None, None, None


class Balancer(nn.Module):
    """Keeps per-channel statistics in a range by nudging the gradient (forward is the identity).

    On a random ``prob`` fraction of training calls, channels whose proportion of positive values lies
    outside [min_positive, max_positive], or whose mean |x| lies outside [min_abs, max_abs], get an extra
    gradient (``grad_scale`` times the mean |gradient|) pushing them back in.
    """

    def __init__(self, num_channels: int, channel_dim: int = -1, min_positive: FloatLike = 0.05,
                 max_positive: FloatLike = 0.95, min_abs: FloatLike = 0.2, max_abs: FloatLike = 100.0,
                 grad_scale: float = 0.04, prob: float = 0.25):
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.min_positive, self.max_positive = min_positive, max_positive
        self.min_abs, self.max_abs = min_abs, max_abs
        self.grad_scale = grad_scale
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not x.requires_grad or random.random() >= self.prob:
            return x
        return _BalancerFunction.apply(x, self.channel_dim % x.ndim, float(self.min_positive),
                                       float(self.max_positive), float(self.min_abs),
                                       float(self.max_abs), self.grad_scale)


def whitening_metric(x: Tensor, num_groups: int) -> Tensor:
    """>= 1; equals 1 when the covariance of each channel group is a multiple of the identity."""
    x = x.reshape(-1, x.shape[-1]).float()
    n, c = x.shape
    x = x.reshape(n, num_groups, c // num_groups).transpose(0, 1)  # (G, N, C/G)
    x = x - x.mean(dim=1, keepdim=True)
    cov = x.transpose(1, 2).matmul(x)  # (G, C/G, C/G)
    d = cov.shape[-1]
    mean_diag = cov.diagonal(dim1=1, dim2=2).mean(dim=-1)
    mean_sq = (cov ** 2).sum(dim=(1, 2)) / d
    return (mean_sq / (mean_diag ** 2 + 1e-20)).mean()


class _WhitenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, num_groups: int, limit: float, grad_scale: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.cfg = (num_groups, limit, grad_scale)
        return x

    @staticmethod
    def backward(ctx, x_grad: Tensor):
        (x,) = ctx.saved_tensors
        num_groups, limit, grad_scale = ctx.cfg
        with torch.enable_grad():
            xd = x.detach().float().requires_grad_(True)
            metric = whitening_metric(xd, num_groups)
            if metric.item() <= limit:
                return x_grad, None, None, None
            (m_grad,) = torch.autograd.grad(metric, xd)
        m_grad = m_grad * (grad_scale * x_grad.norm() / (m_grad.norm() + 1e-20))
        return x_grad + m_grad.to(x_grad.dtype), None, None, None


class Whiten(nn.Module):
    """Discourages a few directions from dominating the features (identity in forward).

    On a ``prob`` fraction of training calls, if ``whitening_metric`` exceeds ``whitening_limit``, adds
    the gradient of the metric, scaled to ``grad_scale`` times the norm of the incoming gradient.
    """

    def __init__(self, num_groups: int = 1, whitening_limit: FloatLike = 5.0, prob: float = 0.1,
                 grad_scale: float = 0.01):
        super().__init__()
        self.num_groups = num_groups
        self.whitening_limit = whitening_limit
        self.prob = prob
        self.grad_scale = grad_scale

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not x.requires_grad or random.random() >= self.prob:
            return x
        if x.shape[-1] % self.num_groups != 0:
            raise ValueError(f"Whiten: {x.shape[-1]} channels do not split into {self.num_groups} groups")
        return _WhitenFunction.apply(x, self.num_groups, float(self.whitening_limit), self.grad_scale)


def maybe(enabled: bool, module_fn) -> nn.Module:
    """``module_fn()`` if enabled else an identity: regularisers cost nothing when switched off."""
    return module_fn() if enabled else nn.Identity()


__all__ = [
    "ScheduledFloat", "FloatLike", "set_batch_count", "swoosh_l", "swoosh_r", "SwooshL", "SwooshR",
    "ActivationDropoutAndLinear", "ScaledLinear", "ScaledConv2d", "BiasNorm", "SharedDropout",
    "convert_num_channels", "Balancer", "Whiten", "whitening_metric", "maybe",
]
