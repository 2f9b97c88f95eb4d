"""Early-exit encoder: N layers at one frame rate with exits every few layers, plus Splitformer branches.

Wright et al. (2023) put a CTC head after every second layer of a 12-layer Conformer; Lasbordes et al. (2025,
"Splitformer") add, in the first and last blocks, one parallel layer that runs on a x2 frame-dropped copy of the
block input, upsampled by repetition and summed with the block output.  This module builds both, with Conformer
or Zipformer2 layers, and guarantees that running to exit k never executes a layer (or branch) above exit k.

Terminology: ``exits[i]`` is the layer count after which exit i sits; block i is the span of layers
``exits[i-1] < l <= exits[i]`` (with ``exits[-1] = 0``), the unit a Splitformer branch runs in parallel to.
"""
import random
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from splitformer.model.chunking import FULL, CausalChunks, Chunking, absent_attn_mask, chunk_attn_mask, chunk_index
from splitformer.model.conformer import AbsolutePositionalEncoding, ConformerLayer, RelativePositionalEncoding
from splitformer.model.scaling import limit_param_value

LAYER_TYPES = ("zipformer", "conformer")
DOWNSAMPLE_MODES = ("learned", "drop")
COMBINE_MODES = ("sum", "bypass")


def block_widths(width: Union[int, Sequence[int]], n_blocks: int) -> List[int]:
    """One width for every block, or one per block (a block is the span of layers between two exits, with its
    Splitformer branch). Per-block widths let a control spend a branch's compute in its own block."""
    ws = [int(width)] if isinstance(width, int) else [int(w) for w in width]
    if len(ws) == 1:
        ws = ws * n_blocks
    if len(ws) != n_blocks or min(ws) < 1:
        raise ValueError(f"feedforward_dim must be one positive width or one per block ({n_blocks} blocks, one per "
                         f"exit), got {tuple(ws)}")
    return ws


def make_pad_mask(lens: Tensor, max_len: int) -> Tensor:
    """``(B, max_len)`` bool mask, True at padded frames."""
    return torch.arange(max_len, device=lens.device).unsqueeze(0) >= lens.unsqueeze(1)


class Downsample(nn.Module):
    """Reduces the frame rate by ``factor``: ``T' = ceil(T / factor)``, ``lens' = ceil(lens / factor)``.

    ``"learned"``: each output frame is a learned softmax-weighted average of ``factor`` consecutive frames
    (Zipformer's SimpleDownsample); a sequence's last, incomplete group is completed with its last valid frame,
    so the result does not depend on how much padding the batch adds.  ``"drop"``: keep every ``factor``-th frame
    (frames 0, f, 2f, ...), the Splitformer paper's choice; no parameters.

    The learned weights start near, not at, zero: ScaledAdam sizes each update by the parameter's RMS (floored
    at 1e-5), so an all-zero start would never move and the "learned" average would stay a plain one.
    """

    def __init__(self, factor: int, mode: str = "learned") -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"downsampling factor must be >= 1, got {factor}")
        if mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
        self.factor = factor
        self.mode = mode
        if mode == "learned" and factor > 1:
            # softmax of +-0.1: close to a plain average, with an RMS of 0.1 for ScaledAdam to scale from
            self.weights = nn.Parameter(torch.linspace(-0.1, 0.1, factor))

    def forward(self, x: Tensor, lens: Tensor) -> Tuple[Tensor, Tensor]:
        f = self.factor
        new_lens = (lens + f - 1) // f
        if f == 1:
            return x, lens
        if self.mode == "drop":
            return x[:, ::f], new_lens
        b, t, c = x.shape
        t_out = (t + f - 1) // f
        # replace padding (and the tail up to a multiple of f) by each sequence's last valid frame
        last = x[torch.arange(b, device=x.device), (lens - 1).clamp(min=0)]  # (B, C)
        idx = torch.arange(t_out * f, device=x.device).unsqueeze(0)
        valid = (idx < lens.unsqueeze(1)).unsqueeze(-1)
        if t_out * f > t:
            x = torch.cat([x, x.new_zeros(b, t_out * f - t, c)], dim=1)
        x = torch.where(valid, x, last.unsqueeze(1))
        w = self.weights.softmax(dim=0).to(x.dtype)
        return (x.view(b, t_out, f, c) * w.view(1, 1, f, 1)).sum(dim=2), new_lens


def upsample_repeat(x: Tensor, factor: int, length: int) -> Tensor:
    """Repeats each frame ``factor`` times and trims to ``length`` frames (odd lengths included)."""
    if x.size(1) * factor < length:
        raise ValueError(f"cannot upsample {x.size(1)} frames x{factor} to {length}")
    return torch.repeat_interleave(x, factor, dim=1)[:, :length]


class ZipformerLayerAdapter(nn.Module):
    """Wraps a time-major Zipformer2EncoderLayer so that every layer here takes ``(x (B,T,C), mask, pos_emb)``
    (plus, for a causal layer, the chunk mask and chunk size)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, pos_emb: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, chunk: int = FULL, absent: Optional[Tensor] = None) -> Tensor:
        chunked = {} if attn_mask is None else dict(attn_mask=attn_mask, chunk=chunk)  # only a causal forward
        if absent is not None:
            chunked["absent"] = absent
        y = self.layer(x.transpose(0, 1), pos_emb, src_key_padding_mask=key_padding_mask, **chunked)
        return y.transpose(0, 1)


@dataclass
class StackContext:
    """What every layer of a stack at one rate reads besides its input: padding, chunk mask, positions.

    ``depth``: (B, T) the highest block each frame's chunk reaches (per-chunk exits); a block above it
    treats the frame as absent for other chunks (masked key, zero in the convolutions), as a stream whose chunk
    exited lower never computed it there. None: every frame reaches every block.
    """

    pad: Tensor
    pos_emb: Optional[Tensor]
    chunking: Chunking = Chunking()
    attn_mask: Optional[Tensor] = None
    depth: Optional[Tensor] = None

    def absent(self, block: int) -> Optional[Tensor]:
        """(B, T) frames of chunks that stopped below ``block`` (None without per-chunk exits)."""
        return None if self.depth is None else self.depth < block

    def block_attn_mask(self, block: int) -> Optional[Tensor]:
        """The chunk mask of ``block``'s layers: (T, T), or (B, T, T) with the absent chunks blocked."""
        absent = self.absent(block)
        if absent is None:
            return self.attn_mask
        return absent_attn_mask(self.attn_mask, absent, self.chunking.chunk)


class SplitBranch(nn.Module):
    """A Splitformer branch: downsample the block input, run ``layers`` at the lower rate, upsample to the block's
    exact length and merge with the block output.

    ``combine="sum"``: ``block_out + branch`` (the paper).  ``"bypass"``: ``block_out + c * (branch - block_out)``
    with a learned per-channel ``c`` kept in [0, 1] through its gradient, initialised at 0.5 (Zipformer's bypass
    style). Sum leaves the main path untouched at the start; bypass halves it, so sum is the default.
    The branch layers are never skipped at random: a skipped branch would add the block input to its output.
    """

    def __init__(self, layers: nn.ModuleList, dim: int, factor: int = 2, downsample: str = "learned",
                 combine: str = "sum") -> None:
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"split_combine must be one of {COMBINE_MODES}, got {combine!r}")
        if factor < 2:
            raise ValueError(f"split_downsampling_factor must be >= 2, got {factor}")
        self.factor = factor
        self.downsample = Downsample(factor, downsample)
        self.layers = layers
        self.combine = combine
        if combine == "bypass":
            self.bypass_scale = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, block_in: Tensor, block_out: Tensor, lens: Tensor,
                pos_fn: Callable[[Tensor], Optional[Tensor]], chunking: Chunking = Chunking(),
                absent: Optional[Tensor] = None) -> Tensor:
        """``chunking``: as the block's stack sees it; ``absent``: (B, T) frames the block may not read."""
        y, y_lens = self.downsample(block_in, lens)
        mask = make_pad_mask(y_lens, y.size(1))
        pos_emb = pos_fn(y)
        low = chunking.at_rate(self.factor)
        attn_mask = chunk_attn_mask(y.size(1), low, y.device)
        if absent is not None:  # chunks are whole groups of `factor` frames: a group's first frame speaks for it
            absent = absent[:, ::self.factor]
            attn_mask = absent_attn_mask(attn_mask, absent, low.chunk)
        for layer in self.layers:
            if attn_mask is None:
                y = layer(y, mask, pos_emb)
            else:
                y = layer(y, mask, pos_emb, attn_mask, low.chunk, absent)
        return self.merge(y, block_out)

    def merge(self, y: Tensor, block_out: Tensor) -> Tensor:
        """The branch's low-rate output, upsampled to the block output's length and combined with it."""
        y = upsample_repeat(y, self.factor, block_out.size(1))
        if self.combine == "sum":
            return block_out + y
        c = limit_param_value(self.bypass_scale, 0.0, 1.0, self.training)
        return block_out + c * (y - block_out)


class EarlyExitEncoder(nn.Module):
    """``num_layers`` layers at one frame rate with a normalised exit after each layer in ``exit_layers``.

    Input is the front-end output ``(B, T, d_model)``.  ``input_downsample=2`` first halves the frame rate
    (50 Hz Conv2dSubsampling output -> 25 Hz for the transducer); 1 keeps it (the papers' x4 Conv1d front end).
    ``split_blocks`` lists the blocks that get a parallel Splitformer branch (negative indices count from the
    last block); empty gives the plain early-exit encoder of Wright et al.

    ``pos_encoding``: ``"abs"`` adds sinusoidal positions after the (optional) input downsampling (conformer only);
    ``"rel"`` uses relative-position attention: Transformer-XL style for conformer layers, Zipformer's own
    CompactRelPositionalEncoding for zipformer layers (which always need it).
    The ``query_head_dim``, ``pos_head_dim``, ``value_head_dim`` and ``pos_dim`` arguments only apply to zipformer
    layers, as do ``use_balancers``/``use_whiten`` (Zipformer's regularisers); ``conv_norm`` only to conformer layers.  ``input_dim`` (front-end output dim, default ``d_model``)
    gets a Linear projection when it differs from ``d_model``.  ``encoder_unmasked_dim`` is accepted so that the
    Zipformer2 flags can be passed unchanged; this encoder does no feature masking and ignores it.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 12,
        exit_layers: Sequence[int] = (2, 4, 6, 8, 10, 12),
        layer_type: str = "zipformer",
        num_heads: int = 4,
        feedforward_dim: Union[int, Sequence[int]] = 768,
        cnn_module_kernel: int = 31,
        dropout: float = 0.1,
        pos_encoding: str = "rel",
        conv_norm: str = "batch",
        input_downsample: int = 1,
        input_downsample_mode: str = "learned",
        split_blocks: Sequence[int] = (),
        split_downsampling_factor: int = 2,
        split_num_layers: int = 1,
        split_downsample: str = "learned",
        split_combine: str = "sum",
        query_head_dim: int = 32,
        pos_head_dim: int = 4,
        value_head_dim: int = 12,
        pos_dim: int = 48,
        input_dim: Optional[int] = None,
        encoder_unmasked_dim: Optional[int] = None,
        use_balancers: bool = False,
        use_whiten: bool = False,
        causal: bool = False,
        chunk_size: Sequence[int] = (FULL,),
        left_context_frames: Sequence[int] = (FULL,),
        chunk_exit_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
        if pos_encoding not in ("abs", "rel"):
            raise ValueError(f"pos_encoding must be 'abs' or 'rel', got {pos_encoding!r}")
        if layer_type == "zipformer" and pos_encoding != "rel":
            raise ValueError("zipformer layers carry their own relative positions: use pos_encoding='rel' "
                             "(or layer_type='conformer' for absolute positions)")
        if causal and layer_type != "zipformer":
            raise ValueError("--causal true needs zipformer layers (--layer-type zipformer); conformer layers "
                             "have no chunk-causal form here")
        exits = [int(e) for e in exit_layers]
        if not exits or exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] != num_layers:
            raise ValueError(f"exit_layers must be strictly increasing layer counts in 1..{num_layers} ending at "
                             f"num_layers={num_layers}, got {tuple(exit_layers)}")
        self.exits: List[int] = exits
        self.output_dims: List[int] = [d_model] * len(exits)
        self.d_model = d_model
        self.layer_type = layer_type
        self.pos_encoding = pos_encoding

        hp = dict(d_model=d_model, num_heads=num_heads, feedforward_dim=feedforward_dim,
                  cnn_module_kernel=cnn_module_kernel, dropout=dropout, pos_encoding=pos_encoding,
                  conv_norm=conv_norm, query_head_dim=query_head_dim, pos_head_dim=pos_head_dim,
                  value_head_dim=value_head_dim, pos_dim=pos_dim, use_balancers=use_balancers,
                  use_whiten=use_whiten, causal=causal)
        self.input_dim = d_model if input_dim is None else input_dim
        self.input_proj = nn.Linear(self.input_dim, d_model) if self.input_dim != d_model else None
        self.input_downsample = Downsample(input_downsample, input_downsample_mode)
        if layer_type == "conformer":
            pe_cls = AbsolutePositionalEncoding if pos_encoding == "abs" else RelativePositionalEncoding
            self.pos_enc = pe_cls(d_model, dropout)
        else:
            from splitformer.model.zipformer import CompactRelPositionalEncoding

            self.pos_enc = CompactRelPositionalEncoding(pos_dim, dropout)
        n_blocks = len(exits)
        ff = block_widths(feedforward_dim, n_blocks)
        self.feedforward_dims: List[int] = ff
        self.layers = nn.ModuleList([self._make_layer(layer_type, dict(hp, feedforward_dim=ff[b]))
                                     for b in range(n_blocks) for _ in self.block_layers(b)])
        self.exit_norms = nn.ModuleList([self._make_norm(layer_type, d_model) for _ in exits])

        resolved = sorted({b % n_blocks if -n_blocks <= b < n_blocks else b for b in split_blocks})
        bad = [b for b in resolved if not 0 <= b < n_blocks]
        if bad or len(resolved) != len(tuple(split_blocks)):
            raise ValueError(f"split_blocks {tuple(split_blocks)} must name distinct blocks in "
                             f"0..{n_blocks - 1} (or negative from the end); there are {n_blocks} exits")
        self.split_blocks: List[int] = resolved
        self.branches = nn.ModuleDict({
            str(b): SplitBranch(
                nn.ModuleList([self._make_layer(layer_type, dict(hp, feedforward_dim=ff[b]), skip_rate=0.0)
                               for _ in range(split_num_layers)]),
                d_model, split_downsampling_factor, split_downsample, split_combine)
            for b in resolved
        })
        factor = input_downsample * (split_downsampling_factor if resolved else 1)
        self.input_factor = input_downsample
        # a convolution reaches kernel // 2 frames back at its rate: the branches' are the longest
        self.chunks = CausalChunks(causal, chunk_size, left_context_frames, chunk_factor=factor,
                                   conv_context=cnn_module_kernel // 2 * factor)
        if not 0.0 <= chunk_exit_prob <= 1.0:
            raise ValueError(f"chunk_exit_prob must be in [0, 1], got {chunk_exit_prob}")
        self.chunk_exit_prob = chunk_exit_prob

    @staticmethod
    def _make_layer(layer_type: str, hp: dict, skip_rate: Optional[float] = None) -> nn.Module:
        """One layer; ``skip_rate`` overrides a Zipformer layer's scheduled layer-skip rate."""
        if layer_type == "conformer":
            return ConformerLayer(hp["d_model"], hp["num_heads"], hp["feedforward_dim"], hp["cnn_module_kernel"],
                                  hp["dropout"], hp["pos_encoding"], hp["conv_norm"])
        from splitformer.model.zipformer import Zipformer2EncoderLayer

        # the regularisers are passed only when on, so the DESIGN.md signature is all that is required otherwise
        extra = {k: True for k in ("use_balancers", "use_whiten", "causal") if hp[k]}
        if skip_rate is not None:
            extra["bypass_skip_rate"] = skip_rate
        return ZipformerLayerAdapter(Zipformer2EncoderLayer(
            embed_dim=hp["d_model"], pos_dim=hp["pos_dim"], num_heads=hp["num_heads"],
            query_head_dim=hp["query_head_dim"], pos_head_dim=hp["pos_head_dim"],
            value_head_dim=hp["value_head_dim"], feedforward_dim=hp["feedforward_dim"], dropout=hp["dropout"],
            cnn_module_kernel=hp["cnn_module_kernel"], **extra))

    @staticmethod
    def _make_norm(layer_type: str, dim: int) -> nn.Module:
        if layer_type == "conformer":
            return nn.LayerNorm(dim)
        from splitformer.model.scaling import BiasNorm

        return BiasNorm(dim)

    def _pos_emb(self, x: Tensor) -> Optional[Tensor]:
        """Relative position embeddings for a ``(B, T, C)`` input of this length; None with absolute positions."""
        if self.layer_type == "zipformer":
            return self.pos_enc(x.transpose(0, 1))
        if self.pos_encoding == "rel":
            return self.pos_enc(x)
        return None

    def block_layers(self, block: int) -> range:
        """Indices into ``self.layers`` of block ``block``."""
        start = self.exits[block - 1] if block > 0 else 0
        return range(start, self.exits[block])

    def num_exits_upto(self, max_exit: Optional[int]) -> int:
        """How many exits sit at or below layer ``max_exit`` (all when None)."""
        if max_exit is None:
            return len(self.exits)
        n = sum(1 for e in self.exits if e <= max_exit)
        if n == 0:
            raise ValueError(f"max_exit={max_exit} is below the first exit; exits are {self.exits}")
        return n

    def iter_exits(self, x: Tensor, x_lens: Tensor, max_exit: Optional[int] = None,
                   chunk_exits: Optional[Tensor] = None) -> Iterator[Tuple[Tensor, Tensor]]:
        """Yields ``(out (B, T', D), out_lens)`` for ``self.exits[0], self.exits[1], ...`` one at a time: the
        items of ``forward``, lazily (AsrModel.iter_exits zips them with ``exits``).

        The layers of block i+1 run only when the consumer asks for the next item, so a dynamic exit
        strategy that stops iterating never pays for the layers above its exit. ``chunk_exits``: (B, N) the
        exit index each chunk of the current chunking stopped at (per-chunk dynamic exits): the masked
        computation that a stream with those decisions runs (:class:`StackContext`).
        """
        n = self.num_exits_upto(max_exit)
        x, lens = self.prepare(x, x_lens)
        ctx = self.block_context(x, lens, chunk_exits)
        for block in range(n):
            x, out = self.run_block(block, x, lens, ctx)
            yield out, lens

    def climb(self, x: Tensor, x_lens: Tensor) -> Generator[Tuple[Tensor, Tensor], Optional[Tensor], None]:
        """:meth:`iter_exits` for a batch that rows leave (see ``AsrModel.climb``): after each exit, ``send`` the
        indices of the rows that go on; the next blocks run on those rows only, trimmed to their longest, with
        their own padding and positions (what each would get in a batch of its own kind)."""
        x, lens = self.prepare(x, x_lens)
        ctx = self.block_context(x, lens)
        for block in range(len(self.exits)):
            x, out = self.run_block(block, x, lens, ctx)
            keep = yield out, lens
            if keep is not None and keep.numel() < x.size(0):
                lens = lens[keep]
                x = x[keep, : int(lens.max())] if keep.numel() else x[keep]
                ctx = self.block_context(x, lens)

    def prepare(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        """Front-end output -> the stack's input (projection, input downsampling, absolute positions)."""
        if x.dim() != 3 or x.size(-1) != self.input_dim:
            raise ValueError(f"EarlyExitEncoder expects (B, T, {self.input_dim}) input, got {tuple(x.shape)}")
        if self.input_proj is not None:
            x = self.input_proj(x)
        x, lens = self.input_downsample(x, x_lens)
        if self.pos_encoding == "abs":
            x = self.pos_enc(x)
        return x, lens

    def block_context(self, x: Tensor, lens: Tensor, chunk_exits: Optional[Tensor] = None) -> StackContext:
        """What every block of this (prepared) input shares: padding, positions, this forward's chunking."""
        chunking = self.chunks.current(self.training).at_rate(self.input_factor)
        depth = None
        if chunk_exits is None and self.training and not chunking.full and self.chunk_exit_prob > 0.0 \
                and random.random() < self.chunk_exit_prob:
            # train for per-chunk exits: every chunk stops at a random exit, the blocks above see it absent
            n = -(-x.size(1) // chunking.chunk)
            chunk_exits = torch.randint(0, len(self.exits), (x.size(0), n), device=x.device)
        if chunk_exits is not None:
            if chunking.full:
                raise ValueError("chunk_exits needs a chunked forward (chunks.set(chunk, left) on a causal model)")
            depth = chunk_exits.gather(1, chunk_index(x.size(1), chunking.chunk, x.device).unsqueeze(0)
                                       .expand(x.size(0), -1).clamp(max=chunk_exits.size(1) - 1))
        return StackContext(make_pad_mask(lens, x.size(1)), self._pos_emb(x), chunking,
                            chunk_attn_mask(x.size(1), chunking, x.device), depth)

    def run_block(self, block: int, x: Tensor, lens: Tensor, ctx: StackContext) -> Tuple[Tensor, Tensor]:
        """One block (the layers up to its exit, and its Splitformer branch): (state for the next block,
        this exit's normalised output). ``prepare`` and ``run_block`` let a deployment run one block at a time."""
        block_in = x
        attn_mask, absent = ctx.block_attn_mask(block), ctx.absent(block)
        for i in self.block_layers(block):
            if attn_mask is None:
                x = self.layers[i](x, ctx.pad, ctx.pos_emb)
            else:
                x = self.layers[i](x, ctx.pad, ctx.pos_emb, attn_mask, ctx.chunking.chunk, absent)
        branch = self.branches[str(block)] if block in self.split_blocks else None
        if branch is not None:
            x = branch(block_in, x, lens, self._pos_emb, ctx.chunking, absent)
        return x, self.exit_norms[block](x)

    def forward(self, x: Tensor, x_lens: Tensor, max_exit: Optional[int] = None,
                chunk_exits: Optional[Tensor] = None) -> List[Tuple[Tensor, Tensor]]:
        """``[(out (B, T', D), out_lens)]`` for every exit ``<= max_exit`` (all if None), in order."""
        return list(self.iter_exits(x, x_lens, max_exit, chunk_exits))

    # ------------------------------------------------------------------ streaming
    def init_block_states(self, batch: int, left: int, device: torch.device = torch.device("cpu"),
                          dtype: torch.dtype = torch.float32) -> List[List[Tensor]]:
        """Per block, what a stream that has heard nothing carries: ``[valid (B, L) bool, the six caches of
        each layer of the block, then those of its branch's layers]``; L = ``left`` frames of left context
        at the front end's rate, divided by the input downsampling (the branch's caches hold L / factor)."""
        if not self.chunks.causal:
            raise RuntimeError("streaming needs a causal encoder (train with --causal true)")
        if left <= 0:
            raise ValueError("streaming needs a finite left context (--left-context-frames > 0)")
        from splitformer.model.chunking import check_chunking

        check_chunking((self.chunks.chunk_factor,), (left,), self.chunks.chunk_factor)
        n = left // self.input_factor
        states = []
        for block in range(len(self.exits)):
            st = [torch.zeros(batch, n, dtype=torch.bool, device=device)]
            for i in self.block_layers(block):
                st += self.layers[i].layer.init_cache(batch, n, device, dtype)
            if block in self.split_blocks:
                branch = self.branches[str(block)]
                for layer in branch.layers:
                    st += layer.layer.init_cache(batch, n // branch.factor, device, dtype)
            states.append(st)
        return states

    def stream_block(self, block: int, h: Tensor, lens: Tensor, state: Sequence[Tensor]
                     ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """One chunk through one block (eval only). h: (B, T, D), the chunk at the stack's rate (the
        previous block's output, or ``prepare``'s); lens: (B,) its frames that belong to each stream; state:
        this block's, as :meth:`init_block_states` lays it out. Returns (input of the next block, this exit's
        normalised output, the block's next state); equals ``run_block`` over the whole utterance with the
        chunk mask."""
        valid, caches = state[0], state[1:]
        t = h.size(1)
        pad = make_pad_mask(lens, t)
        x = h.transpose(0, 1)
        pos_emb = self.pos_enc(x, left=valid.size(1))
        key_mask = torch.cat([~valid, pad], dim=1)
        new: List[Tensor] = [torch.cat([valid, ~pad], dim=1)[:, t:]]
        k = 0
        for i in self.block_layers(block):
            x, c = self.layers[i].layer.streaming_forward(x, pos_emb, caches[k:k + 6], key_mask, pad)
            new += c
            k += 6
        x = x.transpose(0, 1)
        if block in self.split_blocks:
            branch = self.branches[str(block)]
            f = branch.factor
            y, y_lens = branch.downsample(h, lens)
            y_pad = make_pad_mask(y_lens, y.size(1))
            y_mask = torch.cat([~valid[:, ::f], y_pad], dim=1)
            y = y.transpose(0, 1)
            y_pos = self.pos_enc(y, left=valid.size(1) // f)
            for layer in branch.layers:
                y, c = layer.layer.streaming_forward(y, y_pos, caches[k:k + 6], y_mask, y_pad)
                new += c
                k += 6
            x = branch.merge(y.transpose(0, 1), x)
        return x, self.exit_norms[block](x), new

    def stream_skip(self, block: int, state: Sequence[Tensor], frames: int) -> List[Tensor]:
        """The state of a block that a chunk of ``frames`` (at the stack's rate) did not reach: time moves
        on, and the chunk enters the caches as absent (masked keys, zeros in the convolutions)."""
        valid = state[0]
        b = valid.size(0)
        out = [torch.cat([valid[:, frames:], valid.new_zeros(b, min(frames, valid.size(1)))], dim=1)]
        n_main = 6 * len(self.block_layers(block))
        for j, c in enumerate(state[1:]):
            f = frames if j < n_main else frames // self.branches[str(block)].factor
            if j % 6 < 4:  # (L, B, D): keys and values, one slot per frame
                out.append(torch.cat([c[min(f, c.size(0)):], c.new_zeros((min(f, c.size(0)),) + c.shape[1:])], 0))
            else:  # (B, D, kernel // 2): the causal convolution's last inputs
                out.append(torch.cat([c, c.new_zeros(c.shape[:2] + (f,))], dim=2)[:, :, f:])
        return out


class Splitformer(EarlyExitEncoder):
    """EarlyExitEncoder with Splitformer branches in the first and last blocks by default (Lasbordes et al. 2025)."""

    def __init__(self, *args, split_blocks: Sequence[int] = (0, -1), **kwargs) -> None:
        super().__init__(*args, split_blocks=split_blocks, **kwargs)
