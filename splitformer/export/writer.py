"""``export_model``: everything ``export.py`` writes for one model, each file checked against PyTorch."""
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from torch import nn

from splitformer.export.blocks import export_blocks
from splitformer.export.checks import (FP32_TOLERANCE, INT8_TOLERANCE, Diff, check_int8, compare_blocks,
                                      compare_features_model)
from splitformer.export.common import (DEFAULT_MAX_FRAMES, DEFAULT_OPSET, ExportError, check_lengths, count_tokens,
                                       example_features, extend_positional_tables, quantize_int8)
from splitformer.export.offline import (CtcExit, EncoderExit, export_ctc, export_decoder, export_encoder,
                                        export_joiner)
from splitformer.export.streaming import export_streaming
from splitformer.model.asr_model import AsrModel


@dataclass
class ExportResult:
    files: Dict[str, Path] = field(default_factory=dict)  # name -> path
    max_diffs: Dict[str, float] = field(default_factory=dict)  # name -> max |onnx - torch| at export time
    int8_diffs: Dict[str, Diff] = field(default_factory=dict)  # int8 file (or group) -> its distance from PyTorch


def export_model(model: AsrModel, args: Mapping[str, Any], out_dir: Path, exits: Sequence[int], opset: int = DEFAULT_OPSET,
                 int8: bool = False, tokens: Optional[Path] = None, check: bool = True, tolerance: float = FP32_TOLERANCE,
                 max_frames: int = DEFAULT_MAX_FRAMES, log: Callable[[str], None] = logging.info,
                 blocks: bool = False, streaming: bool = False, chunk: Optional[int] = None,
                 left: Optional[int] = None, int8_tolerance: float = INT8_TOLERANCE) -> ExportResult:
    """Export ``model`` (eval mode is set here) for ``exits`` into ``out_dir``: the offline files, with ``blocks``
    the per-block form, with ``streaming`` the streaming files in ``out_dir/streaming`` (chunk size and left
    context: ``chunk`` and ``left``, by default the model's smallest training chunk and four of them).

    ``max_frames``: the longest input (feature frames, 100 per second) the encoders must accept; only
    Zipformer-layer models have such a limit (their position tables grow the files by ~0.2 MB per 1000 frames
    per table at 50 Hz). Every offline file of such a model (encoders, CTC models, stem and blocks: the blocks
    read the stem's positions, so its limit is theirs; int8 copies too) records it as ``max_frames``; the
    streaming files have none (their positions cover one chunk and its left context).

    ``check``: every fp32 file must match PyTorch within ``tolerance`` (largest absolute difference), and with
    ``int8`` every int8 file within a relative RMS error of ``int8_tolerance`` (checks.check_int8).
    """
    model.eval()
    # only models with a length limit get max_frames in their metadata
    extra = {"max_frames": max_frames} if extend_positional_tables(model, max_frames) else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokens is not None:
        n = count_tokens(tokens)
        if n != model.vocab_size:
            raise ExportError(f"{tokens} lists {n} tokens but the model has vocab_size {model.vocab_size}: "
                              "pass the tokens.txt of the lang dir the model was trained with")
    res = ExportResult()
    example = example_features(model)
    lengths = check_lengths(model, int(example[1][0]))

    def record(name: str, path: Path, module: Optional[nn.Module]) -> None:
        res.files[name] = path
        if check and module is not None:
            d = compare_features_model(path, module, lengths)
            res.max_diffs[name] = d
            if d > tolerance:
                raise ExportError(f"{path}: ONNX output differs from PyTorch by {d:.3g} (> {tolerance}); "
                                  "the traced graph does not generalise to other lengths")
            log(f"{path.name}: max |onnx - torch| = {d:.3g} over input lengths {lengths}")

    for e in exits:
        if model.use_transducer:
            p = export_encoder(model, args, e, out_dir / f"encoder-exit{e}.onnx", opset, example, extra)
            record(p.stem, p, EncoderExit(model, e))
        if model.use_ctc:
            p = export_ctc(model, args, e, out_dir / f"ctc-exit{e}.onnx", opset, example, extra)
            record(p.stem, p, CtcExit(model, e))
    if blocks:
        if not hasattr(model.encoder, "run_block"):
            raise ExportError("--blocks needs one of our early-exit stacks (--encoder early-exit); this encoder has no "
                              "per-block form (a single-exit Zipformer, or a pretrained backbone)")
        files = export_blocks(model, args, out_dir, opset, example, extra)
        res.files.update(files)
        if check:
            d = compare_blocks(model, files, lengths)
            if d > tolerance:
                raise ExportError(f"the per-block ONNX files differ from PyTorch by {d:.3g} (> {tolerance})")
            log(f"stem.onnx + block*.onnx: max |onnx - torch| = {d:.3g} over input lengths {lengths}")
    if model.use_transducer:
        res.files["decoder"] = export_decoder(model, out_dir / "decoder.onnx", opset)
        res.files["joiner"] = export_joiner(model, out_dir / "joiner.onnx", opset)
    if streaming:
        shared = {k: res.files[k] for k in ("decoder", "joiner") if k in res.files}
        if tokens is not None:
            shared["tokens"] = Path(tokens)
        res.files.update(export_streaming(model, args, exits, out_dir / "streaming", opset, chunk, left, check,
                                          tolerance, shared, log))
    if int8:
        for name in [n for n, p in res.files.items() if p.suffix == ".onnx"]:
            res.files[name + ".int8"] = quantize_int8(res.files[name])
        if check:
            res.int8_diffs = check_int8(model, res.files, lengths, int8_tolerance, log)
    if tokens is not None:
        dst = out_dir / "tokens.txt"
        if Path(tokens).resolve() != dst.resolve():
            shutil.copyfile(tokens, dst)
        res.files["tokens"] = dst
    for name, path in res.files.items():
        log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return res
