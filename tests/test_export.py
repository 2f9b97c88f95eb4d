"""ONNX export: per-exit encoders and CTC models, shared decoder/joiner, metadata, int8, pretrained.pt, the CLI.

Each encoder type on the branch gets a tiny model, saved as fake epoch checkpoints in a temporary exp dir,
exported once per module, and compared with PyTorch through onnxruntime.
"""
import subprocess
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch

import onnx  # noqa: F401  (requirements.txt: a missing package must fail, not skip)
import onnxruntime  # noqa: F401

from splitformer.checkpoint import average_checkpoints, load_checkpoint, save_checkpoint  # noqa: E402
from splitformer.model.config import build_model, default_model_args, model_args_dict  # noqa: E402
from splitformer.export import (  # noqa: E402
    CtcExit,
    EncoderExit,
    ExportError,
    compare_features_model,
    export_model,
    gather_rel_shift,
    graph_stats,
    load_for_export,
    ort_session,
    parse_exits,
    read_metadata,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 20

# Small overrides of the CPU presets: 2-4 layers, dim 32, vocab 20.
TINY: Dict[str, dict] = {
    # the papers' Conformer stack (abs positions, conv1d front end), with the transducer switched on here
    "ee-conformer": dict(preset="ee-conformer-paper", encoder_dim="32", num_encoder_layers="4", exit_layers="2,4",
                         feedforward_dim="64", num_heads="4", cnn_module_kernel="7", use_transducer=True,
                         decoder_dim=32, joiner_dim=32),
    # Splitformer with Zipformer layers: Conv2d front end, learned x2 input downsampling, branches in both blocks
    "splitformer-zip": dict(preset="splitformer-cpu", encoder_embed="conv2d", input_downsample=2, encoder_dim="32", encoder_unmasked_dim="32",
                            num_encoder_layers="4", exit_layers="2,4", feedforward_dim="64", num_heads="2",
                            cnn_module_kernel="7", split_blocks="0,1", decoder_dim=32, joiner_dim=32),
    # the main job's Splitformer: Conv1d x4 front end, no input downsampling, branches in both blocks
    "splitformer-cpu": dict(preset="splitformer-cpu", encoder_dim="32", encoder_unmasked_dim="32", num_encoder_layers="4",
                            exit_layers="2,4", feedforward_dim="64", num_heads="2", cnn_module_kernel="7",
                            split_blocks="0,1", decoder_dim=32, joiner_dim=32),
    # multi-rate Zipformer2, one exit
    "zipformer2": dict(preset="zipformer-cpu", num_encoder_layers="1,1,1", downsampling_factor="1,2,4",
                       encoder_dim="32,48,32", encoder_unmasked_dim="16,16,16", feedforward_dim="64,64,64",
                       num_heads="2,2,2", cnn_module_kernel="7,7,7", decoder_dim=32, joiner_dim=32),
}
def _perturb(model: torch.nn.Module, scale: float, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in model.state_dict().items()}


def make_exp_dir(root: Path, kind: str) -> Path:
    """epoch-1.pt and epoch-2.pt with distinct weights, in the format train.py writes."""
    torch.manual_seed(0)
    args = default_model_args(**TINY[kind])
    model = build_model(args, VOCAB)
    flags = dict(model_args_dict(args), vocab_size=VOCAB)
    exp = root / kind
    for epoch in (1, 2):
        save_checkpoint(exp / f"epoch-{epoch}.pt", model=_perturb(model, 0.02, epoch),
                        model_avg={k: v.double() if v.is_floating_point() else v
                                   for k, v in _perturb(model, 0.01, 10 + epoch).items()},
                        args=flags, epoch=epoch, batch_idx_train=100 * epoch)
    return exp


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """kind -> (model with epoch 1-2 averaged weights, output dir, export result); exported once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            torch.set_num_threads(1)
            root = tmp_path_factory.mktemp("exp")
            exp = make_exp_dir(root, kind)
            model, flags, _ = load_for_export(exp, epoch=2, avg=2)
            # checks run here only for the first kind: the tests below compare with PyTorch themselves
            res = export_model(model, flags, root / "onnx", model.exits, check=kind == "ee-conformer", log=lambda s: None)
            cache[kind] = (model, root / "onnx", res)
        return cache[kind]

    return get


def _features(lengths: List[int], seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), max(lengths), 80, generator=g), torch.tensor(lengths, dtype=torch.int64)


def ctc_greedy(log_probs: np.ndarray, lens: np.ndarray, blank: int = 0) -> List[List[int]]:
    out = []
    for lp, n in zip(log_probs, lens):
        best = lp[: int(n)].argmax(-1)
        hyp, prev = [], blank
        for t in best.tolist():
            if t != blank and t != prev:
                hyp.append(t)
            prev = t
        out.append(hyp)
    return out


def transducer_greedy(enc: np.ndarray, n: int, decoder: Callable, joiner: Callable, context: int, blank: int = 0,
                      unk: int = 2) -> List[int]:
    """One symbol per frame greedy search over projected encoder frames ``enc (T, J)``; <unk> (icefall's id 2) is
    not emitted, as in icefall, sherpa-onnx and our own search."""
    hyp = [blank] * context
    dec = decoder(np.array([hyp[-context:]], dtype=np.int64))
    for t in range(n):
        tok = int(joiner(enc[t : t + 1], dec).argmax(-1)[0])
        if tok not in (blank, unk):
            hyp.append(tok)
            dec = decoder(np.array([hyp[-context:]], dtype=np.int64))
    return hyp[context:]


# ---------------------------------------------------------------- numerics
ALL_KINDS = list(TINY)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_onnx_matches_torch_at_two_lengths(exported, kind):
    model, out, res = exported(kind)
    t_outs = []
    for e in model.exits:
        for name, module in ((f"encoder-exit{e}", EncoderExit(model, e)), (f"ctc-exit{e}", CtcExit(model, e))):
            path = out / f"{name}.onnx"
            assert path.is_file(), sorted(res.files)
            # two batches: lengths unlike the traced example, one padded batch of 2 and an unpadded single one
            for lengths in ([173, 118], [96]):
                diff = compare_features_model(path, module, [lengths], seed=lengths[0])
                assert diff < 1e-4, f"{kind} {name} lengths {lengths}: max diff {diff}"
            x, x_lens = _features([173, 118], 3)
            o = ort_session(path).run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
            t_outs.append(o[0].shape[1])
            x2, x2_lens = _features([96], 4)
            o2 = ort_session(path).run(None, {"x": x2.numpy(), "x_lens": x2_lens.numpy()})
            assert o2[0].shape[1] < o[0].shape[1] and o2[0].shape[0] == 1  # time and batch axes are really dynamic


def test_inputs_up_to_max_frames_fit_the_position_tables(exported, tmp_path):
    """Zipformer's position table covers 1000 frames at each stack's rate unless export extends it."""
    model, out, _ = exported("zipformer2")
    assert read_metadata(out / "ctc-exit3.onnx")["max_frames"] == "12000"  # the default: 2 minutes
    torch.manual_seed(0)
    args = default_model_args(**dict(TINY["zipformer2"], use_transducer=False))
    small = build_model(args, VOCAB)
    res = export_model(small, vars(args), tmp_path, small.exits, max_frames=2400, check=False, log=lambda s: None)
    assert read_metadata(res.files["ctc-exit3"])["max_frames"] == "2400"
    # 2400 frames run the first stack at 1196 frames, past the 1000 of the untouched table
    assert compare_features_model(res.files["ctc-exit3"], CtcExit(small, 3), [[2400, 1100]], seed=5) < 1e-4


@pytest.mark.parametrize("kind", ["ee-conformer", "splitformer-zip"])
def test_lower_exit_runs_fewer_layers(exported, kind):
    model, out, _ = exported(kind)
    lo, hi = model.exits[0], model.exits[-1]
    for prefix in ("encoder", "ctc"):
        s_lo, s_hi = graph_stats(out / f"{prefix}-exit{lo}.onnx"), graph_stats(out / f"{prefix}-exit{hi}.onnx")
        assert s_lo["nodes"] < s_hi["nodes"] and s_lo["matmul_like"] < s_hi["matmul_like"], (s_lo, s_hi)
        # the upper block's layers are absent from the lower exit's weights (up to a few folded norms)
        upper = sum(p.numel() for i in model.encoder.block_layers(1) for p in model.encoder.layers[i].parameters())
        assert s_hi["params"] - s_lo["params"] >= 0.98 * upper, (s_lo, s_hi, upper)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_ctc_greedy_decode_matches_torch(exported, kind):
    model, out, _ = exported(kind)
    x, x_lens = _features([181, 140, 77], 7)
    for e in model.exits:
        lp, lp_lens = ort_session(out / f"ctc-exit{e}.onnx").run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
        with torch.no_grad():
            enc, enc_lens = model.encode(x, x_lens, exit_layer=e)
            ref = model.ctc_log_probs(enc, e)
        hyp_onnx = ctc_greedy(lp, lp_lens)
        hyp_torch = ctc_greedy(ref.numpy(), enc_lens.numpy())
        assert hyp_onnx == hyp_torch
        assert sum(map(len, hyp_torch)) > 0  # a random model emits something, so the comparison has content


@pytest.mark.parametrize("kind", ["ee-conformer", "splitformer-zip", "zipformer2"])
def test_transducer_greedy_with_shared_joiner_matches_torch(exported, kind):
    model, out, _ = exported(kind)
    ctx = model.decoder.context_size
    dec_s, join_s = ort_session(out / "decoder.onnx"), ort_session(out / "joiner.onnx")

    def onnx_dec(y):
        return dec_s.run(None, {"y": y})[0]

    def onnx_join(a, b):
        return join_s.run(None, {"encoder_out": a, "decoder_out": b})[0]

    def torch_dec(y):
        with torch.no_grad():
            return model.project_decoder(model.decoder(torch.from_numpy(y), need_pad=False)).squeeze(1).numpy()

    def torch_join(a, b):
        with torch.no_grad():
            return model.joiner(torch.from_numpy(a), torch.from_numpy(b)).numpy()

    y = np.array([[0] * ctx, [3] * ctx, list(range(5, 5 + ctx))], dtype=np.int64)
    assert np.abs(onnx_dec(y) - torch_dec(y)).max() < 1e-5
    x, x_lens = _features([150], 11)
    for e in model.exits:
        enc, enc_lens = ort_session(out / f"encoder-exit{e}.onnx").run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
        with torch.no_grad():
            ref, ref_lens = model.encode(x, x_lens, exit_layer=e)
            ref = model.project_encoder(ref, e).numpy()
        n = int(ref_lens[0])
        assert np.abs(onnx_join(enc[0, :4], onnx_dec(y[:1].repeat(4, 0))) - torch_join(ref[0, :4], torch_dec(y[:1].repeat(4, 0)))).max() < 1e-4
        assert transducer_greedy(enc[0], n, onnx_dec, onnx_join, ctx) == transducer_greedy(ref[0], n, torch_dec, torch_join, ctx)


def test_gather_rel_shift_equals_strided_versions():
    from splitformer.model.conformer import rel_shift

    s = torch.randn(2, 3, 5, 9)
    assert torch.equal(gather_rel_shift(s), rel_shift(s))
    from splitformer.model.zipformer import _rel_shift

    assert torch.equal(gather_rel_shift(s), _rel_shift(s))


# ---------------------------------------------------------------- files, metadata, checkpoints
def test_metadata_and_file_set(exported):
    model, out, res = exported("ee-conformer")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ctc-exit2.onnx", "ctc-exit4.onnx", "decoder.onnx", "encoder-exit2.onnx", "encoder-exit4.onnx",
                     "joiner.onnx"]
    assert all(d < 1e-4 for d in res.max_diffs.values()) and len(res.max_diffs) == 4
    enc = read_metadata(out / "encoder-exit2.onnx")
    assert enc["exit_layer"] == "2" and enc["exits"] == "2,4" and enc["vocab_size"] == str(VOCAB)
    assert enc["context_size"] == "2" and enc["model_type"] == "zipformer2" and enc["architecture"] == "early-exit-conformer"
    assert enc["subsampling_factor"] == "4" and enc["joiner_dim"] == "32"
    assert "max_frames" not in enc  # conformer positions have no length limit
    ctc = read_metadata(out / "ctc-exit4.onnx")
    assert ctc["model_type"] == "zipformer2_ctc" and ctc["exit_layer"] == "4" and ctc["blank_id"] == "0"
    assert read_metadata(out / "decoder.onnx")["context_size"] == "2"
    assert read_metadata(out / "joiner.onnx")["vocab_size"] == str(VOCAB)


def test_ctc_only_splitformer_paper_gets_only_ctc_files(tmp_path):
    """The papers' CTC-only Splitformer (frame-dropping branches summed in) exports CTC models only."""
    torch.manual_seed(0)
    args = default_model_args(**dict(TINY["ee-conformer"], preset="splitformer-paper", use_transducer=False,
                                     num_encoder_layers="2", exit_layers="1,2", split_blocks="0,1"))
    model = build_model(args, VOCAB)
    assert sorted(model.encoder.branches) == ["0", "1"] and model.encoder.branches["0"].downsample.mode == "drop"
    res = export_model(model, vars(args), tmp_path, [1, 2], log=lambda s: None)
    assert sorted(res.files) == ["ctc-exit1", "ctc-exit2"]
    assert max(res.max_diffs.values()) < 1e-4  # checked at export over 4 batches of other lengths
    assert read_metadata(res.files["ctc-exit2"])["architecture"] == "splitformer-conformer"


def test_int8_files_run_and_are_smaller(exported, tmp_path):
    from splitformer.export import quantize_int8

    model, out, _ = exported("ee-conformer")
    q = quantize_int8(out / "ctc-exit4.onnx")
    try:
        # MatMul weights (most of a real model) shrink 4x; convolutions stay float, as in icefall's int8 export
        assert q.stat().st_size < 0.9 * (out / "ctc-exit4.onnx").stat().st_size
        assert read_metadata(q)["quantization"] == "dynamic-int8" and read_metadata(q)["exit_layer"] == "4"
        assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in __import__("onnx").load(str(q)).graph.node)
        x, x_lens = _features([150, 120], 5)
        lp_q = ort_session(q).run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})[0]
        lp = ort_session(out / "ctc-exit4.onnx").run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})[0]
        assert np.isfinite(lp_q).all() and np.abs(np.exp(lp_q) - np.exp(lp)).max() < 0.1
    finally:
        q.unlink()


def test_int8_files_are_compared_with_pytorch_and_a_wrong_one_fails(exported):
    """checks.check_int8: each int8 file within a relative RMS error of INT8_TOLERANCE of PyTorch (its largest
    difference is not a useful bound); the encoder of another exit, quantized, is far outside it."""
    from splitformer.export import quantize_int8
    from splitformer.export.checks import INT8_TOLERANCE, check_int8

    model, out, _ = exported("splitformer-zip")
    files = {f"{n}.int8": quantize_int8(out / f"{n}.onnx") for n in ("encoder-exit2", "ctc-exit4", "decoder", "joiner")}
    try:
        logged: list = []
        diffs = check_int8(model, files, [[173, 118], [96]], log=logged.append)
        assert set(diffs) == {"encoder-exit2.int8", "ctc-exit4.int8", "decoder+joiner.int8"}
        assert all(0 < d.rel < INT8_TOLERANCE for d in diffs.values()), {n: str(d) for n, d in diffs.items()}
        assert diffs["ctc-exit4.int8"].frames > 0 and diffs["ctc-exit4.int8"].agree > 0.9
        assert all(f"relative RMS error must be <= {INT8_TOLERANCE}" in line for line in logged)
        wrong = {"encoder-exit4.int8": files["encoder-exit2.int8"]}
        with pytest.raises(ExportError, match="encoder-exit4.int8: the int8 file's outputs differ from PyTorch"):
            check_int8(model, wrong, [[96]], log=lambda s: None)
    finally:
        for f in files.values():
            f.unlink()


@pytest.mark.parametrize("kind,overrides", [
    ("zipformer2", {}),  # conv2d front end x2, output averaging x2
    ("zipformer2", dict(output_downsampling_factor=1)),  # the bug: was written as 4
    ("zipformer2", dict(preset="zipformer-cpu-lite")),  # conv1d x4 front end, no output averaging
    ("splitformer-zip", {}),  # conv2d x2, input downsampling x2
    ("splitformer-cpu", {}),  # conv1d x4, no input downsampling
    ("ee-conformer", {}),
])
def test_subsampling_factor_metadata_is_the_models_own(kind, overrides):
    """The metadata's input frames per output frame against what the model does to a long input."""
    from splitformer.export.common import subsampling_factor

    args = default_model_args(**dict(TINY[kind], **overrides))
    model = build_model(args, VOCAB).eval()
    n = 4000
    with torch.no_grad():
        _, lens = model.encode(torch.zeros(1, n, 80), torch.tensor([n]))
    factor = subsampling_factor(vars(args))
    assert factor == round(n / int(lens[0])), (factor, n, int(lens[0]))


def test_cli_script_exports_average_tokens_and_pretrained(tmp_path):
    exp = make_exp_dir(tmp_path, "ee-conformer")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"t{i} {i}\n" for i in range(VOCAB)))
    out = tmp_path / "out"
    cmd = [str(REPO / "splitformer" / "export.py"), "--exp-dir", str(exp), "--epoch", "2", "--avg", "2",
           "--exit-layer", "2", "--output-dir", str(out), "--tokens", str(tokens), "--int8"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # not the repo root: sys.path
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "ctc-exit2.onnx", "ctc-exit2.int8.onnx", "encoder-exit2.onnx", "encoder-exit2.int8.onnx", "decoder.onnx",
        "decoder.int8.onnx", "joiner.onnx", "joiner.int8.onnx", "tokens.txt", "pretrained.pt"])
    assert "max |onnx - torch|" in r.stderr
    assert "ctc-exit2.int8: max |onnx - torch|" in r.stderr and "relative RMS error must be <=" in r.stderr
    pre = load_checkpoint(out / "pretrained.pt", required_keys=("model", "args"))
    avg = average_checkpoints([exp / "epoch-1.pt", exp / "epoch-2.pt"])
    assert set(pre["model"]) == set(avg) and all(torch.equal(pre["model"][k], avg[k]) for k in avg)
    assert pre["args"]["vocab_size"] == VOCAB and pre["args"]["exit_layers"] == "2,4"
    # pretrained.pt rebuilds the same model
    from splitformer.export import model_from_args

    m, _ = model_from_args(pre["args"])
    m.load_state_dict(pre["model"])


def test_use_averaged_model_and_errors(tmp_path):
    from splitformer.averaging import load_averaged_state
    from splitformer.export import main

    exp = make_exp_dir(tmp_path, "ee-conformer")
    written = main(["--exp-dir", str(exp), "--epoch", "2", "--avg", "1", "--use-averaged-model", "--onnx", "false"])
    assert [p.name for p in written] == ["pretrained.pt"]
    ref = load_averaged_state(exp, epoch=2, avg=1, use_averaged_model=True)
    got = load_checkpoint(written[0])["model"]
    assert all(torch.equal(got[k], ref[k].float()) for k in ref)
    # --iter N --avg A: the A newest checkpoint-B.pt with B <= N
    for b, e in ((100, 1), (200, 2), (300, 2)):
        (exp / f"checkpoint-{b}.pt").write_bytes((exp / f"epoch-{e}.pt").read_bytes())
    written = main(["--exp-dir", str(exp), "--iter", "250", "--avg", "2", "--onnx", "false", "--output-dir", str(tmp_path / "it")])
    got = load_checkpoint(written[0])["model"]
    ref = average_checkpoints([exp / "epoch-1.pt", exp / "epoch-2.pt"])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(SystemExit, match="exactly one of --epoch E or --iter N"):
        main(["--exp-dir", str(exp), "--epoch", "2", "--iter", "200"])
    with pytest.raises(SystemExit, match="exits after layers 2, 4"):
        main(["--exp-dir", str(exp), "--epoch", "2", "--exit-layer", "3", "--pretrained", "false"])
    with pytest.raises(SystemExit, match="epoch-0.pt"):
        main(["--exp-dir", str(exp), "--epoch", "2", "--avg", "3"])
    bad_tokens = tmp_path / "tokens.txt"
    bad_tokens.write_text("a 0\nb 1\n")
    with pytest.raises(SystemExit, match="lists 2 tokens but the model has vocab_size 20"):
        main(["--exp-dir", str(exp), "--epoch", "2", "--tokens", str(bad_tokens), "--pretrained", "false"])


def test_parse_exits():
    assert parse_exits("all", [2, 4, 6]) == [2, 4, 6]
    assert parse_exits("6,2", [2, 4, 6]) == [2, 6]
    with pytest.raises(ExportError, match="exits after layers 2, 4, 6"):
        parse_exits("5", [2, 4, 6])
    with pytest.raises(ExportError, match="comma-separated"):
        parse_exits("top", [2, 4, 6])


def _knf_features(wave: np.ndarray, sr: int) -> np.ndarray:
    """80-dim fbank as sherpa-onnx computes it for offline models (no dither, no edge snipping)."""
    import kaldi_native_fbank as knf
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.frame_opts.snip_edges = False
    opts.frame_opts.samp_freq = sr
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = -400
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(sr, wave.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])[None].astype(np.float32)


def _sherpa_setup(exported, tmp_path, kind):
    import sherpa_onnx
    model, out, _ = exported(kind)
    syms = ["<blk>", "<sos/eos>", "<unk>"] + [f"\u2581w{i}" for i in range(3, VOCAB)]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{s} {i}\n" for i, s in enumerate(syms)), encoding="utf-8")
    sr = 16000
    wave = (0.1 * np.random.RandomState(0).randn(2 * sr)).astype(np.float32)
    feats = _knf_features(wave, sr)
    feat_lens = np.array([feats.shape[1]], dtype=np.int64)

    def text(ids):
        return "".join(syms[i] for i in ids).replace("\u2581", " ").strip()

    def sherpa_text(rec) -> str:
        s = rec.create_stream()
        s.accept_waveform(sr, wave)
        rec.decode_stream(s)
        return s.result.text.strip()

    return sherpa_onnx, model, out, tokens, feats, feat_lens, text, sherpa_text


SHERPA_KINDS = ["splitformer-zip", "splitformer-cpu"]  # Conv2d and Conv1d front ends


@pytest.mark.parametrize("kind", SHERPA_KINDS)
def test_sherpa_onnx_runs_the_exported_ctc_files_and_agrees(exported, tmp_path, kind):
    """sherpa-onnx loads the CTC model of every exit and decodes as our greedy search does."""
    sherpa_onnx, model, out, tokens, feats, feat_lens, text, sherpa_text = _sherpa_setup(exported, tmp_path, kind)
    for e in model.exits:
        ctc = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(model=str(out / f"ctc-exit{e}.onnx"), tokens=str(tokens),
                                                               num_threads=1)
        lp, lp_lens = ort_session(out / f"ctc-exit{e}.onnx").run(None, {"x": feats, "x_lens": feat_lens})
        ours = ctc_greedy(lp, lp_lens)[0]
        assert ours and sherpa_text(ctc) == text(ours), e


@pytest.mark.parametrize("kind", SHERPA_KINDS)
def test_sherpa_onnx_runs_the_exported_transducer_files_and_agrees(exported, tmp_path, kind):
    """sherpa-onnx loads encoder/decoder/joiner and decodes as our greedy search does. (It starts from
    [blank] * context_size where we start from [-1, blank]; the decoder reads both as the start.)"""
    sherpa_onnx, model, out, tokens, feats, feat_lens, text, sherpa_text = _sherpa_setup(exported, tmp_path, kind)
    dec_s, join_s = ort_session(out / "decoder.onnx"), ort_session(out / "joiner.onnx")
    for e in model.exits:
        rnnt = sherpa_onnx.OfflineRecognizer.from_transducer(
            encoder=str(out / f"encoder-exit{e}.onnx"), decoder=str(out / "decoder.onnx"),
            joiner=str(out / "joiner.onnx"), tokens=str(tokens), num_threads=1, decoding_method="greedy_search")
        enc, enc_lens = ort_session(out / f"encoder-exit{e}.onnx").run(None, {"x": feats, "x_lens": feat_lens})
        hyp = transducer_greedy(enc[0], int(enc_lens[0]), lambda y: dec_s.run(None, {"y": y})[0],
                                lambda a, b: join_s.run(None, {"encoder_out": a, "decoder_out": b})[0],
                                model.decoder.context_size)
        assert hyp and sherpa_text(rnnt) == text(hyp), e
