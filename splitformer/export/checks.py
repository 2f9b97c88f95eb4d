"""The checks every export runs: each ONNX file against the PyTorch computation it stands for, on inputs
unlike the traced example (other lengths, padded and unpadded batches)."""
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from splitformer.export.blocks import block_output_names
from splitformer.export.common import ExportError, input_batch, max_abs_diff, ort_session
from splitformer.model.asr_model import AsrModel


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


def compare_streaming(model: AsrModel, files: Mapping[str, Path], chunk: int, left: int, exits: Sequence[int],
                      chunks: int = 5, batch: int = 2, seed: int = 1) -> float:
    """Feed ``chunks`` chunks of two random streams to every streaming file (sherpa-onnx's per-exit encoders and
    CTC models, carrying their states; the per-block form, block after block) and compare each chunk's output
    with PyTorch's chunk-by-chunk computation (``StreamingEncoder``). Give more chunks than the left context
    holds (export does), so that full and rolling caches are both checked."""
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
    worst = 0.0
    embed0 = np.zeros((batch,) + SHERPA_EMBED_SHAPE, dtype=np.float32)
    for e in exits:
        for kind, head in (("encoder", "transducer"), ("ctc", "ctc")):
            path = files.get(f"streaming/{kind}-exit{e}")
            if path is None:
                continue
            sess = ort_session(path)
            names = [i.name for i in sess.get_inputs()]
            states = [s.numpy() for s in _Layout(model, e, left).init_states(batch)] + [embed0, np.zeros(batch, np.int64)]
            for k, x in enumerate(windows):
                outs = sess.run(None, dict(zip(names, [x.numpy()] + states)))
                states = outs[1:]
                with torch.no_grad():
                    want = model.project_encoder(ref[e][k], e) if head == "transducer" else model.ctc_log_probs(ref[e][k], e)
                worst = max(worst, max_abs_diff(outs[0], want.numpy()))
            if int(states[-1][0]) != chunks * chunk:
                raise ExportError(f"{path}: processed_lens is {int(states[-1][0])} after {chunks} chunks of {chunk}")
    if "streaming/stem" in files:
        stem = ort_session(files["streaming/stem"])
        blocks = [ort_session(files[f"streaming/block{b}"]) for b in range(len(model.exits))]
        block_states = [[t.numpy() for t in st] for st in model.encoder.init_block_states(batch, left)]
        embed = embed0
        for k, x in enumerate(windows):
            h, embed = stem.run(None, {"x": x.numpy(), "embed_state": embed})
            for b, (block, e) in enumerate(zip(blocks, model.exits)):
                names = [i.name for i in block.get_inputs()]
                outs = dict(zip([o.name for o in block.get_outputs()], block.run(None, dict(zip(names, [h] + block_states[b])))))
                h = outs["next"]
                block_states[b] = [outs["new_valid"]] + [outs["new_" + n] for n in names[2:]]
                with torch.no_grad():
                    if model.use_transducer:
                        worst = max(worst, max_abs_diff(outs["encoder_out"], model.project_encoder(ref[e][k], e).numpy()))
                    if model.use_ctc:
                        worst = max(worst, max_abs_diff(outs["log_probs"], model.ctc_log_probs(ref[e][k], e).numpy()))
    return worst
