"""What every exported file shares: errors, metadata, the tracing context, onnxruntime sessions, example
inputs and the facts about a model that go into its metadata."""
import contextlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from splitformer.model.asr_model import INPUT_RATES, SAMPLES_PER_FRAME, AsrModel

FEATURE_DIM = 80
DEFAULT_OPSET = 17
DEFAULT_MAX_FRAMES = 12000  # 2 minutes of 10 ms frames
MODEL_AUTHOR = "splitformer"


class ExportError(RuntimeError):
    """The model, its checkpoint or the exported graph cannot be used; the message says what to fix."""


# ---------------------------------------------------------------- tracing
def gather_rel_shift(scores: Tensor) -> Tensor:
    """``(..., T, T+K-1)`` relative-position scores -> ``(..., T, K)`` by key, with a gather (exportable).

    Both callers lay out the columns so that query i and key j meet at column ``T-1-i+j`` (conformer.rel_shift:
    offsets T-1..-(T-1) of query minus key; Zipformer: -(K-1)..T-1 of key minus query, K = T offline and
    T + left context when streaming).
    """
    t = scores.size(-2)
    k = scores.size(-1) - t + 1
    rows = torch.arange(t, device=scores.device).unsqueeze(1)
    cols = torch.arange(k, device=scores.device).unsqueeze(0)
    index = (t - 1) - rows + cols  # (T, K)
    return torch.gather(scores, -1, index.expand(scores.shape[:-2] + index.shape))


@contextlib.contextmanager
def trace_friendly() -> Iterator[None]:
    """Swap the ``as_strided`` relative shifts of the Conformer and Zipformer layers for gathers while tracing.

    The replacements compute the same numbers (checked by the tests); the originals stay in use for
    training, where the strided view is faster and uses no index tensor.
    """
    patched: List[Tuple[Any, str, Any]] = []
    try:
        from splitformer.model import conformer

        patched.append((conformer, "rel_shift", conformer.rel_shift))
        conformer.rel_shift = gather_rel_shift
    except ImportError:  # pragma: no cover - conformer is part of the package
        pass
    try:
        from splitformer.model import zipformer

        patched.append((zipformer, "_rel_shift", zipformer._rel_shift))
        zipformer._rel_shift = gather_rel_shift
    except ImportError:  # the Zipformer encoder is not installed: nothing to patch
        pass
    try:
        yield
    finally:
        for module, name, original in reversed(patched):
            setattr(module, name, original)


def export_onnx(module: nn.Module, args: Tuple[Tensor, ...], path: Path, input_names: Sequence[str],
            output_names: Sequence[str], dynamic_axes: Dict[str, Dict[int, str]], opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # tracer warnings name every Python branch taken; the post-export check is what tells whether they matter
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        with torch.no_grad(), trace_friendly():
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True,
            )


# ---------------------------------------------------------------- model facts
def architecture_name(args: Mapping[str, Any]) -> str:
    """Short description of the encoder, e.g. ``zipformer2``, ``early-exit-conformer``, ``splitformer-zipformer``."""
    if args.get("encoder", "zipformer") == "zipformer":
        return "zipformer2"
    if args.get("encoder") == "hf":
        return f"hf-{json.loads(args['hf_config'])['model_type']}"
    layer = args.get("layer_type", "zipformer")
    split = str(args.get("split_blocks", "") or "").strip()
    return f"{'splitformer' if split else 'early-exit'}-{layer}"


def subsampling_factor(args: Mapping[str, Any]) -> int:
    """Input frames (samples for a waveform model) per encoder output frame (front end x encoder downsampling):
    the x2 (conv2d) or x4 (conv1d) front end, then a Zipformer2's ``output_downsampling_factor`` (1 or 2) or an
    early-exit stack's ``input_downsample``. Defaults are the flags' own (config.py)."""
    if args.get("encoder") == "hf":
        return int(np.prod(json.loads(args["hf_config"])["conv_stride"]))
    front = 2 if args.get("encoder_embed", "conv2d") == "conv2d" else 4
    if args.get("encoder", "zipformer") == "zipformer":
        return front * int(args.get("output_downsampling_factor", 2))
    return front * int(args.get("input_downsample", 2))


def common_metadata(model: AsrModel, args: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "version": "1",
        "model_author": MODEL_AUTHOR,
        "architecture": architecture_name(args),
        "exits": ",".join(map(str, model.exits)),
        "vocab_size": model.vocab_size,
        "blank_id": model.blank_id,
        "subsampling_factor": subsampling_factor(args),
        # x is (N, T, feature_dim) fbank, or (N, T) 16 kHz samples for a waveform model (--encoder hf)
        "input": model.input_kind,
        **({"sample_rate": INPUT_RATES["waveform"]} if model.input_kind == "waveform" else {"feature_dim": FEATURE_DIM}),
    }


def input_batch(model: AsrModel, lens: Sequence[int], generator: Optional[torch.Generator] = None) -> Tensor:
    """Inputs of the model's kind for utterances of ``lens`` (fbank frames, or samples for a waveform model):
    random with ``generator``, zeros without."""
    shape = (len(lens), max(lens)) + (() if model.input_kind == "waveform" else (FEATURE_DIM,))
    return torch.randn(shape, generator=generator) if generator is not None else torch.zeros(shape)


def example_lengths(model: AsrModel, target: int = 160, modulus: int = 16) -> int:
    """A feature length near ``target`` whose front-end output length is 1 mod ``modulus``.

    Such a length is odd at every x2 stage (``ceil`` halving keeps it 1 mod 2^k), so traced downsampling
    records its padding branch, which is also correct (pads nothing) for lengths that need no padding.
    """
    if model.input_kind == "waveform":  # a backbone's convolutions have no padding branch: any length will do
        return target * SAMPLES_PER_FRAME + 37
    with torch.no_grad():
        for t in range(target, target + 8 * modulus):
            _, lens = model.encoder_embed(input_batch(model, [t]), torch.tensor([t]))
            if int(lens[0]) % modulus == 1:
                return t
    raise ExportError(f"no feature length in {target}..{target + 8 * modulus} gives a front-end length of 1 mod {modulus}")


def example_features(model: AsrModel, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A batch of two with one padded utterance: traced code then keeps its masking/padding path."""
    t = example_lengths(model)
    g = torch.Generator().manual_seed(seed)
    lens = [t, t * 5 // 8]
    return input_batch(model, lens, g), torch.tensor(lens, dtype=torch.int64)


def check_lengths(model: AsrModel, example_t: int) -> List[List[int]]:
    """Batches of input lengths for the post-export check, unlike the traced one: longer and shorter inputs,
    padded and unpadded batches, and front-end output lengths of every residue mod 4 (so that each x2
    downsampling sees both odd and even lengths)."""
    longs: Dict[int, int] = {}
    with torch.no_grad():
        t = example_t + 5
        while len(longs) < 4:
            _, lens = model.encoder_embed(input_batch(model, [t]), torch.tensor([t]))
            longs.setdefault(int(lens[0]) % 4, t)
            t += 1
    return [[longs[0], example_t // 2 + 1, longs[2]], [longs[1]], [longs[3], longs[3] * 2 // 3]]


def extend_positional_tables(model: AsrModel, max_frames: int) -> Dict[str, int]:
    """Grow every cached relative-position table so that inputs of up to ``max_frames`` feature frames fit.

    Zipformer's CompactRelPositionalEncoding keeps a table (1000 frames by default) that it extends in
    Python when a longer input comes; a traced graph bakes the table in as a constant, so it must be
    long enough before tracing. Each table is sized for the frame rate its module actually runs at
    (found with hooks on one forward pass). Returns module name -> frames now covered.
    """
    try:
        from splitformer.model.zipformer import CompactRelPositionalEncoding
    except ImportError:
        return {}
    mods = {n: m for n, m in model.named_modules() if isinstance(m, CompactRelPositionalEncoding)}
    if not mods:
        return {}
    # the length each table sees is (up to rounding) linear in the input length: measure it at two lengths
    t1 = example_lengths(model)
    t2 = t1 + 64
    seen: Dict[int, Dict[str, int]] = {t1: {}, t2: {}}

    def record(t: int, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Tuple[Tensor, ...]) -> None:  # returns None: inputs unchanged
            seen[t].setdefault(name, int(inputs[0].shape[0]))  # the first call runs at the module's top rate
        return hook

    for t in (t1, t2):
        hooks = [m.register_forward_pre_hook(record(t, n)) for n, m in mods.items()]
        try:
            with torch.no_grad():
                model.encode(input_batch(model, [t]), torch.tensor([t]))
        finally:
            for h in hooks:
                h.remove()
    covered = {}
    for n, s1 in seen[t1].items():
        rate = (seen[t2][n] - s1) / (t2 - t1)
        frames = int(math.ceil(s1 + rate * (max_frames - t1))) + 4  # + slack for the front ends' rounding
        with torch.no_grad():
            mods[n](torch.zeros(frames, 1, 1))
        covered[n] = frames
    return covered


def feature_axes(out_name: str, lens_name: str) -> Dict[str, Dict[int, str]]:
    return {"x": {0: "N", 1: "T"}, "x_lens": {0: "N"}, out_name: {0: "N", 1: "T_out"}, lens_name: {0: "N"}}


# ---------------------------------------------------------------- files
def add_metadata(path: Path, meta: Mapping[str, Any]) -> None:
    """Write ``meta`` (values as strings) into the model's ``metadata_props``, replacing keys already there."""
    import onnx

    m = onnx.load(str(path))
    keep = [p for p in m.metadata_props if p.key not in meta]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = str(k), str(v)
    onnx.save(m, str(path))


def read_metadata(path: Path) -> Dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def graph_stats(path: Path) -> Dict[str, int]:
    """Node count and parameter count (initializer elements) of an ONNX file: what an exit costs to ship/run."""
    import onnx

    m = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    matmuls = sum(1 for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger"))
    return {"nodes": len(m.graph.node), "params": params, "matmul_like": matmuls, "bytes": path.stat().st_size}


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"ONNX output shape {a.shape} differs from PyTorch's {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def quantize_int8(path: Path) -> Path:
    """Dynamic int8 (weights int8, activations quantized on the fly) next to ``path`` as ``*.int8.onnx``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    meta = read_metadata(path)
    logging.disable(logging.WARNING)  # the quantizer logs a line per tensor it leaves in float
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(path), str(out), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    add_metadata(out, dict(meta, quantization="dynamic-int8"))  # keep the metadata whatever the quantizer copies
    return out


def parse_exits(spec: str, exits: Sequence[int]) -> List[int]:
    """``"all"`` or a comma list of layer counts -> sorted exits, each one of ``exits``."""
    if spec.strip().lower() == "all":
        return list(exits)
    try:
        wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ExportError(f"--exit-layer must be 'all' or comma-separated layer counts, got {spec!r}") from None
    bad = [e for e in wanted if e not in exits]
    if bad or not wanted:
        raise ExportError(f"--exit-layer {spec}: this model has exits after layers {', '.join(map(str, exits))}")
    return wanted


def count_tokens(tokens: Path) -> int:
    lines = [ln for ln in Path(tokens).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return len(lines)
