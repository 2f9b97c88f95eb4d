"""The per-block form of an early-exit model: ``stem.onnx`` and one ``block<i>.onnx`` per exit, so that a
deployment runs block after block and stops at the first confident exit (examples/onnx_decode.py
``--exit-strategy``).

A Zipformer-layer stack looks its relative positions up in one table (``CompactRelPositionalEncoding``), which a
traced graph holds as a constant sized for ``max_frames``. So that the table is shipped once and not in every
block, the stem holds it and hands the slice for this input on as an extra output, ``pos_emb``, which every block
takes as an input of the same name (:data:`SHARED_POSITIONS`); a Splitformer branch, at half the rate, reads the
centre of it (:class:`GivenPositions`). Conformer layers compute their positions from the length and share
nothing."""
import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from splitformer.export.common import ExportError, add_metadata, common_metadata, export_onnx
from splitformer.model.asr_model import AsrModel

# the stem output that every block reads as an input of the same name (Zipformer-layer stacks only)
SHARED_POSITIONS = "pos_emb"


def has_position_table(model: AsrModel) -> bool:
    """Whether the stack's layers read a cached position table (Zipformer layers): then the stem holds it."""
    from splitformer.model.zipformer import CompactRelPositionalEncoding

    return isinstance(getattr(model.encoder, "pos_enc", None), CompactRelPositionalEncoding)


class GivenPositions(nn.Module):
    """Stands in for the stack's ``CompactRelPositionalEncoding`` while a block runs on positions it was given.

    ``pos_emb`` (1, P, pos_dim) holds the offsets key - query from -(P - queries) to queries - 1, as the table gives
    them for ``queries`` frames after P + 1 - 2 * queries cached ones (P = 2T - 1 offline, 2T + L - 1 streaming).
    A call for t queries after ``left`` cached keys (the block's own, or its branch's at a lower rate) gets the
    slice of offsets -(t + left - 1)..t - 1, which ends ``queries - t`` rows before the end of ``pos_emb``."""

    def __init__(self, pos_emb: Tensor, queries: Any) -> None:
        super().__init__()
        self.pos_emb = pos_emb
        self.queries = queries

    def forward(self, x: Tensor, left: int = 0) -> Tensor:
        t = x.shape[0]
        end = self.pos_emb.shape[1] - self.queries + t
        return self.pos_emb[:, end - (2 * t + left - 1): end]


@contextlib.contextmanager
def positions_from(encoder: nn.Module, pos_emb: Tensor, queries: Any) -> Iterator[None]:
    """Within the block: the stack's positions come from ``pos_emb`` (see :class:`GivenPositions`), not its table."""
    table = encoder.pos_enc
    encoder.pos_enc = GivenPositions(pos_emb, queries)
    try:
        yield
    finally:
        encoder.pos_enc = table


def stem_positions(encoder: nn.Module, h: Tensor, left: int = 0) -> Tensor:
    """(1, 2T + left - 1, pos_dim): the table's slice for the T frames of ``h`` (N, T, D) after ``left`` cached
    ones; the table's centre (offset 0) sits at row T + left - 1."""
    return encoder.pos_enc(h.transpose(0, 1), left=left)


class Stem(nn.Module):
    """Features -> the early-exit stack's input state (front end, feature normalisation, input projection and
    downsampling), and with a position table, this input's slice of it: the first file of the per-block form."""

    def __init__(self, model: AsrModel) -> None:
        super().__init__()
        self.model = model
        self.positions = has_position_table(model)

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, ...]:
        h, lens = self.model.encoder_embed(self.model.normalize(x), x_lens)
        h, lens = self.model.encoder.prepare(h, lens)
        return (h, lens, stem_positions(self.model.encoder, h)) if self.positions else (h, lens)


class Block(nn.Module):
    """State -> (next state, this exit's joiner-ready output and/or CTC log-probs): one block of the stack,
    so that a deployment runs block after block and stops at the first confident exit. With a position table,
    the positions are the stem's ``pos_emb`` input: the block holds no table of its own."""

    def __init__(self, model: AsrModel, block: int) -> None:
        super().__init__()
        self.model = model
        self.block = block
        self.exit_layer = model.exits[block]
        self.positions = has_position_table(model)

    def forward(self, h: Tensor, h_lens: Tensor, *pos_emb: Tensor) -> Tuple[Tensor, ...]:
        enc = self.model.encoder
        # the stem's rows are centred on offset 0 (P = 2T - 1 for its T frames): a driver may trim the batch to a
        # shorter T' (rows that left at a lower exit) and still feed the stem's pos_emb
        given = positions_from(enc, pos_emb[0], (pos_emb[0].shape[1] + 1) // 2) if self.positions else \
            contextlib.nullcontext()
        with given:
            nxt, out = enc.run_block(self.block, h, h_lens, enc.block_context(h, h_lens))
        outs = [nxt]
        if self.model.use_transducer:
            outs.append(self.model.project_encoder(out, self.exit_layer))
        if self.model.use_ctc:
            outs.append(self.model.ctc_log_probs(out, self.exit_layer))
        return tuple(outs)


def block_output_names(model: AsrModel) -> List[str]:
    return ["next"] + (["encoder_out"] if model.use_transducer else []) + (["log_probs"] if model.use_ctc else [])


def stem_output_names(model: AsrModel) -> List[str]:
    return ["h", "h_lens"] + ([SHARED_POSITIONS] if has_position_table(model) else [])


def block_input_names(model: AsrModel) -> List[str]:
    """``h`` (the stem's ``h`` for block 0, the previous block's ``next`` after), then the stem's outputs of the
    same names: ``h_lens`` and, with a position table, ``pos_emb``."""
    return ["h", "h_lens"] + ([SHARED_POSITIONS] if has_position_table(model) else [])


def export_blocks(model: AsrModel, args: Mapping[str, Any], out_dir: Path, opset: int, example: Tuple[Tensor, Tensor],
                  extra_meta: Mapping[str, Any]) -> Dict[str, Path]:
    """The per-block form of an early-exit model: ``stem.onnx`` (``x, x_lens -> h, h_lens[, pos_emb]``) and
    ``block<i>.onnx`` (``h, h_lens[, pos_emb] -> next, [encoder_out], [log_probs]``), one per exit. A driver runs the
    stem, then block after block (``h`` of block i+1 = ``next`` of block i; ``h_lens`` and ``pos_emb`` are the
    stem's), and stops at the first confident exit: the blocks above it never run (examples/onnx_decode.py
    ``--exit-strategy``). ``pos_emb`` (1, 2T-1, pos_dim), T = the stem's ``h`` frames, is the stem's slice of the
    position table for this input, offsets -(T-1)..T-1; a block reads its centre rows for its own ``h``, so a
    driver that drops rows of the batch and trims ``h`` (and ``h_lens``) to T' <= T keeps feeding the same
    ``pos_emb``. ``checks.compare_blocks`` compares the files with PyTorch's per-exit encoders."""
    if not hasattr(model.encoder, "run_block"):
        raise ExportError("--blocks needs one of our early-exit stacks (--encoder early-exit); this encoder has no "
                          "per-block form (a single-exit Zipformer, or a pretrained backbone)")
    files: Dict[str, Path] = {}
    stem = Stem(model).eval()
    path = out_dir / "stem.onnx"
    export_onnx(stem, example, path, ["x", "x_lens"], stem_output_names(model),
                _axes(["x", "x_lens"] + stem_output_names(model)), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="splitformer_stem", num_blocks=len(model.exits),
                            **extra_meta))
    files["stem"] = path
    with torch.no_grad():
        h, *shared = stem(*example)
    inputs, outputs = block_input_names(model), block_output_names(model)
    for b, e in enumerate(model.exits):
        path = out_dir / f"block{b}.onnx"
        export_onnx(Block(model, b).eval(), (h, *shared), path, inputs, outputs, _axes(inputs + outputs), opset)
        add_metadata(path, dict(common_metadata(model, args), model_type="splitformer_block", block=b, exit_layer=e,
                                context_size=model.decoder.context_size, **extra_meta))
        files[f"block{b}"] = path
        with torch.no_grad():
            h = Block(model, b).eval()(h, *shared)[0]
    return files


def _axes(names: List[str]) -> Dict[str, Dict[int, str]]:
    """Dynamic axes of the per-block files' tensors: batch and time (features: T, the stack: T_out); ``pos_emb``'s
    rows (2 T_out - 1) only: it has one row for the whole batch."""
    known = {"x": {0: "N", 1: "T"}, "x_lens": {0: "N"}, "h_lens": {0: "N"}, SHARED_POSITIONS: {1: "P"}}
    return {n: known.get(n, {0: "N", 1: "T_out"}) for n in names}
