"""ONNX export of our models, and ``pretrained.pt``: what ``export.py`` writes.

- ``offline``: one encoder (and CTC model) per exit over whole utterances, the shared decoder and joiner;
- ``blocks``: the per-block form, for dynamic exits over whole utterances;
- ``streaming``: for a causal model, sherpa-onnx's streaming encoders per exit and a per-block streaming form;
- ``checks``: every file against the PyTorch computation it stands for;
- ``common``: metadata, tracing and the facts about a model that the files record;
- ``checkpoints``: the averaged weights of a training directory; ``writer``: ``export_model``, all of it;
- ``cli``: the executable's flags and main (``./splitformer/export.py``).
"""
from splitformer.export.checkpoints import load_for_export, model_from_args, save_pretrained
from splitformer.export.cli import main
from splitformer.export.common import (DEFAULT_MAX_FRAMES, DEFAULT_OPSET, ExportError, gather_rel_shift, graph_stats,
                                       ort_session, parse_exits, quantize_int8, read_metadata)
from splitformer.export.checks import compare_features_model
from splitformer.export.offline import CtcExit, EncoderExit
from splitformer.export.writer import ExportResult, export_model

__all__ = ["CtcExit", "DEFAULT_MAX_FRAMES", "DEFAULT_OPSET", "EncoderExit", "ExportError", "ExportResult",
           "compare_features_model", "export_model", "gather_rel_shift", "graph_stats", "load_for_export", "main",
           "model_from_args", "ort_session", "parse_exits", "quantize_int8", "read_metadata", "save_pretrained"]
