"""Offline (whole-utterance) ONNX files of an early-exit ASR model, one encoder per exit, in the layout sherpa-onnx/icefall users expect.

For every requested exit ``k`` (a layer count from ``model.exits``):

* ``encoder-exit<k>.onnx``: ``x (N, T, 80)`` float, ``x_lens (N,)`` int64 ->
  ``encoder_out (N, T', joiner_dim)``, ``encoder_out_lens (N,)``. Only the layers up to exit ``k`` are in the
  graph, and the exit's own joiner projection (``encoder_proj[k]``) is applied inside, so one ``joiner.onnx``
  serves every exit (icefall's export also projects inside the encoder and decoder files).
* ``ctc-exit<k>.onnx``: a self-contained CTC model, ``x, x_lens -> log_probs (N, T', V), log_probs_len (N,)``
  (front end, layers up to ``k``, that exit's CTC head, log-softmax); sherpa-onnx loads it as a
  ``zipformer2_ctc`` model. It repeats the encoder weights of ``encoder-exit<k>.onnx`` so that a CTC-only
  deployment needs a single file.

Once per model: ``decoder.onnx`` (``y (N, context_size)`` int64 -> ``decoder_out (N, joiner_dim)``, projected)
and ``joiner.onnx`` (``encoder_out (N, joiner_dim)``, ``decoder_out (N, joiner_dim)`` -> ``logit (N, V)``).
A CTC-only model gets only the ``ctc-exit`` files; a transducer-only model gets no ``ctc-exit`` files.

The exporter is torch's TorchScript-based one (``dynamo=False``): torch 2.13's default dynamo exporter
needs the ``onnxscript`` package, which the legacy path does not. Tracing records one path through Python
branches, so the example input is chosen to take the general path everywhere (a padded utterance in the
batch, odd lengths at every downsampling), and two ``as_strided`` relative-shift helpers are swapped for
gather-based equivalents while tracing (ONNX has no strided views). Every file is checked against PyTorch
on other input lengths right after export.

Zipformer layers look up relative positions in a cached table that the traced graph holds as a constant,
so their files accept inputs up to ``max_frames`` feature frames (default two minutes; metadata
``max_frames``); Conformer layers compute positions on the fly and have no such limit.

Metadata (``metadata_props``) of the encoder and CTC files: ``model_type`` (``zipformer2`` /
``zipformer2_ctc``: the sherpa-onnx I/O contract, whatever the layers), ``architecture`` (e.g.
``splitformer-zipformer``), ``exit_layer``, ``exits``, ``vocab_size``, ``blank_id``, ``context_size``,
``joiner_dim``, ``feature_dim``, ``subsampling_factor``, ``version``, ``model_author``, ``comment``;
``decoder.onnx``: ``context_size``, ``vocab_size``; ``joiner.onnx``: ``joiner_dim``, ``vocab_size``.
"""
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from splitformer.export.common import (MODEL_AUTHOR, add_metadata, architecture_name, common_metadata, export_onnx,
                                       feature_axes)
from splitformer.model.asr_model import AsrModel


class EncoderExit(nn.Module):
    """Features -> joiner-ready encoder output of one exit (layers above the exit are never traced)."""

    def __init__(self, model: AsrModel, exit_layer: int, project: bool = True) -> None:
        super().__init__()
        self.model = model
        self.exit_layer = exit_layer
        self.project = project

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        out, lens = self.model.encode(x, x_lens, exit_layer=self.exit_layer)
        if self.project:
            out = self.model.project_encoder(out, self.exit_layer)
        return out, lens


class CtcExit(nn.Module):
    """Features -> CTC log-probs of one exit."""

    def __init__(self, model: AsrModel, exit_layer: int) -> None:
        super().__init__()
        self.model = model
        self.exit_layer = exit_layer

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        out, lens = self.model.encode(x, x_lens, exit_layer=self.exit_layer)
        return self.model.ctc_log_probs(out, self.exit_layer), lens


class DecoderStep(nn.Module):
    """Last ``context_size`` tokens -> projected decoder output, one frame per row (sherpa-onnx's decoder)."""

    def __init__(self, model: AsrModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.decoder_proj = model.decoder_proj

    def forward(self, y: Tensor) -> Tensor:
        return self.decoder_proj(self.decoder(y, need_pad=False).squeeze(1))


class JoinerStep(nn.Module):
    """Projected encoder frame + projected decoder output -> logits (the joiner shared by all exits)."""

    def __init__(self, model: AsrModel) -> None:
        super().__init__()
        self.joiner = model.joiner

    def forward(self, encoder_out: Tensor, decoder_out: Tensor) -> Tensor:
        return self.joiner(encoder_out, decoder_out)


# ---------------------------------------------------------------- exporting
def export_encoder(model: AsrModel, args: Mapping[str, Any], exit_layer: int, path: Path, opset: int,
                   example: Tuple[Tensor, Tensor], extra_meta: Optional[Mapping[str, Any]] = None) -> Path:
    export_onnx(EncoderExit(model, exit_layer).eval(), example, path, ["x", "x_lens"], ["encoder_out", "encoder_out_lens"],
            feature_axes("encoder_out", "encoder_out_lens"), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="zipformer2", exit_layer=exit_layer,
                            context_size=model.decoder.context_size, joiner_dim=model.joiner.output_linear.in_features,
                            comment=f"non-streaming {architecture_name(args)} encoder up to layer {exit_layer}, "
                                    "output projected for the shared joiner", **(extra_meta or {})))
    return path


def export_ctc(model: AsrModel, args: Mapping[str, Any], exit_layer: int, path: Path, opset: int,
               example: Tuple[Tensor, Tensor], extra_meta: Optional[Mapping[str, Any]] = None) -> Path:
    export_onnx(CtcExit(model, exit_layer).eval(), example, path, ["x", "x_lens"], ["log_probs", "log_probs_len"],
            feature_axes("log_probs", "log_probs_len"), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="zipformer2_ctc", exit_layer=exit_layer,
                            comment=f"non-streaming {architecture_name(args)} CTC model, exit after layer {exit_layer}",
                            **(extra_meta or {})))
    return path


def export_decoder(model: AsrModel, path: Path, opset: int) -> Path:
    ctx = model.decoder.context_size
    y = torch.tensor([[0] * ctx, list(range(1, ctx + 1))], dtype=torch.int64) % model.vocab_size
    export_onnx(DecoderStep(model).eval(), (y,), path, ["y"], ["decoder_out"], {"y": {0: "N"}, "decoder_out": {0: "N"}}, opset)
    add_metadata(path, {"context_size": ctx, "vocab_size": model.vocab_size, "blank_id": model.blank_id,
                        "model_author": MODEL_AUTHOR})
    return path


def export_joiner(model: AsrModel, path: Path, opset: int) -> Path:
    j = model.joiner.output_linear.in_features
    export_onnx(JoinerStep(model).eval(), (torch.randn(3, j), torch.randn(3, j)), path, ["encoder_out", "decoder_out"],
            ["logit"], {"encoder_out": {0: "N"}, "decoder_out": {0: "N"}, "logit": {0: "N"}}, opset)
    add_metadata(path, {"joiner_dim": j, "vocab_size": model.vocab_size, "model_author": MODEL_AUTHOR})
    return path
