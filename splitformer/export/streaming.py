"""Streaming ONNX files of a causal model (``export.py --streaming true``), for one chunk size and left context.

Written into ``<output-dir>/streaming/``, with copies of ``decoder.onnx``, ``joiner.onnx`` and ``tokens.txt`` so
that the folder is a complete model:

* ``encoder-exit<k>.onnx`` and ``ctc-exit<k>.onnx``: what sherpa-onnx's ``OnlineRecognizer`` loads as a
  ``zipformer2`` transducer encoder and a ``zipformer2_ctc`` model. Inputs, by position: ``x (N, T, 80)`` (T fbank
  frames: the chunk's and the front end's look-ahead), six caches per layer, the front end's cache and
  ``processed_lens (N,)`` int64; outputs: ``encoder_out (N, chunk', joiner_dim)`` (projected for the shared joiner)
  or ``log_probs (N, chunk', V)``, then the same states, updated. The states follow sherpa-onnx's layout:
  keys ``(L, N, H*dq)``, non-linear attention values ``(1, N, L, 3D/4)``, values ``(L, N, H*dv)`` twice,
  convolution caches ``(N, D, kernel//2)`` twice, the front end's ``(N, 128, 3, 19)`` (a pass-through for the x4
  Conv1d front end, which needs none) and ``processed_lens``. Metadata describes the layers as "stacks"
  (``encoder_dims``, ``num_encoder_layers``, ``left_context_len``, ...): a Zipformer2's own stacks; for an
  early-exit model the main layers up to exit k as one stack at the input rate, then each Splitformer branch
  below exit k as a stack of its own at half the left context. ``T`` and ``decode_chunk_len`` say how many frames
  a call reads and by how many the stream moves on.
* ``stem.onnx`` and ``block<i>.onnx`` (early-exit models): the per-block streaming form, for a driver that picks
  the exit per chunk (``examples/onnx_decode.py --streaming``). ``stem``: ``x, embed_state -> h (N, chunk', D),
  new_embed_state[, pos_emb]``; ``block<i>``: ``h, valid (N, L') bool, the block's caches in the layers' own layout
  (keys and values ``(L', N, .)``, non-linear attention values ``(L', N, 3D/4)``, convolutions ``(N, D,
  kernel//2)``; the branch's after the block's)[, pos_emb] -> next, [encoder_out], [log_probs], new_valid, new
  caches``. ``pos_emb`` (Zipformer layers): ``(1, 2 chunk' + L' - 1, pos_dim)``, the same for every chunk, the
  position table's rows for a chunk after L' cached frames; the stem holds it once and each block reads the
  stem's output of that name (blocks.py). A block that a chunk does not reach is moved on by the driver: its
  caches shift by chunk' frames, zeros in, and ``valid`` marks them absent (``EarlyExitEncoder.stream_skip``).

A stream's last partial chunk is padded by the caller (sherpa-onnx and the example pad the audio); the files see
only whole chunks. Every file is checked against PyTorch's chunk-by-chunk computation after export.
"""
import contextlib
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from splitformer.export.blocks import SHARED_POSITIONS, has_position_table, positions_from, stem_positions
from splitformer.export.common import ExportError, add_metadata, architecture_name, common_metadata, export_onnx
from splitformer.model.asr_model import AsrModel
from splitformer.model.streaming import StreamingEncoder

SHERPA_EMBED_SHAPE = (128, 3, 19)  # the front-end cache sherpa-onnx allocates (icefall's ConvNeXt cache)


def default_chunking(model: AsrModel) -> Tuple[int, int]:
    """(chunk, left): the model's smallest finite training chunk and four chunks of left context."""
    chunks = [c for c in model.encoder.chunks.chunk_sizes if c > 0]
    if not chunks:
        raise ExportError("the model was trained with --chunk-size -1 only; give --chunk-size and --left-context-frames")
    return min(chunks), 4 * min(chunks)


class _Layout:
    """Where each layer's caches sit in the flat list of states, and what the metadata says about each stack."""

    def __init__(self, model: AsrModel, exit_layer: int, left: int) -> None:
        enc = model.encoder
        self.model = model
        self.early_exit = hasattr(enc, "stream_block")
        # (layers as ZipformerLayer objects, left context at their rate)
        self.stacks: List[Tuple[List[nn.Module], int]] = []
        if self.early_exit:
            n_blocks = model.exits.index(exit_layer) + 1
            self.blocks = list(range(n_blocks))
            lp = left // enc.input_factor
            self.stacks.append(([enc.layers[i].layer for b in self.blocks for i in enc.block_layers(b)], lp))
            for b in self.blocks:
                if b in enc.split_blocks:
                    br = enc.branches[str(b)]
                    self.stacks.append(([layer.layer for layer in br.layers], lp // br.factor))
        else:
            for stack, ds in zip(enc.encoders, enc.downsampling_factor):
                inner = stack.encoder if hasattr(stack, "encoder") else stack
                self.stacks.append((list(inner.layers), left // ds))

    def metadata(self) -> Dict[str, str]:
        def join(values: Sequence[int]) -> str:
            return ",".join(str(int(v)) for v in values)

        layers = [s[0][0] for s in self.stacks]
        attn = [layer.self_attn_weights for layer in layers]
        return dict(
            encoder_dims=join(layer.embed_dim for layer in layers),
            query_head_dims=join(a.query_head_dim for a in attn),
            value_head_dims=join(layer.self_attn1.in_proj.out_features // a.num_heads for layer, a in zip(layers, attn)),
            num_heads=join(a.num_heads for a in attn),
            num_encoder_layers=join(len(s[0]) for s in self.stacks),
            cnn_module_kernels=join(2 * layer.conv_module1.depthwise_conv.half + 1 for layer in layers),
            left_context_len=join(s[1] for s in self.stacks),
        )

    def init_states(self, batch: int) -> List[Tensor]:
        """sherpa-onnx's zeros, in its layout (non-linear attention values as (1, N, L, D))."""
        out = []
        for layers, left in self.stacks:
            for layer in layers:
                c = layer.init_cache(batch, left, torch.device("cpu"))
                c[1] = c[1].transpose(0, 1).unsqueeze(0)
                out += c
        return out


def _ours(c: Sequence[Tensor]) -> List[Tensor]:
    """A layer's six caches in sherpa-onnx's layout -> the layer's own."""
    return [c[0], c[1].squeeze(0).transpose(0, 1), *c[2:]]


def _sherpa(c: Sequence[Tensor]) -> List[Tensor]:
    return [c[0], c[1].transpose(0, 1).unsqueeze(0), *c[2:]]


class StreamingExit(nn.Module):
    """One chunk through the front end and the encoder up to one exit, with sherpa-onnx's inputs and outputs."""

    def __init__(self, model: AsrModel, exit_layer: int, chunk: int, left: int, head: str) -> None:
        super().__init__()
        self.model = model
        self.exit_layer = exit_layer
        self.head = head
        self.enc = StreamingEncoder(model, chunk, left)
        self.layout = _Layout(model, exit_layer, left)
        self.conv2d = self.enc.front.init_cache(1) is not None

    def forward(self, x: Tensor, *states: Tensor) -> Tuple[Tensor, ...]:
        model, enc, enc_model = self.model, self.enc, self.model.encoder
        caches, embed, processed = list(states[:-2]), states[-2], states[-1]
        n = x.size(0)
        remaining = torch.full((n,), enc.chunk + 8, dtype=torch.int64)  # every frame of the chunk is real
        front_cache = embed if self.conv2d else None
        h, new_front = enc.front.streaming_forward(model.normalize(x), front_cache, remaining)
        lens = torch.full((n,), enc.chunk, dtype=torch.int64)
        new: List[Tensor] = []
        if self.layout.early_exit:
            x_, x_lens = enc_model.prepare(h, lens)
            per_layer = [_ours(caches[6 * i: 6 * i + 6]) for i in range(len(caches) // 6)]
            main, branches = per_layer[: len(self.layout.stacks[0][0])], per_layer[len(self.layout.stacks[0][0]):]
            left = self.layout.stacks[0][1]
            fed = torch.div(processed, enc_model.input_factor, rounding_mode="floor")
            valid = torch.arange(left).unsqueeze(0) >= (left - fed).unsqueeze(1)
            new_main: List[List[Tensor]] = []
            new_branch: List[List[Tensor]] = []
            for b in self.layout.blocks:
                k = len(enc_model.block_layers(b))
                state = [valid] + [c for layer in main[:k] for c in layer]
                main = main[k:]
                nb = len(enc_model.branches[str(b)].layers) if b in enc_model.split_blocks else 0
                state += [c for layer in branches[:nb] for c in layer]
                branches = branches[nb:]
                x_, out, st = enc_model.stream_block(b, x_, x_lens, state)
                flat = st[1:]
                new_main += [flat[6 * i: 6 * i + 6] for i in range(k)]
                new_branch += [flat[6 * (k + i): 6 * (k + i) + 6] for i in range(nb)]
            for c in new_main + new_branch:
                new += _sherpa(c)
        else:
            nested, i = [], 0
            for layers, _ in self.layout.stacks:
                nested.append([_ours(caches[6 * (i + j): 6 * (i + j) + 6]) for j in range(len(layers))])
                i += len(layers)
            out, _, st = enc_model.streaming_forward(h, lens, nested, processed)
            for stack in st:
                for c in stack:
                    new += _sherpa(c)
        y = model.project_encoder(out, self.exit_layer) if self.head == "transducer" else \
            model.ctc_log_probs(out, self.exit_layer)
        new_embed = new_front if self.conv2d else embed + 0.0  # a pass-through the exporter keeps as an input
        return (y, *new, new_embed, processed + enc.chunk)


def _state_names(layout: _Layout) -> List[str]:
    names, k = [], 0
    for layers, _ in layout.stacks:
        for _ in layers:
            names += [f"{n}_{k}" for n in ("cached_key", "cached_nonlin_attn", "cached_val1", "cached_val2",
                                           "cached_conv1", "cached_conv2")]
            k += 1
    return names + ["embed_states", "processed_lens"]


def _inputs(wrapper: StreamingExit, batch: int = 2) -> Tuple[Tensor, ...]:
    x = torch.randn(batch, wrapper.enc.input_frames, wrapper.model.feature_dim)
    embed = torch.zeros((batch,) + SHERPA_EMBED_SHAPE)
    return (x, *wrapper.layout.init_states(batch), embed, torch.zeros(batch, dtype=torch.int64))


def export_streaming_exit(model: AsrModel, args: Mapping[str, Any], exit_layer: int, chunk: int, left: int,
                          head: str, path: Path, opset: int) -> Path:
    """``encoder-exit<k>.onnx`` (head ``transducer``) or ``ctc-exit<k>.onnx`` (``ctc``) for sherpa-onnx."""
    wrapper = StreamingExit(model, exit_layer, chunk, left, head).eval()
    names = _state_names(wrapper.layout)
    out0 = "encoder_out" if head == "transducer" else "log_probs"
    axes: Dict[str, Dict[int, str]] = {"x": {0: "N"}, out0: {0: "N"}}
    for n, t in zip(names, _inputs(wrapper)[1:]):
        batch_axis = 1 if n.startswith(("cached_key", "cached_nonlin", "cached_val")) else 0
        axes[n] = {batch_axis: "N"}
        axes["new_" + n] = {batch_axis: "N"}
    export_onnx(wrapper, _inputs(wrapper), path, ["x"] + names, [out0] + ["new_" + n for n in names], axes, opset)
    enc = wrapper.enc
    add_metadata(path, dict(
        common_metadata(model, args), model_type="zipformer2" if head == "transducer" else "zipformer2_ctc",
        exit_layer=exit_layer, T=enc.input_frames, decode_chunk_len=enc.shift, chunk_size=chunk,
        left_context_frames=left, streaming="1", context_size=model.decoder.context_size if model.use_transducer else 0,
        comment=f"streaming {architecture_name(args)} {'encoder' if head == 'transducer' else 'CTC model'} up to layer "
                f"{exit_layer}: chunks of {chunk} frames, {left} frames of left context",
        **wrapper.layout.metadata()))
    return path


# ---------------------------------------------------------------- the per-block streaming form
class StreamingStem(nn.Module):
    """x (N, T, 80), embed_state -> h (N, chunk', D) (front end, input projection and downsampling), new state, and
    with a position table, ``pos_emb``: the table's slice for a chunk after the left context, which every streaming
    block reads (blocks.py: the table is shipped once)."""

    def __init__(self, model: AsrModel, chunk: int, left: int) -> None:
        super().__init__()
        self.model = model
        self.enc = StreamingEncoder(model, chunk, left)
        self.conv2d = self.enc.front.init_cache(1) is not None
        self.positions = has_position_table(model)
        self.left = left // model.encoder.input_factor  # the blocks' left context, at the stack's rate

    def forward(self, x: Tensor, embed: Tensor) -> Tuple[Tensor, ...]:
        n = x.size(0)
        remaining = torch.full((n,), self.enc.chunk + 8, dtype=torch.int64)
        h, new = self.enc.front.streaming_forward(self.model.normalize(x), embed if self.conv2d else None, remaining)
        h, _ = self.model.encoder.prepare(h, torch.full((n,), self.enc.chunk, dtype=torch.int64))
        outs = (h, new if self.conv2d else embed + 0.0)
        return (outs + (stem_positions(self.model.encoder, h, self.left),)) if self.positions else outs


class StreamingBlock(nn.Module):
    """One block on one chunk: h, valid, caches[, pos_emb] -> next, [encoder_out], [log_probs], new valid, new
    caches. With a position table, the positions are the streaming stem's ``pos_emb`` (the last input)."""

    def __init__(self, model: AsrModel, block: int) -> None:
        super().__init__()
        self.model = model
        self.block = block
        self.exit_layer = model.exits[block]
        self.positions = has_position_table(model)

    def forward(self, h: Tensor, valid: Tensor, *rest: Tensor) -> Tuple[Tensor, ...]:
        lens = torch.full((h.size(0),), h.size(1), dtype=torch.int64)
        enc = self.model.encoder
        caches = rest[:-1] if self.positions else rest
        given = positions_from(enc, rest[-1], h.shape[1]) if self.positions else contextlib.nullcontext()
        with given:
            nxt, out, new = enc.stream_block(self.block, h, lens, [valid, *caches])
        outs = [nxt]
        if self.model.use_transducer:
            outs.append(self.model.project_encoder(out, self.exit_layer))
        if self.model.use_ctc:
            outs.append(self.model.ctc_log_probs(out, self.exit_layer))
        return (*outs, *new)


def block_cache_names(model: AsrModel, block: int) -> List[str]:
    enc = model.encoder
    n = len(enc.block_layers(block)) + (len(enc.branches[str(block)].layers) if block in enc.split_blocks else 0)
    return [f"{c}_{i}" for i in range(n) for c in ("key", "nonlin", "val1", "val2", "conv1", "conv2")]


def export_streaming_blocks(model: AsrModel, args: Mapping[str, Any], chunk: int, left: int, out_dir: Path,
                            opset: int) -> Dict[str, Path]:
    enc = model.encoder
    if not hasattr(enc, "stream_block"):
        return {}
    files: Dict[str, Path] = {}
    stem = StreamingStem(model, chunk, left).eval()
    x = torch.randn(2, stem.enc.input_frames, model.feature_dim)
    embed = torch.zeros((2,) + SHERPA_EMBED_SHAPE)
    path = out_dir / "stem.onnx"
    shared = [SHARED_POSITIONS] if stem.positions else []  # the stem outputs every block reads by the same name
    export_onnx(stem, (x, embed), path, ["x", "embed_state"], ["h", "new_embed_state"] + shared,
                {"x": {0: "N"}, "embed_state": {0: "N"}, "h": {0: "N"}, "new_embed_state": {0: "N"}}, opset)
    meta = dict(common_metadata(model, args), T=stem.enc.input_frames, decode_chunk_len=stem.enc.shift,
                chunk_size=chunk, left_context_frames=left, num_blocks=len(model.exits),
                out_frames=stem.enc.out_frames, streaming="1")
    add_metadata(path, dict(meta, model_type="splitformer_streaming_stem"))
    files["stem"] = path
    with torch.no_grad():
        h, _, *pos = stem(x, embed)
    states = enc.init_block_states(2, left)
    outs = (["next"] + (["encoder_out"] if model.use_transducer else []) + (["log_probs"] if model.use_ctc else []))
    for b, e in enumerate(model.exits):
        names = block_cache_names(model, b)
        axes = {"h": {0: "N"}, "valid": {0: "N"}, "new_valid": {0: "N"}, **{o: {0: "N"} for o in outs}}
        for i, n in enumerate(names):
            ax = 1 if i % 6 < 4 else 0
            axes[n] = {ax: "N"}
            axes["new_" + n] = {ax: "N"}
        path = out_dir / f"block{b}.onnx"
        export_onnx(StreamingBlock(model, b).eval(), (h, *states[b], *pos), path, ["h", "valid"] + names + shared,
                    outs + ["new_valid"] + ["new_" + n for n in names], axes, opset)
        add_metadata(path, dict(meta, model_type="splitformer_streaming_block", block=b, exit_layer=e,
                                context_size=model.decoder.context_size if model.use_transducer else 0,
                                left_context_len=states[b][0].shape[1]))
        files[f"block{b}"] = path
        with torch.no_grad():
            h = StreamingBlock(model, b).eval()(h, *states[b], *pos)[0]
    return files


# ---------------------------------------------------------------- everything --streaming writes, checked
def export_streaming(model: AsrModel, args: Mapping[str, Any], exits: Sequence[int], out_dir: Path, opset: int,
                     chunk: Optional[int] = None, left: Optional[int] = None, check: bool = True,
                     tolerance: float = 1e-3, shared: Optional[Mapping[str, Path]] = None, log=print
                     ) -> Dict[str, Path]:
    """The streaming files of ``exits`` in ``out_dir`` (see the module docstring); ``shared``: decoder, joiner
    and tokens files already written, copied in so that the folder is a complete model."""
    if not model.causal:
        raise ExportError("--streaming true needs a causal model (train with --causal true)")
    if chunk is None or left is None:
        c, l = default_chunking(model)
        chunk, left = chunk or c, left or l
    try:
        StreamingEncoder(model, chunk, left)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, Path] = {}
    with position_tables(model, chunk + left):
        files.update(_write(model, args, exits, chunk, left, out_dir, opset))
    for name, path in (shared or {}).items():
        dst = out_dir / path.name
        shutil.copyfile(path, dst)
        files[f"streaming/{name}"] = dst
    if check:
        from splitformer.export.checks import compare_streaming

        chunks = left // chunk + 2  # more than the left context holds: full caches, then rolling ones
        d = compare_streaming(model, files, chunk, left, exits, chunks=chunks)
        if d > tolerance:
            raise ExportError(f"the streaming ONNX files differ from PyTorch's chunk-by-chunk computation by {d:.3g} "
                              f"(> {tolerance})")
        log(f"streaming files (chunk {chunk}, left {left}): max |onnx - torch| = {d:.3g} over {chunks} "
            "chunks of 2 streams")
    return files


@contextlib.contextmanager
def position_tables(model: AsrModel, frames: int) -> Iterator[None]:
    """Relative-position tables cut to the ``frames`` (chunk + left context) a streaming call attends over, while
    tracing: the traced graph holds the table as a constant, and the offline export grew it for two minutes."""
    from splitformer.model.zipformer import CompactRelPositionalEncoding

    mods = [m for m in model.modules() if isinstance(m, CompactRelPositionalEncoding)]
    saved = [m._table for m in mods]
    try:
        for m in mods:
            m._table = None
            m._extend(frames, torch.device("cpu"), torch.float32)
        yield
    finally:
        for m, t in zip(mods, saved):
            m._table = t


def _write(model: AsrModel, args: Mapping[str, Any], exits: Sequence[int], chunk: int, left: int, out_dir: Path,
           opset: int) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for e in exits:
        if model.use_transducer:
            files[f"streaming/encoder-exit{e}"] = export_streaming_exit(
                model, args, e, chunk, left, "transducer", out_dir / f"encoder-exit{e}.onnx", opset)
        if model.use_ctc:
            files[f"streaming/ctc-exit{e}"] = export_streaming_exit(
                model, args, e, chunk, left, "ctc", out_dir / f"ctc-exit{e}.onnx", opset)
    files.update({f"streaming/{k}": v for k, v in export_streaming_blocks(model, args, chunk, left, out_dir, opset).items()})
    return files
