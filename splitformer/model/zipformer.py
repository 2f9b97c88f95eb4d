"""Zipformer2 encoder (Yao et al., "Zipformer: A faster and better encoder for ASR", ICLR 2024).

Layout of the encoder, from the ~50 Hz front-end output:
- several stacks of ``Zipformer2EncoderLayer``; stack ``i`` runs at 50 / downsampling_factor[i] Hz, with
  its own width ``encoder_dim[i]``. A downsampled stack averages groups of frames with learned softmax
  weights, runs its layers, repeats each frame back to the full rate, and mixes its output with its input
  through a learned per-channel bypass scale.
- Between stacks, channels are truncated or zero-padded; the final output takes each channel from the
  latest stack that has it, and is downsampled x2 again (~25 Hz).

Inside a layer (all residual): FF1, non-linear attention, self-attention 1, conv 1, FF2, mid-layer bypass,
self-attention 2, conv 2, FF3, BiasNorm, layer bypass. Attention weights are computed once per layer
(relative-position multi-head) and reused by the non-linear attention and both self-attention passes.

Everything is time-major (T, B, C) inside; ``Zipformer2`` takes and returns batch-first tensors.
Padding is handled so that an utterance's output does not depend on what it is batched with:
attention masks padded keys, convolutions see zeros at padded frames, and downsampling pads each
utterance by repeating its own last frame.
"""
from __future__ import annotations

import functools
import math
import random
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from splitformer.model.chunking import (FULL, CausalChunks, Chunking, ChunkCausalDepthwiseConv1d, check_chunking,
                                        chunk_attn_mask)
from splitformer.model.scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    BiasNorm,
    FloatLike,
    ScaledLinear,
    ScheduledFloat,
    Whiten,
    convert_num_channels,
    limit_param_value,
    maybe,
)

IntOrTuple = Union[int, Sequence[int]]


def _padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len), True on padding."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


def _default_dropout() -> ScheduledFloat:
    return ScheduledFloat((0.0, 0.3), (20000.0, 0.1), default=0.1)


# ---------------------------------------------------------------------------------------------
# Positional encoding and attention


class CompactRelPositionalEncoding(nn.Module):
    """Embeddings of relative offsets -(T-1)..(T-1), returned as (1, 2T-1, pos_dim).

    The offset is first compressed logarithmically (so 1000 and 1001 look alike while 1 and 2 do not),
    then mapped into (-pi/2, pi/2) with atan, and finally expanded into cos/sin of multiples of that
    angle. The last channel is a constant 1 so the projection can learn a bias.
    """

    def __init__(self, pos_dim: int, dropout: FloatLike = 0.15, max_len: int = 1000,
                 length_factor: float = 1.0):
        super().__init__()
        if pos_dim % 2 != 0:
            raise ValueError(f"pos_dim must be even, got {pos_dim}")
        if length_factor < 1.0:
            raise ValueError(f"length_factor must be >= 1, got {length_factor}")
        self.pos_dim = pos_dim
        self.length_factor = length_factor
        self.dropout = dropout
        self._table: Optional[Tensor] = None  # (2L-1, pos_dim), offsets -(L-1)..(L-1)
        self._extend(max_len, torch.device("cpu"), torch.float32)

    def _extend(self, length: int, device: torch.device, dtype: torch.dtype) -> None:
        table = self._table
        if table is not None and table.shape[0] >= 2 * length - 1:
            if table.device != device or table.dtype != dtype:
                self._table = table.to(device=device, dtype=dtype)
            return
        offsets = torch.arange(-(length - 1), length, device=device, dtype=torch.float32).unsqueeze(1)
        c = self.pos_dim ** 0.5  # offsets up to ~sqrt(pos_dim) stay nearly linear
        compressed = c * offsets.sign() * ((offsets.abs() + c).log() - math.log(c))
        angle = torch.atan(compressed / (self.length_factor * self.pos_dim / (2.0 * math.pi)))
        freqs = torch.arange(1, self.pos_dim // 2 + 1, device=device, dtype=torch.float32)
        pe = torch.empty(offsets.shape[0], self.pos_dim, device=device, dtype=torch.float32)
        pe[:, 0::2] = torch.cos(angle * freqs)
        pe[:, 1::2] = torch.sin(angle * freqs)
        pe[:, -1] = 1.0
        self._table = pe.to(dtype)

    def forward(self, x: Tensor, left: int = 0) -> Tensor:
        """x: (T, B, C) (only its length, device and dtype are used) -> (1, 2T+left-1, pos_dim): the offsets
        key - query from -(T+left-1) to T-1, for T queries that follow ``left`` cached keys (streaming)."""
        t = x.shape[0]
        self._extend(t + left, x.device, x.dtype)
        mid = self._table.shape[0] // 2
        pos = self._table[mid - (t + left) + 1: mid + t].unsqueeze(0)
        p = float(self.dropout)
        if self.training and p > 0.0:
            pos = nn.functional.dropout(pos, p, training=True)
        return pos


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _rel_shift(pos_scores: Tensor) -> Tensor:
    """(..., T, T+K-1) scores against offsets -(K-1)..(T-1) -> (..., T, K) with [t, s] = offset s - (K-T) - t:
    the K keys are the T queries' own frames preceded by K-T cached ones (K = T offline)."""
    t = pos_scores.shape[-2]
    k = pos_scores.shape[-1] - t + 1
    if _exporting():
        # export-friendly form: an explicit gather of column (T-1) - t + s
        rows = torch.arange(t, device=pos_scores.device).unsqueeze(1)
        cols = torch.arange(k, device=pos_scores.device).unsqueeze(0)
        idx = (t - 1) - rows + cols
        return torch.gather(pos_scores, -1, idx.expand(pos_scores.shape[:-1] + (k,)))
    pos_scores = pos_scores.contiguous()
    st = pos_scores.stride()
    # a strided view: row t starts at column (T-1) - t, i.e. the row stride is one row minus one column
    return pos_scores.as_strided(
        pos_scores.shape[:-2] + (t, k),
        st[:-2] + (st[-2] - st[-1], st[-1]),
        storage_offset=pos_scores.storage_offset() + st[-1] * (t - 1),
    )


class RelPositionMultiheadAttentionWeights(nn.Module):
    """Attention weights (H, B, T, T) from content (q.k) plus relative-position (p.pos) scores.

    The query projection also yields a small per-head "position query" ``p`` (pos_head_dim) that is
    dotted with projected relative-position embeddings; keys at padded frames are masked.
    """

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int,
                 pos_head_dim: int, dropout: float = 0.0, pos_emb_skip_rate: Optional[FloatLike] = None,
                 use_balancers: bool = False, use_whiten: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.query_head_dim = query_head_dim
        self.pos_head_dim = pos_head_dim
        self.dropout = dropout
        self.pos_emb_skip_rate = (ScheduledFloat((0.0, 0.5), (4000.0, 0.0), default=0.0)
                                  if pos_emb_skip_rate is None else pos_emb_skip_rate)
        in_dim = (2 * query_head_dim + pos_head_dim) * num_heads
        self.in_proj = ScaledLinear(embed_dim, in_dim, bias=True, initial_scale=query_head_dim ** -0.25)
        self.balance_keys = maybe(use_balancers, lambda: Balancer(
            query_head_dim * num_heads, min_positive=0.4, max_positive=0.6, min_abs=0.0, max_abs=100.0,
            prob=0.025))
        self.whiten_keys = maybe(use_whiten, lambda: Whiten(num_groups=num_heads, whitening_limit=3.0,
                                                            prob=0.1, grad_scale=0.025))
        self.linear_pos = ScaledLinear(pos_dim, num_heads * pos_head_dim, bias=False, initial_scale=0.05)

    def forward(self, x: Tensor, pos_emb: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """x: (T, B, C); pos_emb: (1, 2T-1, pos_dim); key_padding_mask: (B, T) True=pad;
        attn_mask: (T, T) True=blocked. Returns (H, B, T, T)."""
        q, k, p = self._project(x)
        return self._weights(q, k, p, pos_emb, key_padding_mask, attn_mask)

    def streaming_forward(self, x: Tensor, pos_emb: Tensor, cached_key: Tensor, key_mask: Tensor
                          ) -> Tuple[Tensor, Tensor]:
        """One chunk. x: (T, B, C); cached_key: (L, B, H*dq), the keys of the L frames before it;
        pos_emb: (1, 2T+L-1, pos_dim); key_mask: (B, L+T) True where a key may not be read.
        Returns weights (H, B, T, L+T) and the next cached keys (the last L)."""
        q, k, p = self._project(x)
        keys = torch.cat([cached_key, k], dim=0)
        return self._weights(q, keys, p, pos_emb, key_mask, None), keys[keys.size(0) - cached_key.size(0):]

    def _project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(T, B, C) -> queries, keys (T, B, H*dq) and position queries (T, B, H*dp)."""
        h, dq = self.num_heads, self.query_head_dim
        proj = self.in_proj(x)
        k = self.whiten_keys(self.balance_keys(proj[..., h * dq: 2 * h * dq]))
        return proj[..., : h * dq], k, proj[..., 2 * h * dq:]

    def _weights(self, q: Tensor, k: Tensor, p: Tensor, pos_emb: Tensor, key_padding_mask: Optional[Tensor],
                 attn_mask: Optional[Tensor]) -> Tensor:
        """Softmax over K keys of T queries: q, p (T, B, .), k (K, B, .); pos_emb (1, T+K-1, pos_dim)."""
        t, b, _ = q.shape
        n = k.shape[0]
        h, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        q = q.reshape(t, b, h, dq).permute(2, 1, 0, 3)  # (H, B, T, dq)
        k = k.reshape(n, b, h, dq).permute(2, 1, 3, 0)  # (H, B, dq, K)
        scores = torch.matmul(q, k)

        if not self.training or random.random() >= float(self.pos_emb_skip_rate):
            p = p.reshape(t, b, h, dp).permute(2, 1, 0, 3)  # (H, B, T, dp)
            pos = self.linear_pos(pos_emb)  # (1, T+K-1, H*dp)
            pos = pos.reshape(-1, t + n - 1, h, dp).permute(2, 0, 3, 1)  # (H, 1, dp, T+K-1)
            scores = scores + _rel_shift(torch.matmul(p, pos))

        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, -1000.0)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], -1000.0)
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0.0:
            weights = nn.functional.dropout(weights, self.dropout, training=True)
        return weights


class SelfAttention(nn.Module):
    """Applies precomputed attention weights (H, B, T, T) to projected values."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int, use_whiten: bool = False):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim)
        self.out_proj = ScaledLinear(num_heads * value_head_dim, embed_dim, initial_scale=0.05)
        self.whiten = maybe(use_whiten, lambda: Whiten(whitening_limit=7.5, prob=0.1, grad_scale=0.01))

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        return self._attend(self.in_proj(x), attn_weights)

    def streaming_forward(self, x: Tensor, attn_weights: Tensor, cached_val: Tensor) -> Tuple[Tensor, Tensor]:
        """One chunk (T, B, C); cached_val: (L, B, H*dv), the values of the L frames before it."""
        v = torch.cat([cached_val, self.in_proj(x)], dim=0)
        return self._attend(v, attn_weights), v[v.size(0) - cached_val.size(0):]

    def _attend(self, v: Tensor, attn_weights: Tensor) -> Tensor:
        """Values (K, B, H*dv) weighted by (H, B, T, K) -> (T, B, C)."""
        h, b, t, n = attn_weights.shape
        v = v.reshape(n, b, h, -1).permute(2, 1, 0, 3)  # (H, B, K, dv)
        out = torch.matmul(attn_weights, v).permute(2, 1, 0, 3).reshape(t, b, -1)
        return self.whiten(self.out_proj(out))


class NonlinAttention(nn.Module):
    """Attention used like a convolution: (tanh(s) * x) is averaged over time with head-0 attention
    weights, then gated by y; s, x, y are three projections of the input."""

    def __init__(self, channels: int, hidden_channels: int, use_balancers: bool = False,
                 use_whiten: bool = False):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.in_proj = nn.Linear(channels, 3 * hidden_channels)
        self.balancer = maybe(use_balancers, lambda: Balancer(
            hidden_channels, min_positive=0.05, max_positive=0.95, min_abs=0.5, max_abs=5.0))
        self.out_proj = ScaledLinear(hidden_channels, channels, initial_scale=0.05)
        self.whiten1 = maybe(use_whiten, lambda: Whiten(whitening_limit=5.0, prob=0.1, grad_scale=0.01))
        self.whiten2 = maybe(use_whiten, lambda: Whiten(whitening_limit=5.0, prob=0.1, grad_scale=0.01))

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        """x: (T, B, C); attn_weights: (1, B, T, T)."""
        v, y = self._inputs(x)
        return self._attend(v, y, attn_weights)

    def streaming_forward(self, x: Tensor, attn_weights: Tensor, cached: Tensor) -> Tuple[Tensor, Tensor]:
        """One chunk (T, B, C); cached: (L, B, hidden), the gated values of the L frames before it."""
        v, y = self._inputs(x)
        v = torch.cat([cached, v], dim=0)
        return self._attend(v, y, attn_weights), v[v.size(0) - cached.size(0):]

    def _inputs(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        s, v, y = self.in_proj(x).chunk(3, dim=-1)
        return self.whiten1(v) * torch.tanh(self.balancer(s)), y

    def _attend(self, v: Tensor, y: Tensor, attn_weights: Tensor) -> Tensor:
        h, b, t, n = attn_weights.shape
        v = v.reshape(n, b, h, -1).permute(2, 1, 0, 3)
        v = torch.matmul(attn_weights, v).permute(2, 1, 0, 3).reshape(t, b, -1)
        return self.whiten2(self.out_proj(v * y))


class FeedforwardModule(nn.Module):
    """Linear -> SwooshL -> dropout (shared over time) -> linear."""

    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: FloatLike,
                 use_balancers: bool = False, use_whiten: bool = False):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, feedforward_dim)
        self.hidden_balancer = maybe(use_balancers, lambda: Balancer(
            feedforward_dim, min_positive=0.3, max_positive=1.0, min_abs=0.75, max_abs=5.0))
        self.out_proj = ActivationDropoutAndLinear(feedforward_dim, embed_dim, activation="SwooshL",
                                                   dropout_p=dropout, dropout_shared_dim=0,
                                                   initial_scale=0.1)
        self.out_whiten = maybe(use_whiten, lambda: Whiten(whitening_limit=7.5, prob=0.1, grad_scale=0.01))

    def forward(self, x: Tensor) -> Tensor:
        return self.out_whiten(self.out_proj(self.hidden_balancer(self.in_proj(x))))


class ConvolutionModule(nn.Module):
    """Sigmoid-gated linear unit, depthwise conv over time, SwooshR, linear.

    Padded frames are zeroed right before the depthwise conv, so they act like the conv's own
    zero padding and cannot leak into real frames.
    """

    def __init__(self, channels: int, kernel_size: int, use_balancers: bool = False,
                 use_whiten: bool = False, causal: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd, got {kernel_size}")
        self.in_proj = nn.Linear(channels, 2 * channels)
        self.balancer1 = maybe(use_balancers, lambda: Balancer(
            channels, min_positive=0.025, max_positive=1.0, min_abs=1.5, max_abs=10.0))
        self.causal = causal
        if causal:
            self.depthwise_conv = ChunkCausalDepthwiseConv1d(channels, kernel_size)
        else:
            self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                                            groups=channels)
        self.balancer2 = maybe(use_balancers, lambda: Balancer(
            channels, channel_dim=1, min_positive=0.05, max_positive=1.0, min_abs=0.5, max_abs=10.0))
        self.whiten = maybe(use_whiten, lambda: Whiten(whitening_limit=7.5, prob=0.1, grad_scale=0.01))
        self.out_proj = ActivationDropoutAndLinear(channels, channels, activation="SwooshR",
                                                   dropout_p=0.0, initial_scale=0.05)

    def _gated(self, x: Tensor, src_key_padding_mask: Optional[Tensor]) -> Tensor:
        """(T, B, C) -> the depthwise conv's (B, C, T) input, zero on masked frames."""
        x, s = self.in_proj(x).chunk(2, dim=-1)
        x = x * torch.sigmoid(self.balancer1(s))
        x = x.permute(1, 2, 0)  # (B, C, T)
        if src_key_padding_mask is not None:
            x = x.masked_fill(src_key_padding_mask[:, None, :], 0.0)
        return x

    def _output(self, x: Tensor) -> Tensor:
        x = self.balancer2(x).permute(2, 0, 1)  # (T, B, C)
        return self.out_proj(self.whiten(x))

    def forward(self, x: Tensor, src_key_padding_mask: Optional[Tensor] = None, chunk: int = FULL,
                absent: Optional[Tensor] = None) -> Tensor:
        """x: (T, B, C); src_key_padding_mask: (B, T), True on padding; chunk: the causal convolution's chunk
        size (ignored by a non-causal module); absent: (B, T) frames that other chunks read as zeros."""
        x = self._gated(x, src_key_padding_mask)
        x = self.depthwise_conv(x, chunk, absent) if self.causal else self.depthwise_conv(x)
        return self._output(x)

    def streaming_forward(self, x: Tensor, cache: Tensor, src_key_padding_mask: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tensor]:
        """One chunk (T, B, C) of a causal module, with the conv's cache (B, C, kernel // 2)."""
        x, cache = self.depthwise_conv.streaming_forward(self._gated(x, src_key_padding_mask), cache)
        return self._output(x), cache


class BypassModule(nn.Module):
    """out = src_orig + (src - src_orig) * scale, with a learned per-channel scale.

    In training the scale is kept in [scale_min, scale_max] by ``limit_param_value``: the value used is the
    parameter itself, and only its gradient is steered back into the range (icefall's behaviour; a clamp would
    freeze a scale initialised below scale_min until the schedule lowers the bound). With probability
    ``skip_rate`` a whole sequence skips the module (scale 0).
    """

    def __init__(self, embed_dim: int, skip_rate: FloatLike = 0.0, scale_min: Optional[FloatLike] = None,
                 scale_max: FloatLike = 1.0):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))
        self.skip_rate = skip_rate
        self.scale_min = (ScheduledFloat((0.0, 0.9), (20000.0, 0.2), default=0.2)
                          if scale_min is None else scale_min)
        self.scale_max = scale_max

    def forward(self, src_orig: Tensor, src: Tensor) -> Tensor:
        scale = self.bypass_scale
        if self.training:
            scale = limit_param_value(scale, float(self.scale_min), float(self.scale_max))
            rate = float(self.skip_rate)
            if rate > 0.0:
                keep = (torch.rand(src.shape[1], 1, device=src.device) > rate).to(src.dtype)
                scale = scale * keep  # (B, C), broadcasts over (T, B, C)
        # lerp needs one dtype; under autocast src may be bf16/fp16 while src_orig is float32.
        dt = torch.promote_types(src_orig.dtype, src.dtype)
        return torch.lerp(src_orig.to(dt), src.to(dt), scale.to(dt))  # src_orig + (src - src_orig) * scale


def _sequence_mask(x: Tensor, rate: float, training: bool) -> Optional[Tensor]:
    """(B, 1) 0/1 mask that drops whole sequences with probability ``rate`` (training only)."""
    if not training or rate <= 0.0:
        return None
    return (torch.rand(x.shape[1], 1, device=x.device) > rate).to(x.dtype)


def _apply(mask: Optional[Tensor], y: Tensor) -> Tensor:
    return y if mask is None else y * mask


# ---------------------------------------------------------------------------------------------
# The layer


class Zipformer2EncoderLayer(nn.Module):
    """One Zipformer2 layer; see the module docstring for the order of its parts.

    ``forward(src (T, B, C), pos_emb (1, 2T-1, pos_dim), src_key_padding_mask (B, T) True=pad,
    attn_mask (T, T) True=blocked, chunk) -> (T, B, C)``. ``causal=True`` makes its convolutions chunk-causal
    (``chunk`` is their chunk size; the attention's limits come in ``attn_mask``), and gives it
    ``streaming_forward``: one chunk at a time, with :meth:`init_cache`'s six tensors carried between chunks.
    """

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int,
                 pos_head_dim: int, value_head_dim: int, feedforward_dim: int,
                 dropout: Optional[FloatLike] = 0.1, cnn_module_kernel: int = 31,
                 use_balancers: bool = False, use_whiten: bool = False,
                 bypass_skip_rate: Optional[FloatLike] = None, causal: bool = False):
        super().__init__()
        if dropout is None:
            dropout = _default_dropout()
        self.embed_dim = embed_dim
        self.causal = causal
        # Rates that start high and decay to (nearly) zero, as functions of the training batch count.
        self.attention_skip_rate = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0), default=0.0)
        self.conv_skip_rate = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0), default=0.0)
        self.const_attention_rate = ScheduledFloat((0.0, 0.25), (4000.0, 0.025), default=0.0)
        self.ff2_skip_rate = ScheduledFloat((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0), default=0.0)
        self.ff3_skip_rate = ScheduledFloat((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0), default=0.0)

        self.bypass = BypassModule(embed_dim, skip_rate=(
            ScheduledFloat((0.0, 0.5), (4000.0, 0.02), default=0.0)
            if bypass_skip_rate is None else bypass_skip_rate))
        self.bypass_mid = BypassModule(embed_dim)

        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            embed_dim, pos_dim=pos_dim, num_heads=num_heads, query_head_dim=query_head_dim,
            pos_head_dim=pos_head_dim, use_balancers=use_balancers, use_whiten=use_whiten)
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim, use_whiten=use_whiten)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim, use_whiten=use_whiten)
        ff_kw = dict(dropout=dropout, use_balancers=use_balancers, use_whiten=use_whiten)
        self.feed_forward1 = FeedforwardModule(embed_dim, (feedforward_dim * 3) // 4, **ff_kw)
        self.feed_forward2 = FeedforwardModule(embed_dim, feedforward_dim, **ff_kw)
        self.feed_forward3 = FeedforwardModule(embed_dim, (feedforward_dim * 5) // 4, **ff_kw)
        self.nonlin_attention = NonlinAttention(embed_dim, 3 * embed_dim // 4,
                                                use_balancers=use_balancers, use_whiten=use_whiten)
        self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel, use_balancers, use_whiten, causal)
        self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel, use_balancers, use_whiten, causal)
        self.norm = BiasNorm(embed_dim)
        self.balancer1 = maybe(use_balancers, lambda: Balancer(
            embed_dim, min_positive=0.45, max_positive=0.55, min_abs=0.2, max_abs=4.0))
        self.balancer2 = maybe(use_balancers, lambda: Balancer(
            embed_dim, min_positive=0.45, max_positive=0.55, min_abs=0.1, max_abs=4.0))
        self.whiten = maybe(use_whiten, lambda: Whiten(whitening_limit=4.0, prob=0.1, grad_scale=0.01))

    def forward(self, src: Tensor, pos_emb: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, chunk: int = FULL, absent: Optional[Tensor] = None) -> Tensor:
        """``attn_mask``: (T, T), or (B, T, T) with per-chunk exits; ``absent``: (B, T) frames of chunks that did
        not reach this layer (other chunks read them as zeros in the convolutions)."""
        training = self.training
        src_orig = src
        attn_weights = self.self_attn_weights(src, pos_emb=pos_emb, key_padding_mask=src_key_padding_mask,
                                              attn_mask=attn_mask)
        src = src + self.feed_forward1(src)

        attn_drop = _sequence_mask(src, float(self.attention_skip_rate), training)
        head0 = attn_weights[0:1]
        if training and random.random() < float(self.const_attention_rate):
            # Uniform weights over the allowed keys: nudges the non-linear attention towards averaging.
            allowed = (head0 > 0.0).to(head0.dtype)
            head0 = allowed / allowed.sum(dim=-1, keepdim=True)
        src = src + _apply(attn_drop, self.nonlin_attention(src, head0))
        src = src + _apply(attn_drop, self.self_attn1(src, attn_weights))
        src = src + _apply(_sequence_mask(src, float(self.conv_skip_rate), training),
                           self.conv_module1(src, src_key_padding_mask, chunk, absent))
        src = src + _apply(_sequence_mask(src, float(self.ff2_skip_rate), training), self.feed_forward2(src))

        src = self.bypass_mid(src_orig, src)

        src = src + _apply(attn_drop, self.self_attn2(src, attn_weights))
        src = src + _apply(_sequence_mask(src, float(self.conv_skip_rate), training),
                           self.conv_module2(src, src_key_padding_mask, chunk, absent))
        src = src + _apply(_sequence_mask(src, float(self.ff3_skip_rate), training), self.feed_forward3(src))

        src = self.norm(self.balancer1(src))
        src = self.bypass(src_orig, src)
        return self.whiten(self.balancer2(src))

    def init_cache(self, batch: int, left: int, device: torch.device, dtype: torch.dtype = torch.float32
                   ) -> List[Tensor]:
        """Zeros for a stream that has heard nothing: keys (L, B, H*dq), non-linear attention values
        (L, B, 3C/4), values of both self-attentions (L, B, H*dv), and both convolutions' last inputs
        (B, C, kernel // 2); L = ``left`` frames at this layer's rate."""
        attn = self.self_attn_weights
        dv = self.self_attn1.in_proj.out_features
        half = self.conv_module1.depthwise_conv.half
        z = functools.partial(torch.zeros, device=device, dtype=dtype)
        return [z(left, batch, attn.num_heads * attn.query_head_dim),
                z(left, batch, self.nonlin_attention.hidden_channels),
                z(left, batch, dv), z(left, batch, dv),
                z(batch, self.embed_dim, half), z(batch, self.embed_dim, half)]

    def streaming_forward(self, src: Tensor, pos_emb: Tensor, cache: Sequence[Tensor], key_mask: Tensor,
                          src_key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """One chunk (T, B, C) after L cached frames (eval only).

        pos_emb: (1, 2T+L-1, pos_dim); key_mask: (B, L+T), True for keys that may not be read (slots a young
        stream has not filled, frames past its end); src_key_padding_mask: (B, T), the chunk's frames past
        the stream's end (zeroed before the convolutions). Returns the chunk's output and the next cache.
        The result equals ``forward`` over the whole utterance with the chunk mask, frame for frame."""
        if not self.causal:
            raise RuntimeError("streaming needs a causal layer (train with --causal true)")
        key, nonlin, val1, val2, conv1, conv2 = cache
        src_orig = src
        attn_weights, key = self.self_attn_weights.streaming_forward(src, pos_emb, key, key_mask)
        src = src + self.feed_forward1(src)
        out, nonlin = self.nonlin_attention.streaming_forward(src, attn_weights[0:1], nonlin)
        src = src + out
        out, val1 = self.self_attn1.streaming_forward(src, attn_weights, val1)
        src = src + out
        out, conv1 = self.conv_module1.streaming_forward(src, conv1, src_key_padding_mask)
        src = src + out
        src = src + self.feed_forward2(src)
        src = self.bypass_mid(src_orig, src)
        out, val2 = self.self_attn2.streaming_forward(src, attn_weights, val2)
        src = src + out
        out, conv2 = self.conv_module2.streaming_forward(src, conv2, src_key_padding_mask)
        src = src + out
        src = src + self.feed_forward3(src)
        src = self.bypass(src_orig, self.norm(src))
        return src, [key, nonlin, val1, val2, conv1, conv2]


# ---------------------------------------------------------------------------------------------
# Stacks


class Zipformer2Encoder(nn.Module):
    """A stack of ``num_layers`` copies of a layer, sharing one positional encoding.

    Each layer's whole-layer skip rate decays from ``initial_layerdrop_rate`` to ``final_layerdrop_rate``
    over its slice of [warmup_begin, warmup_end] (in batches), so lower layers warm up first.
    """

    def __init__(self, layer_kwargs: dict, num_layers: int, pos_dim: int, warmup_begin: float = 0.0,
                 warmup_end: float = 0.0, initial_layerdrop_rate: float = 0.5,
                 final_layerdrop_rate: float = 0.05):
        super().__init__()
        self.encoder_pos = CompactRelPositionalEncoding(pos_dim, dropout=0.15)
        self.num_layers = num_layers
        layers = []
        delta = (warmup_end - warmup_begin) / max(num_layers, 1)
        for i in range(num_layers):
            begin = warmup_begin + i * delta
            skip = ScheduledFloat((begin, initial_layerdrop_rate), (begin + delta, final_layerdrop_rate),
                                  default=0.0)
            layers.append(Zipformer2EncoderLayer(**layer_kwargs, bypass_skip_rate=skip))
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, feature_mask: Union[Tensor, float] = 1.0,
                src_key_padding_mask: Optional[Tensor] = None, chunking: Chunking = Chunking()) -> Tensor:
        """src: (T, B, C) at this stack's rate; ``chunking`` as this stack sees it."""
        pos_emb = self.encoder_pos(src)
        attn_mask = chunk_attn_mask(src.shape[0], chunking, src.device)
        out = src * feature_mask
        for layer in self.layers:
            out = layer(out, pos_emb, src_key_padding_mask=src_key_padding_mask, attn_mask=attn_mask,
                        chunk=chunking.chunk)
            out = out * feature_mask
        return out

    def init_cache(self, batch: int, left: int, device: torch.device, dtype: torch.dtype = torch.float32
                   ) -> List[List[Tensor]]:
        return [layer.init_cache(batch, left, device, dtype) for layer in self.layers]

    def streaming_forward(self, src: Tensor, caches: Sequence[Sequence[Tensor]], cache_valid: Tensor,
                          lengths: Tensor) -> Tuple[Tensor, List[List[Tensor]]]:
        """One chunk (T, B, C) at this stack's rate. cache_valid: (B, L), the cached frames a query may read;
        lengths: (B,) the chunk's frames that belong to the stream (T but at its end)."""
        pad = _padding_mask(lengths, src.shape[0])
        key_mask = torch.cat([~cache_valid, pad], dim=1)
        pos_emb = self.encoder_pos(src, left=cache_valid.shape[1])
        new = []
        for layer, cache in zip(self.layers, caches):
            src, cache = layer.streaming_forward(src, pos_emb, cache, key_mask, pad)
            new.append(cache)
        return src, new


def pad_by_repeating_last(src: Tensor, lengths: Optional[Tensor], target_len: int) -> Tensor:
    """(T, B, C) -> (target_len, B, C): every frame at or past an utterance's length becomes a copy of
    its last real frame, so downsampling groups at the end see the same values alone or in a batch."""
    t, b, c = src.shape
    if lengths is None:
        if target_len > t:
            src = torch.cat((src, src[-1:].expand(target_len - t, b, c)), dim=0)
        return src
    idx = torch.arange(target_len, device=src.device).unsqueeze(1)  # (T', 1)
    last = (lengths - 1).clamp(min=0).unsqueeze(0)  # (1, B)
    idx = torch.minimum(idx, last)  # (T', B)
    return torch.gather(src, 0, idx.unsqueeze(-1).expand(target_len, b, c))


class SimpleDownsample(nn.Module):
    """Downsample time by ``downsample``: weighted average of each group of frames, with weights
    softmax(learned bias) shared by all channels. Output length ceil(T / downsample)."""

    def __init__(self, downsample: int):
        super().__init__()
        self.downsample = downsample
        self.bias = nn.Parameter(torch.zeros(downsample))

    def forward(self, src: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """src: (T, B, C); lengths: (B,) valid frames (None: all valid)."""
        t, b, c = src.shape
        ds = self.downsample
        t_out = (t + ds - 1) // ds
        need_fix = lengths is not None and (_exporting() or bool((lengths < t).any()))
        if need_fix or t_out * ds != t:
            src = pad_by_repeating_last(src, lengths if need_fix else None, t_out * ds)
        weights = self.bias.softmax(dim=0).to(src.dtype)
        return torch.einsum("tdbc,d->tbc", src.reshape(t_out, ds, b, c), weights)


class SimpleUpsample(nn.Module):
    """Repeat each frame ``upsample`` times."""

    def __init__(self, upsample: int):
        super().__init__()
        self.upsample = upsample

    def forward(self, src: Tensor) -> Tensor:
        t, b, c = src.shape
        return src.unsqueeze(1).expand(t, self.upsample, b, c).reshape(t * self.upsample, b, c)


class DownsampledZipformer2Encoder(nn.Module):
    """Runs a stack at 1/ds of the frame rate: downsample, stack, repeat-upsample, learned bypass."""

    def __init__(self, encoder: Zipformer2Encoder, dim: int, downsample: int):
        super().__init__()
        self.downsample_factor = downsample
        self.downsample = SimpleDownsample(downsample)
        self.encoder = encoder
        self.num_layers = encoder.num_layers
        self.upsample = SimpleUpsample(downsample)
        self.out_combiner = BypassModule(dim)

    def forward(self, src: Tensor, lengths: Tensor, feature_mask: Union[Tensor, float] = 1.0,
                chunking: Chunking = Chunking()) -> Tensor:
        ds = self.downsample_factor
        src_orig = src
        x = self.downsample(src, lengths)
        ds_lengths = torch.div(lengths + ds - 1, ds, rounding_mode="floor")
        if isinstance(feature_mask, Tensor) and feature_mask.shape[0] > 1:
            feature_mask = feature_mask[::ds]
        x = self.encoder(x, feature_mask=feature_mask, src_key_padding_mask=_padding_mask(ds_lengths, x.shape[0]),
                         chunking=chunking.at_rate(ds))
        x = self.upsample(x)[: src_orig.shape[0]]
        return self.out_combiner(src_orig, x)

    def init_cache(self, batch: int, left: int, device: torch.device, dtype: torch.dtype = torch.float32
                   ) -> List[List[Tensor]]:
        return self.encoder.init_cache(batch, left // self.downsample_factor, device, dtype)

    def streaming_forward(self, src: Tensor, caches: Sequence[Sequence[Tensor]], cache_valid: Tensor,
                          lengths: Tensor) -> Tuple[Tensor, List[List[Tensor]]]:
        """One chunk (T, B, C) at the full rate; cache_valid (B, L / ds) at this stack's rate."""
        ds = self.downsample_factor
        x = self.downsample(src, lengths)
        x, caches = self.encoder.streaming_forward(x, caches, cache_valid,
                                                   torch.div(lengths + ds - 1, ds, rounding_mode="floor"))
        return self.out_combiner(src, self.upsample(x)[: src.shape[0]]), caches


# ---------------------------------------------------------------------------------------------
# The encoder


def _to_tuple(x: IntOrTuple, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(x, int):
        return (x,) * n
    x = tuple(int(v) for v in x)
    if len(x) == 1:
        return x * n
    if len(x) != n:
        raise ValueError(f"{name} has {len(x)} values but there are {n} stacks (len(downsampling_factor))")
    return x


class Zipformer2(nn.Module):
    """The Zipformer2 encoder, batch-first, following the encoder contract of docs/DESIGN.md.

    ``forward(x (B, T, encoder_dim[0]), x_lens, max_exit=None) -> [(out (B, (T+1)//2, max(encoder_dim)),
    out_lens)]`` (``(B, T, ...)`` with ``output_downsampling_factor=1``). Per-stack arguments take an int (same for all stacks) or one value per stack; their
    number of stacks is ``len(downsampling_factor)``. ``feature_mask_dropout_prob``: in training, on this
    fraction of sequences the channels above ``encoder_unmasked_dim`` are zeroed (twice as often for the
    top half of them), which trains the narrow part of every stack to work on its own.

    ``causal=True``: chunk-causal attention and convolutions in every stack (``chunk_size`` and
    ``left_context_frames``, in frames at the input rate, are drawn per training batch; ``chunks.set``
    fixes them for evaluation), and ``streaming_forward`` decodes chunk by chunk.
    """

    def __init__(self, output_downsampling_factor: int = 2,
                 downsampling_factor: Sequence[int] = (1, 2, 4, 8, 4, 2),
                 encoder_dim: IntOrTuple = (192, 256, 384, 512, 384, 256),
                 num_encoder_layers: IntOrTuple = (2, 2, 3, 4, 3, 2),
                 encoder_unmasked_dim: IntOrTuple = (192, 192, 256, 256, 256, 192),
                 query_head_dim: IntOrTuple = 32, pos_head_dim: IntOrTuple = 4,
                 value_head_dim: IntOrTuple = 12, num_heads: IntOrTuple = (4, 4, 4, 8, 4, 4),
                 feedforward_dim: IntOrTuple = (512, 768, 1024, 1536, 1024, 768),
                 cnn_module_kernel: IntOrTuple = (31, 31, 15, 15, 15, 31), pos_dim: int = 48,
                 dropout: Optional[FloatLike] = None, warmup_batches: float = 4000.0,
                 feature_mask_dropout_prob: float = 0.125, use_balancers: bool = False,
                 use_whiten: bool = False, causal: bool = False, chunk_size: Sequence[int] = (FULL,),
                 left_context_frames: Sequence[int] = (FULL,)):
        super().__init__()
        if output_downsampling_factor not in (1, 2):
            raise ValueError(f"Zipformer2 supports output_downsampling_factor 1 or 2, not {output_downsampling_factor}")
        self.downsampling_factor = tuple(int(d) for d in downsampling_factor)
        n = len(self.downsampling_factor)
        self.encoder_dim = _to_tuple(encoder_dim, n, "encoder_dim")
        self.encoder_unmasked_dim = _to_tuple(encoder_unmasked_dim, n, "encoder_unmasked_dim")
        self.num_encoder_layers = _to_tuple(num_encoder_layers, n, "num_encoder_layers")
        self.num_heads = _to_tuple(num_heads, n, "num_heads")
        query_head_dim = _to_tuple(query_head_dim, n, "query_head_dim")
        pos_head_dim = _to_tuple(pos_head_dim, n, "pos_head_dim")
        value_head_dim = _to_tuple(value_head_dim, n, "value_head_dim")
        feedforward_dim = _to_tuple(feedforward_dim, n, "feedforward_dim")
        cnn_module_kernel = _to_tuple(cnn_module_kernel, n, "cnn_module_kernel")
        for u, d in zip(self.encoder_unmasked_dim, self.encoder_dim):
            if u > d:
                raise ValueError(f"encoder_unmasked_dim {self.encoder_unmasked_dim} must be <= encoder_dim "
                                 f"{self.encoder_dim} stack by stack")
        if dropout is None:
            dropout = _default_dropout()
        self.output_downsampling_factor = output_downsampling_factor
        self.feature_mask_dropout_prob = feature_mask_dropout_prob

        stacks = []
        for i in range(n):
            layer_kwargs = dict(
                embed_dim=self.encoder_dim[i], pos_dim=pos_dim, num_heads=self.num_heads[i],
                query_head_dim=query_head_dim[i], pos_head_dim=pos_head_dim[i],
                value_head_dim=value_head_dim[i], feedforward_dim=feedforward_dim[i], dropout=dropout,
                cnn_module_kernel=cnn_module_kernel[i], use_balancers=use_balancers, use_whiten=use_whiten,
                causal=causal)
            stack = Zipformer2Encoder(
                layer_kwargs, self.num_encoder_layers[i], pos_dim=pos_dim,
                warmup_begin=warmup_batches * (i + 1) / (n + 1), warmup_end=warmup_batches * (i + 2) / (n + 1),
                final_layerdrop_rate=0.035 * self.downsampling_factor[i] ** 0.5)
            if self.downsampling_factor[i] != 1:
                stack = DownsampledZipformer2Encoder(stack, self.encoder_dim[i], self.downsampling_factor[i])
            stacks.append(stack)
        self.encoders = nn.ModuleList(stacks)
        # 2: icefall's x2 average of the output (50 -> 25 Hz after Conv2dSubsampling); 1: the output keeps
        # the input's frame rate (25 Hz after the x4 Conv1dSubsampling).
        self.downsample_output = SimpleDownsample(2) if output_downsampling_factor == 2 else None
        self.exits: List[int] = [sum(self.num_encoder_layers)]
        self.output_dims: List[int] = [max(self.encoder_dim)]
        factor = output_downsampling_factor
        for d in self.downsampling_factor:
            factor = factor * d // math.gcd(factor, d)
        # each stack's convolutions reach kernel // 2 of its frames back, ds frames of the input each
        reach = max(k // 2 * d for k, d in zip(cnn_module_kernel, self.downsampling_factor))
        self.chunks = CausalChunks(causal, chunk_size, left_context_frames, chunk_factor=factor, conv_context=reach)

    def _feature_masks(self, x: Tensor) -> List[Union[Tensor, float]]:
        """Per-stack (1, B, C) 0/1 masks on the channels above encoder_unmasked_dim (training only)."""
        if not self.training or self.feature_mask_dropout_prob <= 0.0:
            return [1.0] * len(self.encoder_dim)
        b = x.shape[1]
        p = self.feature_mask_dropout_prob
        keep1 = (torch.rand(1, b, 1, device=x.device) > p).to(x.dtype)
        keep2 = keep1 * (torch.rand(1, b, 1, device=x.device) > p).to(x.dtype)
        masks = []
        for d, u in zip(self.encoder_dim, self.encoder_unmasked_dim):
            mid = u + (d - u) // 2
            m = torch.ones(1, b, d, dtype=x.dtype, device=x.device)
            m[:, :, u:mid] = keep1
            m[:, :, mid:] = keep2
            masks.append(m)
        return masks

    def _full_dim_output(self, outputs: List[Tensor]) -> Tensor:
        """Take each channel from the latest stack that has it."""
        pieces = [outputs[-1]]
        cur = self.encoder_dim[-1]
        for i in range(len(outputs) - 2, -1, -1):
            d = self.encoder_dim[i]
            if d > cur:
                pieces.append(outputs[i][..., cur:d])
                cur = d
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def forward(self, x: Tensor, x_lens: Tensor, max_exit: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
        if max_exit is not None and max_exit < self.exits[-1]:
            raise ValueError(f"Zipformer2 has a single exit after layer {self.exits[-1]}; got max_exit={max_exit}")
        if x.ndim != 3 or x.shape[-1] != self.encoder_dim[0]:
            raise ValueError(f"Zipformer2 expects (B, T, {self.encoder_dim[0]}) input, got {tuple(x.shape)}")
        t = x.shape[1]
        pad_mask = _padding_mask(x_lens, t)
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(0, 1)  # (T, B, C)
        feature_masks = self._feature_masks(x)
        chunking = self.chunks.current(self.training)
        outputs = []
        for i, stack in enumerate(self.encoders):
            x = convert_num_channels(x, self.encoder_dim[i])
            if isinstance(stack, DownsampledZipformer2Encoder):
                x = stack(x, x_lens, feature_mask=feature_masks[i], chunking=chunking)
            else:
                x = stack(x, feature_mask=feature_masks[i], src_key_padding_mask=pad_mask, chunking=chunking)
            outputs.append(x)
        return [self._output(outputs, x_lens)]

    def _output(self, outputs: List[Tensor], x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        """The stacks' (T, B, C) outputs -> the encoder's (B, T_out, D) output and lengths."""
        x = self._full_dim_output(outputs)
        if self.downsample_output is None:
            return x.transpose(0, 1), x_lens
        x = self.downsample_output(x, x_lens)
        return x.transpose(0, 1), torch.div(x_lens + 1, 2, rounding_mode="floor")

    # ------------------------------------------------------------------ streaming
    def init_states(self, batch: int, left: int, device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32) -> List[List[List[Tensor]]]:
        """Per stack, per layer, the six caches of a stream that has heard nothing; ``left`` frames of left
        context at the input rate (a multiple of every stack's downsampling)."""
        if left <= 0:
            raise ValueError("streaming needs a finite left context (--left-context-frames > 0)")
        check_chunking((self.chunks.chunk_factor,), (left,), self.chunks.chunk_factor)
        return [stack.init_cache(batch, left, device, dtype) for stack in self.encoders]

    def streaming_forward(self, x: Tensor, x_lens: Tensor, states: Sequence[Sequence[Sequence[Tensor]]],
                          processed_lens: Tensor) -> Tuple[Tensor, Tensor, List[List[List[Tensor]]]]:
        """One chunk. x: (B, T, C) at the input rate (T a multiple of the largest downsampling); x_lens: (B,)
        its frames that belong to each stream; processed_lens: (B,) frames each stream had before it (cache
        slots before the stream's start are masked). Returns the chunk's output, its lengths, the next states."""
        if not self.chunks.causal:
            raise RuntimeError("streaming needs a causal encoder (train with --causal true)")
        pad_mask = _padding_mask(x_lens, x.shape[1])
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(0, 1)
        outputs, new_states = [], []
        for i, (stack, caches) in enumerate(zip(self.encoders, states)):
            ds = self.downsampling_factor[i]
            x = convert_num_channels(x, self.encoder_dim[i])
            left = caches[0][0].shape[0]
            valid = torch.arange(left, device=x.device).unsqueeze(0) >= left - torch.div(
                processed_lens, ds, rounding_mode="floor").unsqueeze(1)
            x, caches = stack.streaming_forward(x, caches, valid, x_lens)
            outputs.append(x)
            new_states.append(caches)
        out, out_lens = self._output(outputs, x_lens)
        return out, out_lens, new_states
