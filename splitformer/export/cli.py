"""Export a trained early-exit model to ONNX (one encoder per exit, shared decoder/joiner) and/or pretrained.pt.

    ./splitformer/export.py --exp-dir exp/splitformer --epoch 30 --avg 5 --use-averaged-model \\
        --exit-layer all --tokens data/lang_bpe_256/tokens.txt [--int8] [--output-dir DIR]

Writes into ``--output-dir`` (default ``<exp-dir>/onnx``), for every exit N asked for:
``encoder-exitN.onnx`` (features -> joiner-ready encoder output; only layers <= N run) and
``ctc-exitN.onnx`` (features -> CTC log-probs), plus ``decoder.onnx``, ``joiner.onnx`` (shared by all exits),
``tokens.txt``, ``*.int8.onnx`` with ``--int8``, ``stem.onnx`` + ``block<i>.onnx`` with ``--blocks true`` (one
block per exit, for dynamic exits in deployment), and ``pretrained.pt`` (averaged weights + model flags) with
``--pretrained true`` (the default). ``--onnx false`` writes only ``pretrained.pt``. Zipformer-layer encoders
accept inputs of up to ``--max-frames`` frames (default 12000, two minutes).
``--streaming true`` (a causal model) adds ``<output-dir>/streaming/``: sherpa-onnx's streaming encoder and CTC
model per exit and the per-block streaming form, for one ``--chunk-size`` / ``--left-context-frames``.
See splitformer/export/ for the exact inputs, outputs and metadata of each file.
"""
import argparse
import logging
from pathlib import Path
from typing import List, Optional, Sequence

from splitformer.export.checkpoints import load_for_export, save_pretrained
from splitformer.export.common import DEFAULT_MAX_FRAMES, DEFAULT_OPSET, ExportError, parse_exits
from splitformer.export.writer import export_model
from splitformer.utils import str2bool


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp-dir", type=Path, required=True, help="training directory with epoch-N.pt / checkpoint-B.pt")
    p.add_argument("--epoch", type=int, default=0, help="use epoch-E.pt (and earlier ones with --avg)")
    p.add_argument("--iter", type=int, default=0, help="use checkpoint-B.pt with B <= ITER instead of epochs")
    p.add_argument("--avg", type=int, default=1, help="average this many checkpoints ending at --epoch/--iter")
    p.add_argument("--use-averaged-model", type=str2bool, nargs="?", const=True, default=False,
                   help="average with the running model_avg between the checkpoints (icefall's method); "
                        "a bare flag as in decode.py, or true/false")
    p.add_argument("--exit-layer", type=str, default="all", help="'all' or comma-separated exit layers, e.g. 4,12")
    p.add_argument("--output-dir", type=Path, default=None, help="where to write (default: <exp-dir>/onnx)")
    p.add_argument("--tokens", type=Path, default=None, help="tokens.txt of the lang dir, copied next to the models")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--int8", action="store_true", help="also write dynamically int8-quantized *.int8.onnx files")
    p.add_argument("--onnx", type=str2bool, default=True, help="write the ONNX files")
    p.add_argument("--pretrained", type=str2bool, default=True, help="write pretrained.pt (weights + model flags)")
    p.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                   help="longest input (10 ms frames) the encoders must take; Zipformer layers' position tables grow with it")
    p.add_argument("--check", type=str2bool, default=True, help="compare every ONNX file with PyTorch after export")
    p.add_argument("--blocks", type=str2bool, default=False,
                   help="also write the per-block form (stem.onnx, block<i>.onnx) for dynamic exits in deployment: "
                        "a driver runs block after block and stops at the first confident exit")
    p.add_argument("--streaming", type=str2bool, default=False,
                   help="a causal model: also write <output-dir>/streaming/, sherpa-onnx's streaming encoder and CTC "
                        "model per exit and the per-block streaming form, for one --chunk-size/--left-context-frames")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="--streaming: frames per chunk after the front end (20 ms each with conv2d, 40 ms with conv1d); "
                        "default: the model's smallest training chunk")
    p.add_argument("--left-context-frames", type=int, default=None,
                   help="--streaming: frames of left context (same unit); default: four chunks")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if (args.epoch > 0) == (args.iter > 0):
        raise SystemExit("export.py: give exactly one of --epoch E or --iter N")
    try:
        import torch

        with torch.no_grad():  # scoped: main() is also called in-process by tests
            return _export(args)
    except ExportError as e:
        raise SystemExit(f"export.py: {e}") from None


def _export(args: argparse.Namespace) -> List[Path]:
    """Load the averaged weights and write the requested files."""
    model, flags, state = load_for_export(args.exp_dir, args.epoch, args.iter, args.avg, args.use_averaged_model)
    out_dir = args.output_dir or args.exp_dir / "onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if args.onnx:
        exits = parse_exits(args.exit_layer, model.exits)
        res = export_model(model, flags, out_dir, exits, opset=args.opset, int8=args.int8, tokens=args.tokens,
                           check=args.check, max_frames=args.max_frames, blocks=args.blocks, streaming=args.streaming,
                           chunk=args.chunk_size, left=args.left_context_frames)
        written += list(res.files.values())
    if args.pretrained:
        p = save_pretrained(out_dir / "pretrained.pt", state, flags)
        logging.info("wrote %s (%.2f MB)", p, p.stat().st_size / 1e6)
        written.append(p)
    return written

