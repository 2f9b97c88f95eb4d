"""The per-block ONNX form (``stem.onnx`` + ``block<i>.onnx``, offline and streaming) of a Splitformer with x2
downsampled branches in its first and last blocks: every exit against PyTorch, fp32 and int8, the position table
shipped once (the stem's ``pos_emb`` output, every block's input of the same name), and ``max_frames``.

Tolerances: fp32 files within 1e-4 of PyTorch (largest absolute difference); int8 files (dynamic quantization)
within a relative RMS error of checks.INT8_TOLERANCE (10 %; measured 0.3-0.6 % here), with >= 95 % of frames
taking the same argmax token.
"""
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pytest
import torch

from splitformer.export.blocks import SHARED_POSITIONS, Block, Stem, export_blocks
from splitformer.export.checks import (INT8_TOLERANCE, blocks_diff, block_feeds, check_int8, compare_blocks,
                                       streaming_diff)
from splitformer.export.common import (ExportError, example_features, extend_positional_tables, input_batch,
                                       ort_session, quantize_int8, read_metadata)
from splitformer.model.config import build_model, default_model_args

torch.set_num_threads(1)  # the test machines are small and shared

VOCAB = 20
# 1100 frames at the stack's rate (x4 front end): past the table's default 1000, so export must extend it; the
# default (12000) only makes the files longer
MAX_FRAMES = 4400
# three blocks: branches (x2 frame rate) in the first and the last, none in the middle one
TINY = dict(num_encoder_layers="3", exit_layers="1,2,3", split_blocks="0,2", encoder_dim="32",
            encoder_unmasked_dim="32", feedforward_dim="64", num_heads="2", cnn_module_kernel="7", decoder_dim=32,
            joiner_dim=32)
LENGTHS = [[211, 100], [157]]  # unlike the traced example: a padded batch and a single utterance


def tiny_model(preset: str, seed: int = 0):
    """A random tiny Splitformer whose learned scales are away from their starting values."""
    torch.manual_seed(seed)
    args = default_model_args(preset=preset, **TINY)
    model = build_model(args, VOCAB).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "edge_scale" in name or "bypass" in name or "weights" in name:
                p.add_(0.3 * torch.randn_like(p))
    assert sorted(model.encoder.branches) == ["0", "2"] and model.encoder.branches["0"].factor == 2
    return model, vars(args)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """(model, fp32 and int8 per-block files by export_model's names), exported once."""
    model, args = tiny_model("splitformer-cpu")
    extend_positional_tables(model, MAX_FRAMES)
    out = tmp_path_factory.mktemp("blocks")
    files: Dict[str, Path] = export_blocks(model, args, out, 17, example_features(model), {"max_frames": MAX_FRAMES})
    files.update({f"{n}.int8": quantize_int8(p) for n, p in list(files.items())})
    return model, files


def run_blocks(model, files: Dict[str, Path], x: torch.Tensor, x_lens: torch.Tensor, suffix: str = "") -> List[dict]:
    """Every block's outputs by name, the stem and blocks run as a driver runs them (checks.block_feeds)."""
    stem = ort_session(files["stem" + suffix])
    stem_outs = dict(zip([o.name for o in stem.get_outputs()], stem.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})))
    h, outs = stem_outs["h"], []
    for b in range(len(model.exits)):
        sess = ort_session(files[f"block{b}{suffix}"])
        o = dict(zip([o.name for o in sess.get_outputs()],
                     sess.run(None, block_feeds([i.name for i in sess.get_inputs()], h, stem_outs))))
        outs.append(o)
        h = o["next"]
    return outs


def torch_exits(model, x, x_lens):
    """exit layer -> (joiner-ready output, CTC log-probs, lengths): PyTorch's whole-utterance encoder to that exit."""
    refs = {}
    with torch.no_grad():
        for e in model.exits:
            enc, lens = model.encode(x, x_lens, exit_layer=e)
            refs[e] = (model.project_encoder(enc, e).numpy(), model.ctc_log_probs(enc, e).numpy(), lens.tolist())
    return refs


def worst(outs: List[dict], refs: dict, exits: List[int]) -> Dict[int, float]:
    diffs = {}
    for b, e in enumerate(exits):
        enc, lp, lens = refs[e]
        diffs[e] = max(float(np.abs(outs[b][name][i, :n] - ref[i, :n]).max())
                       for name, ref in (("encoder_out", enc), ("log_probs", lp)) for i, n in enumerate(lens))
    return diffs


def constant_shapes(path: Path) -> List[List[int]]:
    """Shapes of a graph's initializers and Constant nodes (where a traced table may sit)."""
    graph = onnx.load(str(path)).graph
    return [list(t.dims) for t in graph.initializer] + [
        list(a.t.dims) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.type == a.TENSOR]


def test_stem_and_block_modules_equal_the_models_exits():
    """The PyTorch modules that export traces: the stem and blocks in order give every exit's outputs; a block
    run in another's place does not."""
    model, _ = tiny_model("splitformer-cpu")
    x, x_lens = input_batch(model, [211, 100], torch.Generator().manual_seed(1)), torch.tensor([211, 100])
    refs = torch_exits(model, x, x_lens)
    with torch.no_grad():
        h, h_lens, pos = Stem(model)(x, x_lens)
        outs = []
        for b in range(3):
            outs.append(dict(zip(["next", "encoder_out", "log_probs"], [t.numpy() for t in Block(model, b)(h, h_lens, pos)])))
            h = torch.from_numpy(outs[-1]["next"])
        assert max(worst(outs, refs, model.exits).values()) < 1e-5
        wrong = dict(zip(["next", "encoder_out", "log_probs"], [t.numpy() for t in Block(model, 2)(*Stem(model)(x, x_lens))]))
    assert worst([wrong], refs, [1])[1] > 0.1


def test_every_exit_of_the_blocks_equals_pytorch_fp32(offline):
    model, files = offline
    g = torch.Generator().manual_seed(3)
    for lens in LENGTHS:
        x, x_lens = input_batch(model, lens, g), torch.tensor(lens)
        diffs = worst(run_blocks(model, files, x, x_lens), torch_exits(model, x, x_lens), model.exits)
        assert sorted(diffs) == [1, 2, 3] and max(diffs.values()) < 1e-4, (lens, diffs)
    assert compare_blocks(model, files, LENGTHS) < 1e-4  # the check export runs, over the same lengths


def test_the_position_table_is_in_the_stem_only_and_shared_by_name(offline):
    model, files = offline
    stem = ort_session(files["stem"])
    assert [o.name for o in stem.get_outputs()] == ["h", "h_lens", SHARED_POSITIONS]
    pos_dim = model.encoder.pos_enc.pos_dim
    for name in ["stem"] + [f"block{b}" for b in range(3)]:
        inputs = [i.name for i in ort_session(files[name]).get_inputs()]
        assert inputs == (["x", "x_lens"] if name == "stem" else ["h", "h_lens", SHARED_POSITIONS]), name
        # a table is a (rows, pos_dim) constant with a row per offset: far more rows than any weight of this model
        tables = [d for d in constant_shapes(files[name]) if len(d) == 2 and d[1] == pos_dim and d[0] > 500]
        assert len(tables) == (1 if name == "stem" else 0), (name, tables)
        if name == "stem":  # offsets -(L-1)..L-1 for the L = MAX_FRAMES / 4 frames of the longest input
            assert tables[0][0] >= 2 * (MAX_FRAMES // 4) - 1, tables
    # pos_emb is this input's slice, (1, 2T-1, pos_dim), T the stack's frames, centred on offset 0
    x, x_lens = input_batch(model, [157], torch.Generator().manual_seed(0)), torch.tensor([157])
    h, _, pos = stem.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
    with torch.no_grad():
        want = model.encoder.pos_enc(torch.from_numpy(h).transpose(0, 1))
    assert pos.shape == (1, 2 * h.shape[1] - 1, pos_dim) and np.abs(pos - want.numpy()).max() == 0


def test_a_wrong_block_or_wrong_positions_fail(offline):
    """The checks can fail: blocks run out of order, or positions that are not the stem's, are caught."""
    model, files = offline
    for a, b in ((0, 1), (0, 2)):  # a block with a branch and one without; two with branches
        swapped = dict(files, **{f"block{a}": files[f"block{b}"], f"block{b}": files[f"block{a}"]})
        assert compare_blocks(model, swapped, LENGTHS) > 0.1, (a, b)
    x, x_lens = input_batch(model, [157], torch.Generator().manual_seed(0)), torch.tensor([157])
    stem = ort_session(files["stem"])
    stem_outs = dict(zip(["h", "h_lens", SHARED_POSITIONS], stem.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})))
    block = ort_session(files["block0"])
    good = block.run(None, block_feeds(["h", "h_lens", SHARED_POSITIONS], stem_outs["h"], stem_outs))[1]
    flipped = dict(stem_outs, pos_emb=stem_outs[SHARED_POSITIONS][:, ::-1].copy())  # offsets the other way round
    bad = block.run(None, block_feeds(["h", "h_lens", SHARED_POSITIONS], stem_outs["h"], flipped))[1]
    assert np.abs(bad - good).max() > 1e-2  # the block reads its positions from the input, not a table of its own
    with pytest.raises(ExportError, match="not outputs of the stem"):
        block_feeds(["h", "h_lens", "pos_emb_low"], stem_outs["h"], stem_outs)


def test_a_batch_trimmed_between_blocks_keeps_the_stems_positions(offline):
    """A driver whose longer utterance stopped at exit 1 runs the next blocks on the shorter one alone, ``h``
    trimmed to its frames, with the stem's ``pos_emb`` (made for the longer): the words of that utterance alone."""
    model, files = offline
    x, x_lens = input_batch(model, [211, 100], torch.Generator().manual_seed(7)), torch.tensor([211, 100])
    stem = ort_session(files["stem"])
    stem_outs = dict(zip(["h", "h_lens", SHARED_POSITIONS], stem.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})))
    names = ["h", "h_lens", SHARED_POSITIONS]
    h = ort_session(files["block0"]).run(None, block_feeds(names, stem_outs["h"], stem_outs))[0]
    n = int(stem_outs["h_lens"][1])
    assert n < h.shape[1]
    alone = dict(stem_outs, h_lens=stem_outs["h_lens"][1:])
    h = h[1:, :n]
    refs = torch_exits(model, x[1:, :100], x_lens[1:])
    for b in (1, 2):
        sess = ort_session(files[f"block{b}"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, block_feeds(names, h, alone))))
        h = outs["next"]
        assert np.abs(outs["log_probs"][0] - refs[model.exits[b]][1][0]).max() < 1e-4, b


def test_every_exit_of_the_int8_blocks_is_close_to_pytorch(offline):
    model, files = offline
    d = blocks_diff(model, files, LENGTHS, suffix=".int8")
    assert 0 < d.rel < INT8_TOLERANCE and d.agree >= 0.95, str(d)
    g = torch.Generator().manual_seed(3)
    x, x_lens = input_batch(model, [211, 100], g), torch.tensor([211, 100])
    refs = torch_exits(model, x, x_lens)
    for b, (e, o) in enumerate(zip(model.exits, run_blocks(model, files, x, x_lens, ".int8"))):
        enc, _, lens = refs[e]
        rel = np.linalg.norm(o["encoder_out"][0, :lens[0]] - enc[0, :lens[0]]) / np.linalg.norm(enc[0, :lens[0]])
        assert rel < INT8_TOLERANCE, (e, rel)
    logged: List[str] = []
    assert set(check_int8(model, files, LENGTHS, log=logged.append)) == {"blocks.int8"}
    assert "blocks.int8" in logged[0] and f"<= {INT8_TOLERANCE}" in logged[0]
    broken = dict(files, **{"block0.int8": files["block2.int8"], "block2.int8": files["block0.int8"]})
    with pytest.raises(ExportError, match="blocks.int8: the int8 file's outputs differ"):
        check_int8(model, broken, LENGTHS, log=lambda s: None)


def test_max_frames_is_recorded_and_inputs_that_long_fit(offline):
    model, files = offline
    for name, path in files.items():
        assert read_metadata(path)["max_frames"] == str(MAX_FRAMES), name
    g = torch.Generator().manual_seed(5)
    x, x_lens = input_batch(model, [MAX_FRAMES, 900], g), torch.tensor([MAX_FRAMES, 900])
    diffs = worst(run_blocks(model, files, x, x_lens), torch_exits(model, x, x_lens), model.exits)
    assert max(diffs.values()) < 1e-4, diffs


def test_streaming_blocks_share_the_stems_positions_and_equal_pytorch(tmp_path):
    from splitformer.export.streaming import export_streaming_blocks, position_tables

    model, args = tiny_model("splitformer-cpu-causal")
    chunk, left = 8, 32
    with position_tables(model, chunk + left):
        files = {f"streaming/{k}": v for k, v in export_streaming_blocks(model, args, chunk, left, tmp_path, 17).items()}
    stem = ort_session(files["streaming/stem"])
    assert [o.name for o in stem.get_outputs()] == ["h", "new_embed_state", SHARED_POSITIONS]
    for b in range(3):
        names = [i.name for i in ort_session(files[f"streaming/block{b}"]).get_inputs()]
        assert names[:2] == ["h", "valid"] and names[-1] == SHARED_POSITIONS and names.count(SHARED_POSITIONS) == 1
    chunks = left // chunk + 2  # past the left context: full caches, then rolling ones
    d = streaming_diff(model, files, chunk, left, [], chunks=chunks)
    assert d.frames > 0 and d.max_abs < 1e-4, str(d)
    files.update({f"{n}.int8": quantize_int8(p) for n, p in list(files.items())})
    q = streaming_diff(model, files, chunk, left, [], chunks=chunks, suffix=".int8")
    assert 0 < q.rel < INT8_TOLERANCE and q.agree >= 0.95, str(q)
    swapped = dict(files, **{"streaming/block0": files["streaming/block2"], "streaming/block2": files["streaming/block0"]})
    assert streaming_diff(model, swapped, chunk, left, [], chunks=chunks).max_abs > 0.1


class _Ids:
    """A tokenizer whose words are the token ids, so that words compare ids."""

    @staticmethod
    def decode(ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("strategy", ["entropy", "confidence"])
def test_the_onnx_climb_stops_where_pytorchs_batched_climb_stops(offline, strategy):
    """examples/onnx_decode.py's batched climb (stem + blocks, files leaving the batch as they stop) against
    PyTorch's (runner.climb_batch) on this three-block model with branches: the same exit and the same CTC tokens
    for every utterance of a padded batch, at a threshold that sends them to different exits."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from onnx_decode import Climber

    from splitformer.decoding.exits import ExitReader
    from splitformer.decoding.runner import climb_batch

    model, files = offline
    g = torch.Generator().manual_seed(3)
    lens = [211, 100, 157, 60, 190, 133, 88, 175]
    x = input_batch(model, lens, g)
    x_lens = torch.tensor(lens)
    reader = ExitReader((strategy,), "ctc", method="ctc_greedy_search")
    with torch.no_grad():
        first = [reader.read(model, o, l, e)[0][strategy] for e, o, l in model.encode_exits(x, x_lens)[:2]]
    both = np.sort(np.concatenate(first))
    threshold = float((both[len(both) // 2 - 1] + both[len(both) // 2]) / 2)
    with torch.no_grad():
        c = climb_batch(model, x, x_lens, _Ids, reader, "ctc_greedy_search", 4, torch.device("cpu"),
                        rule=(strategy, threshold))
    want = [(model.exits[k], [int(t) for t in c.words[i][k]]) for i, k in enumerate(c.stop_index.tolist())]
    assert len({e for e, _ in want}) >= 2, want  # the threshold splits the batch
    climber = Climber(Path(files["stem"]).parent, ".onnx", strategy, threshold, "ctc", True, "ctc", None)
    got = climber.run([x[i, :n].numpy() for i, n in enumerate(lens)])
    assert got == want


def test_onnx_decode_refuses_a_file_longer_than_max_frames_and_decodes_the_others(offline, tmp_path, capsys):
    """A file past the export's max_frames is named with the fix (split it, or export with a larger
    --max-frames); the file after it is still decoded and the exit status is 1."""
    import sys

    import soundfile as sf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import onnx_decode

    model, files = offline
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"t{i} {i}\n" for i in range(VOCAB)))
    rng = np.random.default_rng(0)
    long_wav, short_wav = tmp_path / "long.wav", tmp_path / "short.wav"
    sf.write(long_wav, 0.1 * rng.standard_normal(16000 * (MAX_FRAMES // 100 + 2)).astype(np.float32), 16000)
    sf.write(short_wav, 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    status = onnx_decode.main(["--model-dir", str(Path(files["stem"]).parent), "--tokens", str(tokens),
                               "--exit-strategy", "confidence", "--exit-threshold", "0.5", "--method", "ctc",
                               str(long_wav), str(short_wav)])
    out, err = capsys.readouterr()
    assert status == 1
    assert f"{long_wav} is 46.0 s long (4600 frames)" in err and f"at most {MAX_FRAMES} frames" in err
    assert "--max-frames 4600" in err
    assert out.splitlines()[0].startswith(f"{short_wav}\t") and str(long_wav) not in out
