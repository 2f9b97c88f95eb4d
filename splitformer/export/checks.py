"""The checks every export runs: each ONNX file against the PyTorch computation it stands for, on inputs
unlike the traced example (other lengths, padded and unpadded batches).

fp32 files must match PyTorch to :data:`FP32_TOLERANCE` (largest absolute difference). int8 files (dynamic
quantization: int8 weights, activations quantized per call) cannot: their largest difference grows with the
model's scale and says little. They are held to a relative RMS error, ``||onnx - torch|| / ||torch||`` over all
valid frames of an output, of at most :data:`INT8_TOLERANCE` (see :class:`Diff`); the share of frames whose
argmax (the token a greedy search takes) agrees is logged beside it.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from splitformer.export.blocks import block_output_names
from splitformer.export.common import ExportError, input_batch, max_abs_diff, ort_session, read_metadata
from splitformer.model.asr_model import AsrModel

FP32_TOLERANCE = 1e-3
# Measured on the export checks' random inputs: 0.2-0.6 % on the tests' tiny models, 0.5-1.5 % on
# exp/splitformer-cpu and exp/splitformer-cpu-causal (epoch 12: every file kind, streaming included). 10 % leaves
# room for other models and still catches a wrong file or block (~100 %) or a broken quantization.
INT8_TOLERANCE = 0.1


@dataclass
class Diff:
    """How far an ONNX file's outputs are from PyTorch's over the valid frames, accumulated output by output.

    ``max_abs``: the largest absolute difference (the fp32 bound); ``rel``: the relative RMS error
    ``sqrt(sum (onnx - torch)^2 / sum torch^2)`` (the int8 bound; 0 for all-zero references); ``agree``: the share
    of frames whose argmax over the last axis agrees (outputs over the vocabulary only; 1 when there are none)."""

    max_abs: float = 0.0
    err2: float = 0.0
    ref2: float = 0.0
    frames: int = 0
    same: int = 0

    def add(self, got: np.ndarray, want: np.ndarray, argmax: bool = False) -> None:
        self.max_abs = max(self.max_abs, max_abs_diff(got, want))
        g, w = got.astype(np.float64), want.astype(np.float64)
        self.err2 += float(((g - w) ** 2).sum())
        self.ref2 += float((w ** 2).sum())
        if argmax and got.size:
            self.frames += int(np.prod(got.shape[:-1]))
            self.same += int((got.argmax(-1) == want.argmax(-1)).sum())

    @property
    def rel(self) -> float:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else math.sqrt(self.err2)

    @property
    def agree(self) -> float:
        return self.same / self.frames if self.frames else 1.0

    def __str__(self) -> str:
        return (f"max |onnx - torch| {self.max_abs:.3g}, relative RMS error {self.rel:.3g}"
                + (f", argmax agreement {self.agree:.4f}" if self.frames else ""))


VOCAB_OUTPUTS = ("log_probs", "logit")  # outputs over the vocabulary: their argmax is a greedy search's token


def features_model_diff(path: Path, module: nn.Module, lengths: Sequence[Sequence[int]], seed: int = 1,
                        threads: int = 1) -> Diff:
    """Run an exported ``x, x_lens`` model and its PyTorch module on batches of the given lengths; frames past an
    utterance's output length are ignored (padding is unspecified), and the length outputs must match exactly."""
    sess = ort_session(path, threads)
    vocab = sess.get_outputs()[0].name in VOCAB_OUTPUTS
    g = torch.Generator().manual_seed(seed)
    diff = Diff()
    for lens in lengths:
        x = input_batch(module.model, lens, g)
        x_lens = torch.tensor(list(lens), dtype=torch.int64)
        with torch.no_grad():
            ref_out, ref_lens = module(x, x_lens)
        out, out_lens = sess.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
        if not np.array_equal(out_lens, ref_lens.numpy()):
            raise ExportError(f"{path}: output lengths {out_lens.tolist()} != PyTorch's {ref_lens.tolist()} for inputs {list(lens)}")
        for i, n in enumerate(ref_lens.tolist()):
            diff.add(out[i, :n], ref_out[i, :n].numpy(), argmax=vocab)
    return diff


def compare_features_model(path: Path, module: nn.Module, lengths: Sequence[Sequence[int]], seed: int = 1,
                           threads: int = 1) -> float:
    """The largest absolute difference of :func:`features_model_diff` over all outputs and batches."""
    return features_model_diff(path, module, lengths, seed, threads).max_abs


def block_feeds(block_inputs: Sequence[str], h: np.ndarray, stem_outs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """What a driver feeds a block: ``h`` (the stem's, or the previous block's ``next``), and every other input
    from the stem's output of the same name (``h_lens``, ``pos_emb``)."""
    missing = [n for n in block_inputs if n != "h" and n not in stem_outs]
    if missing:
        raise ExportError(f"block inputs {missing} are not outputs of the stem ({sorted(stem_outs)})")
    return {n: h if n == "h" else stem_outs[n] for n in block_inputs}


def blocks_diff(model: AsrModel, files: Mapping[str, Path], lengths: Sequence[Sequence[int]], seed: int = 1,
                suffix: str = "") -> Diff:
    """Run stem and blocks in onnxruntime, as a driver does (:func:`block_feeds`), and compare every exit's outputs
    with PyTorch's per-exit encoders (one forward pass: ``encode_exits``). ``suffix``: ``".int8"`` for the
    quantized files."""
    stem = ort_session(files["stem" + suffix])
    blocks = [ort_session(files[f"block{b}{suffix}"]) for b in range(len(model.exits))]
    names = block_output_names(model)
    g = torch.Generator().manual_seed(seed)
    diff = Diff()
    for lens in lengths:
        x = input_batch(model, lens, g)
        x_lens = torch.tensor(list(lens), dtype=torch.int64)
        stem_outs = dict(zip([o.name for o in stem.get_outputs()],
                             stem.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})))
        h = stem_outs["h"]
        with torch.no_grad():
            torch_exits = model.encode_exits(x, x_lens)  # one PyTorch pass gives every exit's reference
        for b, (e, enc, ref_lens) in enumerate(torch_exits):
            feeds = block_feeds([i.name for i in blocks[b].get_inputs()], h, stem_outs)
            outs = dict(zip(names, blocks[b].run(None, feeds)))
            h = outs["next"]
            refs = {}
            with torch.no_grad():
                if model.use_transducer:
                    refs["encoder_out"] = model.project_encoder(enc, e)
                if model.use_ctc:
                    refs["log_probs"] = model.ctc_log_probs(enc, e)
            if not np.array_equal(stem_outs["h_lens"], ref_lens.numpy()):
                raise ExportError(f"per-block lengths {stem_outs['h_lens'].tolist()} != PyTorch's {ref_lens.tolist()}")
            for name, ref in refs.items():
                for i, n in enumerate(ref_lens.tolist()):
                    diff.add(outs[name][i, :n], ref[i, :n].numpy(), argmax=name in VOCAB_OUTPUTS)
    return diff


def compare_blocks(model: AsrModel, files: Mapping[str, Path], lengths: Sequence[Sequence[int]], seed: int = 1) -> float:
    """The largest absolute difference of :func:`blocks_diff` (the fp32 files)."""
    return blocks_diff(model, files, lengths, seed).max_abs


def streaming_diff(model: AsrModel, files: Mapping[str, Path], chunk: int, left: int, exits: Sequence[int],
                   chunks: int = 5, batch: int = 2, seed: int = 1, suffix: str = "") -> Diff:
    """Feed ``chunks`` chunks of two random streams to every streaming file (sherpa-onnx's per-exit encoders and
    CTC models, carrying their states; the per-block form, block after block) and compare each chunk's output
    with PyTorch's chunk-by-chunk computation (``StreamingEncoder``). Give more chunks than the left context
    holds (export does), so that full and rolling caches are both checked. ``suffix``: ``".int8"``."""
    from splitformer.export.streaming import SHERPA_EMBED_SHAPE, _Layout
    from splitformer.model.streaming import StreamingEncoder

    enc = StreamingEncoder(model, chunk, left)
    g = torch.Generator().manual_seed(seed)
    windows = [torch.randn(batch, enc.input_frames, model.feature_dim, generator=g) for _ in range(chunks)]
    remaining = torch.full((batch,), 10 ** 6, dtype=torch.int64)
    ref: Dict[int, List[torch.Tensor]] = {e: [] for e in model.exits}
    state = enc.init_state(batch)
    with torch.no_grad():
        for x in windows:
            for e, out in enc.chunk_all_exits(x, state, remaining).items():
                ref[e].append(out)

    def want(e: int, k: int, head: str) -> np.ndarray:
        with torch.no_grad():
            y = model.project_encoder(ref[e][k], e) if head == "encoder_out" else model.ctc_log_probs(ref[e][k], e)
        return y.numpy()

    diff = Diff()
    embed0 = np.zeros((batch,) + SHERPA_EMBED_SHAPE, dtype=np.float32)
    for e in exits:
        for kind, head in (("encoder", "encoder_out"), ("ctc", "log_probs")):
            path = files.get(f"streaming/{kind}-exit{e}{suffix}")
            if path is None:
                continue
            sess = ort_session(path)
            names = [i.name for i in sess.get_inputs()]
            states = [s.numpy() for s in _Layout(model, e, left).init_states(batch)] + [embed0, np.zeros(batch, np.int64)]
            for k, x in enumerate(windows):
                outs = sess.run(None, dict(zip(names, [x.numpy()] + states)))
                states = outs[1:]
                diff.add(outs[0], want(e, k, head), argmax=head in VOCAB_OUTPUTS)
            if int(states[-1][0]) != chunks * chunk:
                raise ExportError(f"{path}: processed_lens is {int(states[-1][0])} after {chunks} chunks of {chunk}")
    if f"streaming/stem{suffix}" in files:
        stem = ort_session(files[f"streaming/stem{suffix}"])
        blocks = [ort_session(files[f"streaming/block{b}{suffix}"]) for b in range(len(model.exits))]
        block_states = [[t.numpy() for t in st] for st in model.encoder.init_block_states(batch, left)]
        embed = embed0
        for k, x in enumerate(windows):
            stem_outs = dict(zip([o.name for o in stem.get_outputs()],
                                 stem.run(None, {"x": x.numpy(), "embed_state": embed})))
            h, embed = stem_outs["h"], stem_outs["new_embed_state"]
            for b, (block, e) in enumerate(zip(blocks, model.exits)):
                names = [i.name for i in block.get_inputs()]
                own = [n for n in names if n != "h" and n not in stem_outs]  # valid and the caches, in order
                feeds = block_feeds([n for n in names if n not in own], h, stem_outs)
                feeds.update(zip(own, block_states[b]))
                outs = dict(zip([o.name for o in block.get_outputs()], block.run(None, feeds)))
                h = outs["next"]
                block_states[b] = [outs["new_" + n] for n in own]
                for head in ("encoder_out", "log_probs"):
                    if head in outs:
                        diff.add(outs[head], want(e, k, head), argmax=head in VOCAB_OUTPUTS)
    return diff


def compare_streaming(model: AsrModel, files: Mapping[str, Path], chunk: int, left: int, exits: Sequence[int],
                      chunks: int = 5, batch: int = 2, seed: int = 1) -> float:
    """The largest absolute difference of :func:`streaming_diff` (the fp32 files)."""
    return streaming_diff(model, files, chunk, left, exits, chunks, batch, seed).max_abs


def decoder_joiner_diff(model: AsrModel, decoder: Optional[Path], joiner: Optional[Path], seed: int = 1) -> Diff:
    """``decoder.onnx`` on every token in every context slot, ``joiner.onnx`` on random projected frames."""
    from splitformer.export.offline import DecoderStep, JoinerStep

    diff = Diff()
    g = torch.Generator().manual_seed(seed)
    if decoder is not None:
        ctx = model.decoder.context_size
        y = torch.randint(0, model.vocab_size, (max(8, model.vocab_size), ctx), generator=g)
        y[:, 0] = torch.arange(y.size(0)) % model.vocab_size
        with torch.no_grad():
            ref = DecoderStep(model).eval()(y)
        diff.add(ort_session(decoder).run(None, {"y": y.numpy()})[0], ref.numpy())
    if joiner is not None:
        j = model.joiner.output_linear.in_features
        a, b = torch.randn(16, j, generator=g), torch.randn(16, j, generator=g)
        with torch.no_grad():
            ref = JoinerStep(model).eval()(a, b)
        diff.add(ort_session(joiner).run(None, {"encoder_out": a.numpy(), "decoder_out": b.numpy()})[0], ref.numpy(),
                 argmax=True)
    return diff


def check_int8(model: AsrModel, files: Mapping[str, Path], lengths: Sequence[Sequence[int]],
               tolerance: float = INT8_TOLERANCE, log: Callable[[str], None] = print) -> Dict[str, Diff]:
    """Compare every ``*.int8`` file in ``files`` (export_model's names) with PyTorch: the per-exit encoders and CTC
    models, the per-block files together, the streaming files together, the decoder and the joiner. Each must
    stay within a relative RMS error of ``tolerance`` (see :class:`Diff`); raises ExportError naming the file
    otherwise. Returns name -> Diff (the per-block and streaming groups under ``blocks.int8`` and
    ``streaming.int8``)."""
    from splitformer.export.offline import CtcExit, EncoderExit

    diffs: Dict[str, Diff] = {}
    for name in files:
        if not name.endswith(".int8"):
            continue
        base = name[: -len(".int8")]
        for prefix, make in (("encoder-exit", EncoderExit), ("ctc-exit", CtcExit)):
            if base.startswith(prefix):
                diffs[name] = features_model_diff(files[name], make(model, int(base[len(prefix):])), lengths)
    if "stem.int8" in files:
        diffs["blocks.int8"] = blocks_diff(model, files, lengths, suffix=".int8")
    streaming = [n for n in files if n.startswith("streaming/") and n.endswith(".int8")
                 and ("exit" in n or "stem" in n)]
    if streaming:
        meta = read_metadata(files[streaming[0]])
        exits = sorted({int(n.split("exit")[1].split(".")[0]) for n in streaming if "-exit" in n})
        diffs["streaming.int8"] = streaming_diff(model, files, int(meta["chunk_size"]), int(meta["left_context_frames"]),
                                                 exits, chunks=int(meta["left_context_frames"]) // int(meta["chunk_size"]) + 2,
                                                 suffix=".int8")
    if "decoder.int8" in files or "joiner.int8" in files:
        diffs["decoder+joiner.int8"] = decoder_joiner_diff(model, files.get("decoder.int8"), files.get("joiner.int8"))
    for name, d in diffs.items():
        if d.rel > tolerance:
            raise ExportError(f"{name}: the int8 file's outputs differ from PyTorch by a relative RMS error of "
                              f"{d.rel:.3g} (> {tolerance}; {d}): quantization broke it, export without --int8")
        log(f"{name}: {d} (int8: relative RMS error must be <= {tolerance})")
    return diffs
