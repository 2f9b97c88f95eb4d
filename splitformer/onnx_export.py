"""ONNX export of an early-exit ASR model, one encoder per exit, in the layout sherpa-onnx/icefall users expect.

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
import contextlib
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------- wrappers: what each ONNX file computes
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


# ---------------------------------------------------------------- trace-friendly replacements
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
        mask, pos_emb = enc.block_context(h, h_lens)
        nxt, out = enc.run_block(self.block, h, h_lens, mask, pos_emb)
        outs = [nxt]
        if self.model.use_transducer:
            outs.append(self.model.project_encoder(out, self.exit_layer))
        if self.model.use_ctc:
            outs.append(self.model.ctc_log_probs(out, self.exit_layer))
        return tuple(outs)


def block_output_names(model: AsrModel) -> List[str]:
    return ["next"] + (["encoder_out"] if model.use_transducer else []) + (["log_probs"] if model.use_ctc else [])


def gather_rel_shift(scores: Tensor) -> Tensor:
    """``(..., T, 2T-1)`` relative-position scores -> ``(..., T, T)`` by key, with a gather (exportable).

    Both callers lay out the 2T-1 columns so that query i and key j meet at column ``T-1-i+j``
    (conformer.rel_shift: offsets T-1..-(T-1) of query minus key; Zipformer: -(T-1)..T-1 of key minus query).
    """
    t = scores.size(-2)
    rows = torch.arange(t, device=scores.device).unsqueeze(1)
    cols = torch.arange(t, device=scores.device).unsqueeze(0)
    index = (t - 1) - rows + cols  # (T, T)
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
    """Input frames (samples for a waveform model) per encoder output frame (front end x encoder downsampling)."""
    if args.get("encoder") == "hf":
        return int(np.prod(json.loads(args["hf_config"])["conv_stride"]))
    front = 2 if args.get("encoder_embed", "conv2d") == "conv2d" else 4
    if args.get("encoder", "zipformer") == "zipformer":
        return front * 2
    return front * int(args.get("input_downsample", 1))


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


# ---------------------------------------------------------------- ONNX helpers
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


def _export(module: nn.Module, args: Tuple[Tensor, ...], path: Path, input_names: Sequence[str],
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


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"ONNX output shape {a.shape} differs from PyTorch's {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def compare_features_model(path: Path, module: nn.Module, lengths: Sequence[Sequence[int]], seed: int = 1,
                           threads: int = 1) -> float:
    """Run an exported ``x, x_lens`` model and its PyTorch module on batches of the given lengths.

    Returns the largest absolute difference over all outputs and batches; frames past an utterance's
    output length are ignored (padding is unspecified), and the length outputs must match exactly.
    """
    sess = ort_session(path, threads)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for lens in lengths:
        x = input_batch(module.model, lens, g)
        x_lens = torch.tensor(list(lens), dtype=torch.int64)
        with torch.no_grad():
            ref_out, ref_lens = module(x, x_lens)
        out, out_lens = sess.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
        if not np.array_equal(out_lens, ref_lens.numpy()):
            raise ExportError(f"{path}: output lengths {out_lens.tolist()} != PyTorch's {ref_lens.tolist()} for inputs {list(lens)}")
        for i, n in enumerate(ref_lens.tolist()):
            worst = max(worst, max_abs_diff(out[i, :n], ref_out[i, :n].numpy()))
    return worst


# ---------------------------------------------------------------- exporting
@dataclass
class ExportResult:
    files: Dict[str, Path] = field(default_factory=dict)  # name -> path
    max_diffs: Dict[str, float] = field(default_factory=dict)  # name -> max |onnx - torch| at export time


def _feature_axes(out_name: str, lens_name: str) -> Dict[str, Dict[int, str]]:
    return {"x": {0: "N", 1: "T"}, "x_lens": {0: "N"}, out_name: {0: "N", 1: "T_out"}, lens_name: {0: "N"}}


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


def export_encoder(model: AsrModel, args: Mapping[str, Any], exit_layer: int, path: Path, opset: int,
                   example: Tuple[Tensor, Tensor], extra_meta: Optional[Mapping[str, Any]] = None) -> Path:
    _export(EncoderExit(model, exit_layer).eval(), example, path, ["x", "x_lens"], ["encoder_out", "encoder_out_lens"],
            _feature_axes("encoder_out", "encoder_out_lens"), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="zipformer2", exit_layer=exit_layer,
                            context_size=model.decoder.context_size, joiner_dim=model.joiner.output_linear.in_features,
                            comment=f"non-streaming {architecture_name(args)} encoder up to layer {exit_layer}, "
                                    "output projected for the shared joiner", **(extra_meta or {})))
    return path


def export_ctc(model: AsrModel, args: Mapping[str, Any], exit_layer: int, path: Path, opset: int,
               example: Tuple[Tensor, Tensor], extra_meta: Optional[Mapping[str, Any]] = None) -> Path:
    _export(CtcExit(model, exit_layer).eval(), example, path, ["x", "x_lens"], ["log_probs", "log_probs_len"],
            _feature_axes("log_probs", "log_probs_len"), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="zipformer2_ctc", exit_layer=exit_layer,
                            comment=f"non-streaming {architecture_name(args)} CTC model, exit after layer {exit_layer}",
                            **(extra_meta or {})))
    return path


def export_blocks(model: AsrModel, args: Mapping[str, Any], out_dir: Path, opset: int, example: Tuple[Tensor, Tensor],
                  lengths: Sequence[Sequence[int]], check: bool, tolerance: float, extra_meta: Mapping[str, Any],
                  log: Callable[[str], None]) -> Dict[str, Path]:
    """The per-block form of an early-exit model: ``stem.onnx`` (``x, x_lens -> h, h_lens``) and ``block<i>.onnx``
    (``h, h_lens -> next, [encoder_out], [log_probs]``), one per exit. A driver runs the stem, then block after block,
    and stops at the first confident exit: the blocks above it never run (examples/onnx_decode.py
    ``--exit-strategy``). Checked against the per-exit encoders of PyTorch at the export lengths."""
    if not hasattr(model.encoder, "run_block"):
        raise ExportError("--blocks needs one of our early-exit stacks (--encoder early-exit); this encoder has no "
                          "per-block form (a single-exit Zipformer, or a pretrained backbone)")
    files: Dict[str, Path] = {}
    stem = Stem(model).eval()
    path = out_dir / "stem.onnx"
    _export(stem, example, path, ["x", "x_lens"], ["h", "h_lens"], _feature_axes("h", "h_lens"), opset)
    add_metadata(path, dict(common_metadata(model, args), model_type="splitformer_stem", num_blocks=len(model.exits),
                            **extra_meta))
    files["stem"] = path
    with torch.no_grad():
        h, h_lens = stem(*example)
    names = block_output_names(model)
    axes = {"h": {0: "N", 1: "T"}, "h_lens": {0: "N"}, **{n: {0: "N", 1: "T"} for n in names}}
    for b, e in enumerate(model.exits):
        path = out_dir / f"block{b}.onnx"
        _export(Block(model, b).eval(), (h, h_lens), path, ["h", "h_lens"], names, axes, opset)
        add_metadata(path, dict(common_metadata(model, args), model_type="splitformer_block", block=b, exit_layer=e,
                                context_size=model.decoder.context_size, **extra_meta))
        files[f"block{b}"] = path
        with torch.no_grad():
            h = Block(model, b).eval()(h, h_lens)[0]
    if check:
        d = compare_blocks(model, files, lengths)
        if d > tolerance:
            raise ExportError(f"the per-block ONNX files differ from PyTorch by {d:.3g} (> {tolerance})")
        log(f"stem.onnx + block*.onnx: max |onnx - torch| = {d:.3g} over input lengths {lengths}")
    return files


def compare_blocks(model: AsrModel, files: Mapping[str, Path], lengths: Sequence[Sequence[int]], seed: int = 1) -> float:
    """Run stem and blocks in onnxruntime, and compare every exit's outputs with PyTorch's per-exit encoders."""
    stem = ort_session(files["stem"])
    blocks = [ort_session(files[f"block{b}"]) for b in range(len(model.exits))]
    names = block_output_names(model)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for lens in lengths:
        x = input_batch(model, lens, g)
        x_lens = torch.tensor(list(lens), dtype=torch.int64)
        h, h_lens = stem.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
        with torch.no_grad():
            torch_exits = model.encode_exits(x, x_lens)  # one PyTorch pass gives every exit's reference
        for b, (e, enc, ref_lens) in enumerate(torch_exits):
            outs = dict(zip(names, blocks[b].run(None, {"h": h, "h_lens": h_lens})))
            h = outs["next"]
            refs = {}
            with torch.no_grad():
                if model.use_transducer:
                    refs["encoder_out"] = model.project_encoder(enc, e)
                if model.use_ctc:
                    refs["log_probs"] = model.ctc_log_probs(enc, e)
            if not np.array_equal(h_lens, ref_lens.numpy()):
                raise ExportError(f"per-block lengths {h_lens.tolist()} != PyTorch's {ref_lens.tolist()}")
            for name, ref in refs.items():
                for i, n in enumerate(ref_lens.tolist()):
                    worst = max(worst, max_abs_diff(outs[name][i, :n], ref[i, :n].numpy()))
    return worst


def export_decoder(model: AsrModel, path: Path, opset: int) -> Path:
    ctx = model.decoder.context_size
    y = torch.tensor([[0] * ctx, list(range(1, ctx + 1))], dtype=torch.int64) % model.vocab_size
    _export(DecoderStep(model).eval(), (y,), path, ["y"], ["decoder_out"], {"y": {0: "N"}, "decoder_out": {0: "N"}}, opset)
    add_metadata(path, {"context_size": ctx, "vocab_size": model.vocab_size, "blank_id": model.blank_id,
                        "model_author": MODEL_AUTHOR})
    return path


def export_joiner(model: AsrModel, path: Path, opset: int) -> Path:
    j = model.joiner.output_linear.in_features
    _export(JoinerStep(model).eval(), (torch.randn(3, j), torch.randn(3, j)), path, ["encoder_out", "decoder_out"],
            ["logit"], {"encoder_out": {0: "N"}, "decoder_out": {0: "N"}, "logit": {0: "N"}}, opset)
    add_metadata(path, {"joiner_dim": j, "vocab_size": model.vocab_size, "model_author": MODEL_AUTHOR})
    return path


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


def export_model(model: AsrModel, args: Mapping[str, Any], out_dir: Path, exits: Sequence[int], opset: int = DEFAULT_OPSET,
                 int8: bool = False, tokens: Optional[Path] = None, check: bool = True, tolerance: float = 1e-3,
                 max_frames: int = DEFAULT_MAX_FRAMES, log: Callable[[str], None] = logging.info,
                 blocks: bool = False) -> ExportResult:
    """Export ``model`` (eval mode is set here) for ``exits`` into ``out_dir``; see the module docstring.

    ``max_frames``: the longest input (feature frames, 100 per second) the encoders must accept; only
    Zipformer-layer models have such a limit (their position tables grow the files by ~0.2 MB per 1000 frames
    per table at 50 Hz).
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
        res.files.update(export_blocks(model, args, out_dir, opset, example, lengths, check, tolerance, extra, log))
    if model.use_transducer:
        res.files["decoder"] = export_decoder(model, out_dir / "decoder.onnx", opset)
        res.files["joiner"] = export_joiner(model, out_dir / "joiner.onnx", opset)
    if int8:
        for name in list(res.files):
            res.files[name + ".int8"] = quantize_int8(res.files[name])
    if tokens is not None:
        dst = out_dir / "tokens.txt"
        if Path(tokens).resolve() != dst.resolve():
            shutil.copyfile(tokens, dst)
        res.files["tokens"] = dst
    for name, path in res.files.items():
        log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return res


# ---------------------------------------------------------------- checkpoints
def model_from_args(stored: Mapping[str, Any]) -> Tuple[AsrModel, Dict[str, Any]]:
    """Rebuild the architecture from a checkpoint's ``args`` dict; flags unknown to this version are ignored
    with a warning (the strict state-dict load then tells whether they mattered)."""
    from splitformer.model.config import build_model, default_model_args

    stored = dict(stored)
    vocab = stored.pop("vocab_size", None)
    if not vocab:
        raise ExportError("the checkpoint's args have no vocab_size; it was not written by splitformer/train.py")
    probe = default_model_args()
    unknown = sorted(k for k in stored if not hasattr(probe, k))
    if unknown:
        logging.warning("ignoring checkpoint flags unknown to this version: %s", ", ".join(unknown))
    known = {k: v for k, v in stored.items() if hasattr(probe, k) and k != "preset"}
    args = default_model_args(preset=stored.get("preset"), **known)
    model = build_model(args, int(vocab))
    return model, dict(vars(args))


def load_for_export(exp_dir: Path, epoch: int = 0, iteration: int = 0, avg: int = 1, use_averaged_model: bool = False
                    ) -> Tuple[AsrModel, Dict[str, Any], Dict[str, Tensor]]:
    """(model in eval mode with the averaged weights, its flags, the float32 state dict) for decode's
    ``--epoch/--iter/--avg/--use-averaged-model`` conventions."""
    from splitformer.averaging import load_averaged_state
    from splitformer.checkpoint import CheckpointError, find_checkpoints, load_checkpoint, load_model_state

    exp_dir = Path(exp_dir)
    if iteration > 0:
        found = find_checkpoints(exp_dir, iteration=iteration)
        if not found:
            raise ExportError(f"no checkpoint-B.pt with B <= {iteration} in {exp_dir}")
        last = found[0]
    else:
        last = exp_dir / f"epoch-{epoch}.pt"
    try:
        stored = load_checkpoint(last, required_keys=("args",))["args"]
        state = load_averaged_state(exp_dir, epoch=epoch, iteration=iteration, avg=avg, use_averaged_model=use_averaged_model)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    model, args = model_from_args(stored)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        load_model_state(model, state, path=last)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    model.eval()
    return model, args, model.state_dict()


def save_pretrained(path: Path, state: Mapping[str, Tensor], args: Mapping[str, Any]) -> Path:
    """``pretrained.pt``: the (averaged) weights and the model flags, loadable with ``weights_only=True``."""
    from splitformer.checkpoint import plain_args, save_checkpoint
    from splitformer.model.config import MODEL_KEYS

    flags = plain_args(args, keys=MODEL_KEYS)
    save_checkpoint(path, model={k: v.detach().clone() for k, v in state.items()}, args=flags)
    return Path(path)
