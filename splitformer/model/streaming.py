"""A causal model run chunk by chunk over a batch of live streams, with a state per stream.

:class:`StreamingEncoder` wraps an :class:`~splitformer.model.asr_model.AsrModel` trained with ``--causal true``
and fixes one chunk size and left context. Each call takes, for a batch of streams, the fbank frames of their
next chunk (with the front end's look-ahead) and their states, and returns what the encoder says about the
chunk. An early-exit encoder is run block by block (:meth:`prepare`, :meth:`block`, :meth:`skip`) so that the
caller can stop a chunk at any exit; the blocks above it then record the chunk as absent
(``EarlyExitEncoder.stream_skip``), which is exactly the masked whole-utterance computation that
``EarlyExitEncoder.forward(..., chunk_exits=...)`` runs.

State: a :class:`StreamState` holds every tensor batch-first, so that streams can be selected, updated and
appended with one indexing operation per tensor whatever the model (the layers keep their time-major caches;
the transposes here are views).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from splitformer.model.chunking import check_chunking


def _time_major(j: int) -> bool:
    """Whether entry ``j`` of a layer's six caches is (L, B, D) (keys and values) rather than batch-first."""
    return j % 6 < 4


@dataclass
class StreamState:
    """Per-stream state of a batch of streams, every tensor with the streams on dim 0.

    ``front``: the front end's cache (None for a stateless front end); ``parts``: the encoder's caches, one
    list per block (early exit) or per stack (Zipformer2); ``processed``: (B,) frames each stream has been
    through at the front end's output rate.
    """

    front: Optional[Tensor]
    parts: List[List[Tensor]]
    processed: Tensor
    chunks: Tensor = field(default=None)  # (B,) chunks done per stream

    def __post_init__(self) -> None:
        if self.chunks is None:
            self.chunks = torch.zeros_like(self.processed)

    @property
    def batch(self) -> int:
        return int(self.processed.shape[0])

    def select(self, idx: Tensor) -> "StreamState":
        """The streams at ``idx`` (a copy)."""
        return StreamState(None if self.front is None else self.front.index_select(0, idx),
                           [[t.index_select(0, idx) for t in part] for part in self.parts],
                           self.processed.index_select(0, idx), self.chunks.index_select(0, idx))

    def split(self) -> List["StreamState"]:
        """One state per stream, each a view into this one (no copy: cheaper than a :meth:`select` per stream)."""
        n = self.batch
        front = [None] * n if self.front is None else list(self.front.split(1))
        parts = [[list(t.split(1)) for t in part] for part in self.parts]
        return [StreamState(front[i], [[ts[i] for ts in part] for part in parts], self.processed[i: i + 1],
                            self.chunks[i: i + 1]) for i in range(n)]

    def assign(self, idx: Tensor, sub: "StreamState") -> None:
        """Write ``sub`` (the streams at ``idx``) back in place."""
        if self.front is not None:
            self.front.index_copy_(0, idx, sub.front)
        for part, new in zip(self.parts, sub.parts):
            for t, n in zip(part, new):
                t.index_copy_(0, idx, n)
        self.processed.index_copy_(0, idx, sub.processed)
        self.chunks.index_copy_(0, idx, sub.chunks)

    @staticmethod
    def cat(states: Sequence["StreamState"]) -> "StreamState":
        first = states[0]
        return StreamState(None if first.front is None else torch.cat([s.front for s in states]),
                           [[torch.cat([s.parts[p][j] for s in states]) for j in range(len(part))]
                            for p, part in enumerate(first.parts)],
                           torch.cat([s.processed for s in states]), torch.cat([s.chunks for s in states]))


def batch_first(caches: Sequence[Tensor]) -> List[Tensor]:
    """Layers' caches (six a layer, in order) in the layers' layout -> batch-first views."""
    return [c.transpose(0, 1) if _time_major(j) else c for j, c in enumerate(caches)]


layer_layout = batch_first  # the transpose is its own inverse


class StreamingEncoder:
    """A causal AsrModel's front end and encoder, one chunk at a time, for a batch of streams.

    ``chunk`` and ``left`` are in frames at the front end's output rate (``--chunk-size``,
    ``--left-context-frames``). ``out_frames``: encoder output frames per chunk; ``input_frames`` and
    ``shift``: fbank frames read per chunk and by how many consecutive chunks' reads are apart.
    """

    def __init__(self, model, chunk: int, left: int) -> None:
        enc = model.encoder
        chunks = getattr(enc, "chunks", None)
        if chunks is None or not chunks.causal:
            raise ValueError("streaming needs a causal model: train it with --causal true (this one attends to "
                             "the whole utterance)")
        if chunk <= 0 or left <= 0:
            raise ValueError(f"streaming needs a finite chunk and left context, got --chunk-size {chunk} "
                             f"--left-context-frames {left}")
        check_chunking((chunk,), (left,), chunks.chunk_factor, chunks.conv_context, allow_full=False)
        self.model = model
        self.chunk = chunk
        self.left = left
        self.front = model.encoder_embed
        self.input_frames = self.front.chunk_input(chunk)
        self.shift = self.front.chunk_shift(chunk)
        self.early_exit = hasattr(enc, "stream_block")
        if self.early_exit:
            self.out_frames = chunk // enc.input_factor
        else:
            self.out_frames = chunk // enc.output_downsampling_factor
        self.exits = list(model.exits)

    # ------------------------------------------------------------------ state
    def init_state(self, batch: int, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> StreamState:
        enc = self.model.encoder
        if self.early_exit:
            parts = [b[:1] + batch_first(b[1:]) for b in enc.init_block_states(batch, self.left, device, dtype)]
        else:
            parts = [[c for layer in stack for c in batch_first(layer)] for stack in
                     enc.init_states(batch, self.left, device, dtype)]
        return StreamState(self.front.init_cache(batch, device, dtype), parts,
                           torch.zeros(batch, dtype=torch.int64, device=device))

    def output_lengths(self, num_frames: Tensor) -> Tensor:
        """Encoder output frames of a whole utterance of ``num_frames`` fbank frames (as ``model.encode``)."""
        enc = self.model.encoder
        t = self.front.output_lengths(num_frames)
        factor = enc.input_factor if self.early_exit else enc.output_downsampling_factor
        return torch.div(t.clamp(min=0) + factor - 1, factor, rounding_mode="floor")

    # ------------------------------------------------------------------ the front end
    def front_step(self, feats: Tensor, state: StreamState, remaining: Tensor) -> Tuple[Tensor, Tensor]:
        """feats: (B, input_frames, 80) fbank; remaining: (B,) front-end output frames each stream still has
        from this chunk's first (a large number while it goes on). Returns the chunk (B, chunk, D) at the
        front end's rate, its valid lengths, and updates the front cache in ``state``."""
        h, state.front = self.front.streaming_forward(self.model.normalize(feats), state.front, remaining)
        return h, remaining.clamp(min=0, max=self.chunk)

    # ------------------------------------------------------------------ Zipformer2
    def encode(self, h: Tensor, lens: Tensor, state: StreamState) -> Tuple[Tensor, Tensor]:
        """A one-exit (Zipformer2) encoder: the chunk's output (B, out_frames, D) and lengths; the state
        moves on by one chunk."""
        enc = self.model.encoder
        states = []
        for part in state.parts:
            states.append([layer_layout(part[i: i + 6]) for i in range(0, len(part), 6)])
        out, out_lens, new = enc.streaming_forward(h, lens, states, state.processed)
        state.parts = [[c for layer in stack for c in batch_first(layer)] for stack in new]
        self._advance(state)
        return out, out_lens

    # ------------------------------------------------------------------ early exit
    def prepare(self, h: Tensor, lens: Tensor) -> Tuple[Tensor, Tensor]:
        """The front end's chunk -> the early-exit stack's input (projection, input downsampling)."""
        return self.model.encoder.prepare(h, lens)

    def block(self, block: int, x: Tensor, lens: Tensor, state: StreamState) -> Tuple[Tensor, Tensor]:
        """One block on the chunk of every stream in ``state``: (next block's input, this exit's output)."""
        part = state.parts[block]
        nxt, out, new = self.model.encoder.stream_block(block, x, lens, part[:1] + layer_layout(part[1:]))
        state.parts[block] = new[:1] + batch_first(new[1:])
        return nxt, out

    def skip(self, block: int, state: StreamState) -> None:
        """The chunk did not reach ``block`` for the streams in ``state``: it enters its caches as absent."""
        part = state.parts[block]
        new = self.model.encoder.stream_skip(block, part[:1] + layer_layout(part[1:]), self.out_frames)
        state.parts[block] = new[:1] + batch_first(new[1:])

    def finish_chunk(self, state: StreamState) -> None:
        """Every block has run or been skipped for this chunk: the streams move on."""
        self._advance(state)

    def chunk_all_exits(self, feats: Tensor, state: StreamState, remaining: Tensor) -> Dict[int, Tensor]:
        """One chunk through the front end and every block: each exit's output (B, out_frames, D). The
        reference that exports and tests compare against."""
        h, lens = self.front_step(feats, state, remaining)
        exits = list(self.model.exits)
        if not self.early_exit:
            return {exits[-1]: self.encode(h, lens, state)[0]}
        x, x_lens = self.prepare(h, lens)
        outs = {}
        for b, e in enumerate(exits):
            x, outs[e] = self.block(b, x, x_lens, state)
        self.finish_chunk(state)
        return outs

    def _advance(self, state: StreamState) -> None:
        state.processed = state.processed + self.chunk
        state.chunks = state.chunks + 1
