"""Front ends: turn 100 Hz fbank frames (B, T, 80) into encoder frames (B, T', C).

- ``Conv2dSubsampling``: the Zipformer front end (x2 in time, to ~50 Hz): three small 2-D convolutions
  over (time, frequency) with SwooshR, a ConvNeXt block, a linear projection and BiasNorm.
  The time convolutions use no padding, so ``T' = (T - 7) // 2`` and every kept frame depends on real
  input frames only; the ConvNeXt's time padding is made padding-invariant by zeroing padded frames.
- ``Conv1dSubsampling``: the x4 front end of the early-exit Conformer papers: two 1-D convolutions,
  kernel 3, stride 2, each followed by an activation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from splitformer.model.scaling import (
    Balancer,
    BiasNorm,
    FloatLike,
    ScaledConv2d,
    ScheduledFloat,
    SharedDropout,
    SwooshL,
    SwooshR,
    Whiten,
    maybe,
)


def lengths_to_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True on padding."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


class ConvNeXt(nn.Module):
    """ConvNeXt block on (B, C, T, F): depthwise 7x7 conv, pointwise expand, SwooshL, pointwise project, residual.

    Padded time frames are zeroed before the depthwise conv so that they look exactly like the conv's own
    zero padding: an utterance gives the same output alone or padded inside a batch.
    """

    def __init__(self, channels: int, hidden_ratio: int = 3, kernel_size: Tuple[int, int] = (7, 7),
                 layerdrop_rate: Optional[FloatLike] = None, use_balancers: bool = False,
                 use_whiten: bool = False):
        super().__init__()
        self.padding = ((kernel_size[0] - 1) // 2, (kernel_size[1] - 1) // 2)
        hidden = channels * hidden_ratio
        self.layerdrop_rate = (ScheduledFloat((0.0, 0.2), (20000.0, 0.015), default=0.0)
                               if layerdrop_rate is None else layerdrop_rate)
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel_size, padding=self.padding, groups=channels)
        self.pointwise_conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.hidden_balancer = maybe(use_balancers, lambda: Balancer(
            hidden, channel_dim=1, min_positive=0.3, max_positive=1.0, min_abs=0.75, max_abs=5.0))
        self.activation = SwooshL()
        self.pointwise_conv2 = ScaledConv2d(hidden, channels, kernel_size=1, initial_scale=0.01)
        self.out_balancer = maybe(use_balancers, lambda: Balancer(
            channels, channel_dim=1, min_positive=0.4, max_positive=0.6, min_abs=1.0, max_abs=6.0))

    def forward(self, x: Tensor, time_pad_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, C, T, F); time_pad_mask: (B, T), True on padding."""
        if time_pad_mask is not None:
            x = x.masked_fill(time_pad_mask[:, None, :, None], 0.0)
        return self._rest(x, self.depthwise_conv(x))

    def streaming_forward(self, x: Tensor, cache: Tensor) -> Tuple[Tensor, Tensor]:
        """x: (B, C, T + 3, F), the chunk's T frames and the 3 after them (masked frames already zero); cache:
        (B, C, 3, F), the 3 frames before the chunk. Returns the chunk's (B, C, T, F) and the next cache."""
        pad_t = self.padding[0]
        t = x.size(2) - pad_t
        full = torch.cat([cache, x], dim=2)
        conv = self.depthwise_conv
        y = nn.functional.conv2d(full, conv.weight, conv.bias, padding=(0, self.padding[1]), groups=conv.groups)
        return self._rest(x[:, :, :t], y), full[:, :, t: t + pad_t]

    def _rest(self, bypass: Tensor, y: Tensor) -> Tensor:
        """Everything after the depthwise conv: pointwise MLP and the residual."""
        y = self.pointwise_conv1(y)
        y = self.hidden_balancer(y)
        y = self.activation(y)
        y = self.pointwise_conv2(y)
        if self.training:
            rate = float(self.layerdrop_rate)
            if rate > 0.0:
                keep = (torch.rand(y.shape[0], 1, 1, 1, device=y.device) > rate).to(y.dtype)
                y = y * keep
        return self.out_balancer(bypass + y)


class StreamingFrontEnd:
    """What a streaming decoder must know about a front end: for a chunk of ``chunk`` output frames, it reads
    ``chunk_input(chunk)`` fbank frames starting ``chunk_shift(chunk)`` frames after the previous chunk's
    first; the ``lookahead`` frames past the chunk's own are the latency the front end adds."""

    subsampling: int
    lookahead: int

    def chunk_shift(self, chunk: int) -> int:
        return self.subsampling * chunk

    def chunk_input(self, chunk: int) -> int:
        return self.subsampling * chunk + self.lookahead


class Conv2dSubsampling(nn.Module, StreamingFrontEnd):
    """(B, T, in_channels) at 100 Hz -> (B, (T - 7) // 2, out_channels) at ~50 Hz.

    Time: conv k3 (T-2), conv k3 stride 2 ((T-3)//2), conv k3 ((T-7)//2). Frequency: padded conv,
    then two stride-2 convs: 80 -> 39 -> 19 bins. Needs T >= 9 for one output frame.
    Streaming (icefall's way): a chunk of C frames reads 2C + 13 fbank frames (7 for the convolutions, 6
    for the ConvNeXt's 3 frames of right context) and caches the ConvNeXt's 3 frames of left context.
    """

    subsampling = 2
    lookahead = 13

    def __init__(self, in_channels: int = 80, out_channels: int = 192, layer1_channels: int = 8,
                 layer2_channels: int = 32, layer3_channels: int = 128, dropout: FloatLike = 0.1,
                 use_balancers: bool = False, use_whiten: bool = False):
        super().__init__()
        if in_channels < 7:
            raise ValueError(f"Conv2dSubsampling needs in_channels >= 7, got {in_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, layer1_channels, kernel_size=3, padding=(0, 1)),
            maybe(use_balancers, lambda: Balancer(layer1_channels, channel_dim=1, max_abs=1.0)),
            SwooshR(),
            nn.Conv2d(layer1_channels, layer2_channels, kernel_size=3, stride=2),
            maybe(use_balancers, lambda: Balancer(layer2_channels, channel_dim=1, max_abs=4.0)),
            SwooshR(),
            nn.Conv2d(layer2_channels, layer3_channels, kernel_size=3, stride=(1, 2)),
            maybe(use_balancers, lambda: Balancer(layer3_channels, channel_dim=1, max_abs=4.0)),
            SwooshR(),
        )
        self.convnext = ConvNeXt(layer3_channels, kernel_size=(7, 7), use_balancers=use_balancers)
        self.out_width = ((in_channels - 1) // 2 - 1) // 2
        self.out = nn.Linear(self.out_width * layer3_channels, out_channels)
        self.out_whiten = maybe(use_whiten, lambda: Whiten(num_groups=1, whitening_limit=4.0, prob=0.1,
                                                           grad_scale=0.02))
        self.out_norm = BiasNorm(out_channels)
        self.dropout = SharedDropout(dropout, shared_dim=1)  # one mask per utterance and channel

    @staticmethod
    def output_lengths(x_lens: Tensor) -> Tensor:
        return torch.div(x_lens - 7, 2, rounding_mode="floor")

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv2dSubsampling expects (B, T, {self.in_channels}), got {tuple(x.shape)}")
        if x.shape[1] < 9:
            raise ValueError(f"Conv2dSubsampling needs at least 9 input frames, got {x.shape[1]}")
        y = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        y_lens = self.output_lengths(x_lens)
        pad_mask = lengths_to_padding_mask(y_lens, y.shape[2])
        return self._project(self.convnext(y, pad_mask)), y_lens

    def _project(self, y: Tensor) -> Tensor:
        b, c, t, f = y.shape
        y = y.transpose(1, 2).reshape(b, t, c * f)
        y = self.out(y)
        y = self.out_whiten(y)
        y = self.out_norm(y)
        return self.dropout(y)

    def init_cache(self, batch: int, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
                   ) -> Tensor:
        """The ConvNeXt's left context before a stream's first frame: zeros, as in ``forward``."""
        channels = self.convnext.depthwise_conv.in_channels
        return torch.zeros(batch, channels, self.convnext.padding[0], self.out_width, device=device, dtype=dtype)

    def streaming_forward(self, x: Tensor, cache: Tensor, remaining: Tensor) -> Tuple[Tensor, Tensor]:
        """One chunk: x (B, 2C + 13, in_channels) -> (B, C, out_channels) and the next cache. ``remaining``:
        (B,) output frames each stream still has from this chunk's first (its offline length minus the frames
        already emitted); convolution outputs past it are zeroed, as ``forward`` zeroes them past the end."""
        y = self.conv(x.unsqueeze(1))  # (B, C, chunk + 3, F')
        y = y.masked_fill(lengths_to_padding_mask(remaining.clamp(min=0), y.shape[2])[:, None, :, None], 0.0)
        y, cache = self.convnext.streaming_forward(y, cache)
        return self._project(y), cache


class Conv1dSubsampling(nn.Module, StreamingFrontEnd):
    """(B, T, in_channels) at 100 Hz -> (B, T', out_channels) at 25 Hz, the early-exit papers' front end.

    Two Conv1d over time (kernel 3, stride 2, no padding), each followed by ``activation``. The papers'
    public code (early-exit-transformer, Splitformer) stacks the two convs with no activation between
    them; ``activation="none"`` reproduces that.
    Lengths: T1 = (T - 3) // 2 + 1 = (T - 1) // 2, then T' = (T1 - 1) // 2, i.e. ``T' = (T - 3) // 4``
    (for T >= 7). Without padding each output frame sees only real input frames, so the output is
    independent of batch padding. Streaming needs no cache: a chunk of C frames reads 4C + 3 fbank frames,
    30 ms past its own 4C.
    """

    subsampling = 4
    lookahead = 3

    def __init__(self, in_channels: int = 80, out_channels: int = 256, activation: str = "relu",
                 dropout: float = 0.0):
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "swooshr": SwooshR, "none": nn.Identity}
        if activation not in acts:
            raise ValueError(f"Conv1dSubsampling activation must be one of {list(acts)}, got {activation!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size=3, stride=2),
            acts[activation](),
            nn.Conv1d(out_channels, out_channels, kernel_size=3, stride=2),
            acts[activation](),
        )
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def output_lengths(x_lens: Tensor) -> Tensor:
        return torch.div(x_lens - 3, 4, rounding_mode="floor")

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv1dSubsampling expects (B, T, {self.in_channels}), got {tuple(x.shape)}")
        if x.shape[1] < 7:
            raise ValueError(f"Conv1dSubsampling needs at least 7 input frames, got {x.shape[1]}")
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.dropout(y), self.output_lengths(x_lens)

    def init_cache(self, batch: int, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
                   ) -> Optional[Tensor]:
        return None

    def streaming_forward(self, x: Tensor, cache: Optional[Tensor], remaining: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """One chunk: x (B, 4C + 3, in_channels) -> (B, C, out_channels); stateless."""
        return self.conv(x.transpose(1, 2)).transpose(1, 2), cache
