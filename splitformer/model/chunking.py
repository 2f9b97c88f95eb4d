"""Chunk-causal computation: what a frame may see when the encoder runs on a live stream.

A causal encoder cuts time into chunks of ``chunk`` frames. A frame sees every frame of its own chunk (the
chunk is heard before it is processed) and the ``left`` frames before its chunk, never a later chunk. In
training the chunk size and left context are drawn per batch (``--chunk-size 16,32,64,-1``,
``--left-context-frames 64,128,256,-1``, counted in frames at the front end's output rate, icefall's unit);
``-1`` is full context, so one model also decodes offline.

The same rule written two ways gives the two computations the tests compare: a block-triangular attention
mask over the whole utterance (training, ``decode.py --chunk-size``), and caches of ``left`` frames carried
from chunk to chunk (``streaming_decode.py``). They agree on every frame.

A stack that runs at 1/ds of the rate sees chunks of ``chunk / ds`` frames and ``left / ds`` frames of left
context, so the sizes must divide exactly: :func:`check_chunking` refuses those that do not and names the
sizes that would.
"""
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

FULL = -1  # chunk size or left context: no limit


@dataclass(frozen=True)
class Chunking:
    """One chunk size and left context, in frames at the front end's output rate (``FULL``: unlimited)."""

    chunk: int = FULL
    left: int = FULL

    @property
    def full(self) -> bool:
        return self.chunk <= 0

    def at_rate(self, factor: int) -> "Chunking":
        """The same chunking seen by a stack that runs at 1/``factor`` of the rate."""
        if self.full:
            return self
        return Chunking(self.chunk // factor, self.left if self.left <= 0 else self.left // factor)

    def describe(self, frame_ms: float) -> str:
        if self.full:
            return "full context"
        left = "unlimited" if self.left <= 0 else f"{self.left} frames ({self.left * frame_ms:g} ms)"
        return f"chunks of {self.chunk} frames ({self.chunk * frame_ms:g} ms), left context {left}"


def parse_sizes(text, name: str) -> Tuple[int, ...]:
    """``"16,32,-1"`` -> (16, 32, -1); each value a positive frame count or -1."""
    if isinstance(text, int):
        values = (text,)
    elif isinstance(text, (list, tuple)):
        values = tuple(int(v) for v in text)
    else:
        try:
            values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
        except ValueError:
            raise ValueError(f"--{name} must be comma-separated frame counts (-1: full context), got {text!r}") from None
    if not values or any(v == 0 or v < FULL for v in values):
        raise ValueError(f"--{name} must list positive frame counts or -1 (full context), got {text!r}")
    return values


def check_chunking(chunks: Sequence[int], lefts: Sequence[int], factor: int, conv_context: int = 0,
                   frame_ms: Optional[float] = None, allow_full: bool = True) -> None:
    """Refuse chunk sizes and left contexts that do not line up, naming the values that would.

    ``factor``: the largest downsampling any stack or branch applies (every chunk must be a multiple of
    it, so that no averaged group straddles two chunks). Every finite left context must be a multiple of
    every finite chunk (whole chunks of left context, as the streaming caches hold them). ``conv_context``:
    frames of left context (at the front end's rate) the causal convolutions reach; a finite left
    context shorter than that would let a convolution see frames the attention may not.
    """
    unit = f" ({frame_ms:g} ms a frame)" if frame_ms else ""
    full = " or -1" if allow_full else ""
    bad = [c for c in chunks if c > 0 and c % factor]
    if bad:
        # suggest only chunks that the left contexts given would also accept
        finite_lefts = [v for v in lefts if v > 0]
        fits = [factor * k for k in range(1, 65) if all(v % (factor * k) == 0 for v in finite_lefts)][:4]
        ok = ", ".join(map(str, fits or [factor * k for k in range(1, 5)]))
        raise ValueError(f"--chunk-size {','.join(map(str, chunks))}: {bad} is not a multiple of {factor}, the "
                         f"largest downsampling of the encoder's stacks and branches; use multiples of {factor} "
                         f"(e.g. {ok}){full}{unit}")
    finite_chunks = [c for c in chunks if c > 0]
    for left in lefts:
        if left <= 0:
            continue
        off = [c for c in finite_chunks if left % c]
        if off:
            lcm = 1
            for c in finite_chunks:
                lcm = lcm * c // _gcd(lcm, c)
            raise ValueError(f"--left-context-frames {left} is not a multiple of chunk size(s) {off}: the left "
                             f"context is whole chunks; use a multiple of {lcm} (e.g. {lcm}, {2 * lcm}, {4 * lcm})"
                             f"{full}{unit}")
        if left < conv_context:
            need = -(-conv_context // max(finite_chunks or [1])) * max(finite_chunks or [1])
            raise ValueError(f"--left-context-frames {left} is shorter than the {conv_context} frames the causal "
                             f"convolutions reach back; use at least {need}{unit}")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def draw_chunking(chunks: Sequence[int], lefts: Sequence[int]) -> Chunking:
    """A random (chunk, left context) pair for one training batch, from Python's ``random`` (seeded per epoch
    and restored on resume with the other RNG states)."""
    chunk = random.choice(list(chunks))
    if chunk <= 0:
        return Chunking()
    return Chunking(chunk, random.choice(list(lefts)))


def chunk_attn_mask(num_frames: int, chunking: Chunking, device: torch.device) -> Optional[Tensor]:
    """(T, T) bool, True where query frame t may not see key frame s; None at full context.

    Allowed: s in t's chunk or in the ``left / chunk`` chunks before it (all earlier chunks when left is
    unlimited)."""
    if chunking.full:
        return None
    c = torch.arange(num_frames, device=device) // chunking.chunk
    q, k = c.unsqueeze(1), c.unsqueeze(0)
    blocked = k > q
    if chunking.left > 0:
        blocked = blocked | (k < q - chunking.left // chunking.chunk)
    return blocked


def chunk_index(num_frames: int, chunk: int, device: torch.device) -> Tensor:
    """(T,) the chunk each frame belongs to."""
    return torch.arange(num_frames, device=device) // chunk


def absent_attn_mask(attn_mask: Tensor, absent: Tensor, chunk: int) -> Tensor:
    """(B, T, T): ``attn_mask`` and, for every query, the ``absent`` (B, T) frames of other chunks.

    Per-chunk exits: a block that a chunk did not reach never computed that chunk, so no other chunk may read
    it there. The chunk's own frames still see each other: their outputs at this block are never used by a
    stream, and in training they keep a meaningful loss."""
    c = chunk_index(absent.size(1), chunk, absent.device)
    other = c.unsqueeze(0) != c.unsqueeze(1)  # (T, T): query t, key s in different chunks
    return attn_mask.unsqueeze(0) | (absent.unsqueeze(1) & other.unsqueeze(0))


def _per_chunk(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int) -> Tensor:
    """``fn`` applied to every chunk of (B, C, T) on its own (zeros beyond the chunk's edges)."""
    b, c, t = x.shape
    n = -(-t // chunk)
    xp = nn.functional.pad(x, (0, n * chunk - t)) if n * chunk != t else x
    y = fn(xp.reshape(b, c, n, chunk).permute(0, 2, 1, 3).reshape(b * n, c, chunk))
    return y.reshape(b, n, c, chunk).permute(0, 2, 1, 3).reshape(b, c, n * chunk)[..., :t]


class ChunkCausalDepthwiseConv1d(nn.Module):
    """Depthwise convolution over time that never reads past the end of the current chunk.

    The sum of two depthwise convolutions: a causal one (the current frame and the ``kernel // 2`` before
    it, across chunk boundaries; streaming caches those frames) and a centred one of the full kernel that
    sees only its own chunk (zeros beyond the chunk's edges). Frames near a chunk's edges see fewer
    neighbours through the centred part, so its output there is scaled by learned per-channel factors
    (one per distance to the edge, starting at 1). With ``chunk <= 0`` the whole input is one chunk and no
    edge is scaled: a full-context convolution that does not depend on how much padding follows.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd, got {kernel_size}")
        self.half = kernel_size // 2
        self.causal_conv = nn.Conv1d(channels, channels, self.half + 1, groups=channels)
        self.chunkwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=self.half, groups=channels,
                                        bias=False)
        # [0]: distance 0..half-1 from the chunk's first frame; [1]: from its last frame
        self.edge_scale = nn.Parameter(torch.ones(2, channels, max(self.half, 1)))

    def _edge_factors(self, chunk: int, dtype: torch.dtype) -> Tensor:
        """(C, chunk) multipliers of the centred part for positions 0..chunk-1 of a chunk."""
        pos = torch.arange(chunk, device=self.edge_scale.device)
        ones = torch.ones(self.edge_scale.size(1), 1, device=pos.device, dtype=self.edge_scale.dtype)
        left = torch.cat([self.edge_scale[0, :, : self.half], ones], dim=1)  # (C, half+1): distance, then "far"
        right = torch.cat([self.edge_scale[1, :, : self.half], ones], dim=1)
        far = torch.full_like(pos, self.half)
        f = left[:, torch.minimum(pos, far)] * right[:, torch.minimum(chunk - 1 - pos, far)]
        return f.to(dtype)

    def forward(self, x: Tensor, chunk: int = FULL, absent: Optional[Tensor] = None) -> Tensor:
        """x: (B, C, T), padded frames already zero -> (B, C, T). ``absent``: (B, T) frames that other chunks
        must read as zeros (chunks that stopped below this block; :func:`absent_attn_mask`)."""
        if chunk <= 0:
            return self._causal(x) + self.chunkwise_conv(x)
        local = _per_chunk(lambda xc: self.chunkwise_conv(xc) * self._edge_factors(chunk, x.dtype), x, chunk)
        if absent is None:
            return self._causal(x) + local
        # what the causal conv reads across chunk starts comes from the zeroed input, within a chunk from its own
        xz = x.masked_fill(absent.unsqueeze(1), 0.0)
        within = _per_chunk(self._causal, x, chunk) - _per_chunk(self._causal, xz, chunk)
        return self._causal(xz) + within + local

    def _causal(self, x: Tensor) -> Tensor:
        return self.causal_conv(nn.functional.pad(x, (self.half, 0)))

    def streaming_forward(self, x: Tensor, cache: Tensor) -> Tuple[Tensor, Tensor]:
        """One chunk. x: (B, C, chunk), frames past the stream's end zero; cache: (B, C, kernel // 2), the
        causal conv's input just before the chunk (zeros at the stream's start) -> (output, next cache)."""
        full = torch.cat([cache, x], dim=2)
        out = self.causal_conv(full) + self.chunkwise_conv(x) * self._edge_factors(x.size(2), x.dtype)
        return out, full[:, :, full.size(2) - self.half:]


class CausalChunks:
    """What a causal encoder knows about its chunks: the sizes training draws from, and the one that
    evaluation uses (full context until :meth:`set_chunking` says otherwise).

    ``chunk_factor``: every chunk must be a multiple of it (the largest downsampling inside the encoder).
    ``conv_context``: frames (at the front end's rate) the causal convolutions reach back.
    """

    def __init__(self, causal: bool, chunk_sizes: Sequence[int], left_contexts: Sequence[int],
                 chunk_factor: int, conv_context: int = 0) -> None:
        self.causal = causal
        self.chunk_factor = chunk_factor
        self.conv_context = conv_context
        self.chunk_sizes = tuple(chunk_sizes) if causal else (FULL,)
        self.left_contexts = tuple(left_contexts) if causal else (FULL,)
        if causal:
            check_chunking(self.chunk_sizes, self.left_contexts, chunk_factor, conv_context)
        self.decode_chunking = Chunking()

    def set(self, chunk: int, left: int) -> Chunking:
        """The chunking of every evaluation forward from now on (``decode.py --chunk-size``)."""
        if chunk > 0 and not self.causal:
            raise ValueError("--chunk-size needs a causal model (trained with --causal true); this one sees the "
                             "whole utterance at every layer")
        if chunk > 0:
            check_chunking((chunk,), (left,), self.chunk_factor, self.conv_context)
        self.decode_chunking = Chunking(chunk, left) if chunk > 0 else Chunking()
        return self.decode_chunking

    def current(self, training: bool) -> Chunking:
        """This forward's chunking: drawn per batch in training, the evaluation setting otherwise."""
        if not self.causal:
            return Chunking()
        return draw_chunking(self.chunk_sizes, self.left_contexts) if training else self.decode_chunking
