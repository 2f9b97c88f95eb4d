"""Standard Conformer layer (Gulati et al. 2020) and its positional encodings.

The early-exit papers (Wright et al. 2023, Lasbordes et al. 2025) build their encoders from torchaudio's
Conformer layer with sinusoidal absolute positions added after the front end; this module gives the same
layer in plain PyTorch (torchaudio cannot be a dependency) plus the Transformer-XL style relative-position
attention of ESPnet's RelPositionMultiHeadedAttention.  Everything that holds weights is an ``nn.Linear``,
``nn.Conv1d`` or a norm, so a hook-based MAC counter sees it.

Shapes are batch-first: ``x`` is ``(B, T, C)``, ``key_padding_mask`` is ``(B, T)`` with True at padded frames.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``(N, dim)`` of (possibly negative) float positions, Vaswani-style frequencies."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) * (-math.log(10000.0) / dim)
    )
    angles = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # (N, dim/2)
    # interleave sin/cos like the papers' PositionalEncoding: even channels sin, odd channels cos
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(positions.numel(), dim)


class AbsolutePositionalEncoding(nn.Module):
    """Adds sinusoidal absolute positions to the front-end output (the papers' choice), then dropout.

    No sqrt(d) input scaling: the papers' code adds the table to the unscaled front-end output.
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        pe = sinusoid(torch.arange(x.size(1), device=x.device), self.dim).to(x.dtype)
        return self.dropout(x + pe.unsqueeze(0))


class RelativePositionalEncoding(nn.Module):
    """Embeddings of the relative distances ``T-1, T-2, ..., -(T-1)`` (query minus key), ``(2T-1, dim)``.

    Parameter-free: a fresh table per length, so nothing limits the input length.
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        t = x.size(1)
        rel = torch.arange(t - 1, -t, -1, device=x.device)
        return self.dropout(sinusoid(rel, self.dim).to(x.dtype))


def rel_shift(scores: Tensor) -> Tensor:
    """``(B, H, T, 2T-1)`` scores against relative positions ``T-1..-(T-1)`` -> ``(B, H, T, T)`` by key.

    Query i and key j sit at relative distance i-j, column ``T-1-i+j``: a strided view reads that diagonal band.
    """
    b, h, t, n = scores.shape
    if n != 2 * t - 1:
        raise ValueError(f"rel_shift expects 2T-1={2 * t - 1} relative positions, got {n}")
    scores = scores.contiguous()
    sb, sh, _, _ = scores.stride()
    return scores.as_strided((b, h, t, t), (sb, sh, n - 1, 1), storage_offset=scores.storage_offset() + t - 1)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over batch-first input, absolute or Transformer-XL relative positions.

    With ``relative=True`` it adds the content bias ``u`` and position bias ``v`` of Dai et al. (2019) and a
    projection of the relative embeddings, as ESPnet's RelPositionMultiHeadedAttention does.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, relative: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.relative = relative
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        if relative:
            self.linear_pos = nn.Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim))
            self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, dk)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, pos_emb: Optional[Tensor] = None) -> Tensor:
        b, t, c = x.shape
        q_lin = self.linear_q(x).view(b, t, self.num_heads, self.head_dim)
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        bias = x.new_zeros(b, 1, 1, t)
        if key_padding_mask is not None:
            bias = bias.masked_fill(key_padding_mask.view(b, 1, 1, t), torch.finfo(x.dtype).min)
        if self.relative:
            if pos_emb is None:
                raise ValueError("relative attention needs pos_emb from RelativePositionalEncoding")
            p = self.linear_pos(pos_emb).view(-1, self.num_heads, self.head_dim).permute(1, 2, 0)  # (H, dk, 2T-1)
            q_v = (q_lin + self.pos_bias_v).transpose(1, 2)  # (B, H, T, dk)
            scores_pos = rel_shift(torch.matmul(q_v, p))  # (B, H, T, T)
            bias = bias + scores_pos / math.sqrt(self.head_dim)
            q = (q_lin + self.pos_bias_u).transpose(1, 2)
        else:
            q = q_lin.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.linear_out(out.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Pre-norm feed-forward module: LayerNorm, Linear, Swish, dropout, Linear, dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(F.silu(self.linear1(self.norm(x))))))


class ConvModule(nn.Module):
    """Conformer convolution module: LayerNorm, pointwise conv + GLU, depthwise conv, BatchNorm/LayerNorm, Swish,
    pointwise conv, dropout.

    Padded frames are zeroed right before the depthwise conv (after the biased pointwise conv, which would
    otherwise make them non-zero), so that they cannot leak into valid frames.
    """

    def __init__(self, dim: int, kernel_size: int = 31, dropout: float = 0.0, norm: str = "batch") -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"depthwise kernel must be odd to keep the length, got {kernel_size}")
        if norm not in ("batch", "layer"):
            raise ValueError(f"conv module norm must be 'batch' or 'layer', got {norm!r}")
        self.norm_in = nn.LayerNorm(dim)
        self.pointwise1 = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm_type = norm
        self.norm = nn.BatchNorm1d(dim) if norm == "batch" else nn.LayerNorm(dim)
        self.pointwise2 = nn.Conv1d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        y = F.glu(self.pointwise1(self.norm_in(x).transpose(1, 2)), dim=1)  # (B, C, T)
        if key_padding_mask is not None:
            y = y.masked_fill(key_padding_mask.unsqueeze(1), 0.0)
        y = self.depthwise(y)
        if self.norm_type == "batch":
            y = self.norm(y)
        else:
            y = self.norm(y.transpose(1, 2)).transpose(1, 2)
        y = self.pointwise2(F.silu(y))
        return self.dropout(y.transpose(1, 2))


class ConformerLayer(nn.Module):
    """One Conformer block: x + FFN/2, x + MHSA, x + Conv, x + FFN/2, LayerNorm (Macaron style).

    Same structure and parameter count as torchaudio's ConformerLayer (the papers' layer) when ``pos_encoding="abs"``;
    ``"rel"`` adds the relative-position projection and the two per-head biases.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feedforward_dim: int,
        kernel_size: int = 31,
        dropout: float = 0.1,
        pos_encoding: str = "abs",
        conv_norm: str = "batch",
    ) -> None:
        super().__init__()
        if pos_encoding not in ("abs", "rel"):
            raise ValueError(f"pos_encoding must be 'abs' or 'rel', got {pos_encoding!r}")
        self.ffn1 = FeedForward(dim, feedforward_dim, dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, dropout, relative=pos_encoding == "rel")
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConvModule(dim, kernel_size, dropout, conv_norm)
        self.ffn2 = FeedForward(dim, feedforward_dim, dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, pos_emb: Optional[Tensor] = None) -> Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), key_padding_mask, pos_emb))
        x = x + self.conv(x, key_padding_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)
