"""The per-block form of an early-exit model: ``stem.onnx`` and one ``block<i>.onnx`` per exit, so that a
deployment runs block after block and stops at the first confident exit (examples/onnx_decode.py
``--exit-strategy``)."""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from splitformer.export.common import ExportError, add_metadata, common_metadata, export_onnx, feature_axes
from splitformer.model.asr_model import AsrModel


class Stem(nn.Module):
    """Features -> the early-exit stack's input state (front end, feature normalisation, input projection and
    downsampling): the first file of the per-block form."""

    def __init__(self, model: AsrModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        h, lens = self.model.encoder_embed(self.model.normalize(x), x_lens)
        return self.model.encoder.prepare(h, lens)


class Block(nn.Module):
    """State -> (next state, this exit's joiner-ready output and/or CTC log-probs): one block of the stack,
    so that a deployment runs block after block and stops at the first confident exit."""

    def __init__(self, model: AsrModel, block: int) -> None:
        super().__init__()
        self.model = model
        self.block = block
        self.exit_layer = model.exits[block]

    def forward(self, h: Tensor, h_lens: Tensor) -> Tuple[Tensor, ...]:
        enc = self.model.encoder
        nxt, out = enc.run_block(self.block, h, h_lens, enc.block_context(h, h_lens))
        outs = [nxt]
        if self.model.use_transducer:
            outs.append(self.model.project_encoder(out, self.exit_layer))
        if self.model.use_ctc:
            outs.append(self.model.ctc_log_probs(out, self.exit_layer))
        return tuple(outs)


def block_output_names(model: AsrModel) -> List[str]:
    return ["next"] + (["encoder_out"] if model.use_transducer else []) + (["log_probs"] if model.use_ctc else [])


def export_blocks(model: AsrModel, args: Mapping[str, Any], out_dir: Path, opset: int, example: Tuple[Tensor, Tensor],
                  extra_meta: Mapping[str, Any]) -> Dict[str, Path]:
    """The per-block form of an early-exit model: ``stem.onnx`` (``x, x_lens -> h, h_lens``) and ``block<i>.onnx``
    (``h, h_lens -> next, [encoder_out], [log_probs]``), one per exit. A driver runs the stem, then block after block,
    and stops at the first confident exit: the blocks above it never run (examples/onnx_decode.py
    ``--exit-strategy``). ``checks.compare_blocks`` compares them with PyTorch's per-exit encoders."""
    if not hasattr(model.encoder, "run_block"):
        raise ExportError("--blocks needs one of our early-exit stacks (--encoder early-exit); this encoder has no "
                          "per-block form (a single-exit Zipformer, or a pretrained backbone)")
    files: Dict[str, Path] = {}
    stem = Stem(model).eval()
    path = out_dir / "stem.onnx"
    export_onnx(stem, example, path, ["x", "x_lens"], ["h", "h_lens"], feature_axes("h", "h_lens"), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="splitformer_stem", num_blocks=len(model.exits),
                            **extra_meta))
    files["stem"] = path
    with torch.no_grad():
        h, h_lens = stem(*example)
    names = block_output_names(model)
    axes = {"h": {0: "N", 1: "T"}, "h_lens": {0: "N"}, **{n: {0: "N", 1: "T"} for n in names}}
    for b, e in enumerate(model.exits):
        path = out_dir / f"block{b}.onnx"
        export_onnx(Block(model, b).eval(), (h, h_lens), path, ["h", "h_lens"], names, axes, opset)
        add_metadata(path, dict(common_metadata(model, args), model_type="splitformer_block", block=b, exit_layer=e,
                                context_size=model.decoder.context_size, **extra_meta))
        files[f"block{b}"] = path
        with torch.no_grad():
            h = Block(model, b).eval()(h, h_lens)[0]
    return files
