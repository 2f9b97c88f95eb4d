"""--encoder hf: transformers backbones (Wav2Vec2, HuBERT, WavLM) with early exits, from a model directory
through training, decode.py, pretrained.py and the checkpoint."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_fixture import VARIANTS, tiny_backbone, tiny_backbone_dir
from recogs import read_recogs
from splitformer.decoding.loading import build_and_load, checkpoint_args
from splitformer.model.config import build_model, default_model_args, model_args_dict
from splitformer.model.hf_encoder import HfBackboneError, HfExitEncoder, load_backbone
from splitformer.summary import count_params, exit_macs

torch.set_num_threads(1)
VOCAB = 30
HEADS = ("decoder", "decoder_proj", "joiner", "encoder_proj", "simple_am_proj", "simple_lm_proj", "ctc_output")


def hf_args(model_dir: Path, **overrides) -> argparse.Namespace:
    kw = dict(encoder="hf", hf_model=str(model_dir), exit_layers="2,4", decoder_dim=32, joiner_dim=32, feature_norm="none")
    kw.update(overrides)
    return default_model_args(**kw)


def audio(lens=(16000, 11200)):
    torch.manual_seed(1)
    lens = torch.tensor(lens)
    x = torch.randn(len(lens), int(lens.max())) * 0.1
    x = x * (torch.arange(x.size(1))[None] < lens[:, None])
    return x, lens


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_loaded_directory_gives_the_original_models_outputs(variant, tmp_path):
    """Each utterance of a padded batch gets what transformers' own model gives it alone (unpadded): for the "group"
    feature encoders that needs the padding-free first norm, which the same batch through transformers lacks."""
    original = tiny_backbone(variant)
    model = build_model(hf_args(tiny_backbone_dir(tmp_path, variant), hf_normalize="false"), VOCAB).eval()
    x, lens = audio()
    with torch.no_grad():
        out, out_lens = model.encode(x, lens)
        alone = [original(x[i:i + 1, :n]).last_hidden_state[0] for i, n in enumerate(lens.tolist())]
    assert out_lens.tolist() == original._get_feat_extract_output_lengths(lens).tolist() == [49, 34]
    for i, n in enumerate(out_lens.tolist()):
        torch.testing.assert_close(out[i, :n], alone[i], atol=2e-5, rtol=1e-4)


def _reference_exits(backbone, hidden_states, exits):
    """What each exit should be, from transformers' ``output_hidden_states`` (entry k: layer k's output, entry 0
    the layers' input): a pre-LN ("stable layer norm") model's exits apply the encoder's final LayerNorm, as its
    top does."""
    stable = bool(getattr(backbone.config, "do_stable_layer_norm", False))
    return {e: backbone.encoder.layer_norm(hidden_states[e]) if stable else hidden_states[e] for e in exits}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_exit_of_the_layer_by_layer_run_is_transformers_hidden_state(variant, tmp_path):
    """An exit after every layer: each, run layer by layer by us, equals the hidden state transformers' own
    forward reports after that layer (each utterance alone, as the top-exit test)."""
    original = tiny_backbone(variant)
    model = build_model(hf_args(tiny_backbone_dir(tmp_path, variant), hf_normalize="false", exit_layers="1,2,3,4"),
                        VOCAB).eval()
    x, lens = audio()
    with torch.no_grad():
        ours = {e: out for e, out, _ in model.iter_exits(x, lens)}
        for i, n in enumerate(lens.tolist()):
            hs = original(x[i:i + 1, :n], output_hidden_states=True).hidden_states
            assert len(hs) == 5  # the layers' input, then each of the 4 layers
            want = _reference_exits(original, hs, [1, 2, 3, 4])
            frames = want[1].shape[1]
            for e in (1, 2, 3, 4):
                torch.testing.assert_close(ours[e][i, :frames], want[e][0], atol=2e-5, rtol=1e-4)
            assert not torch.allclose(want[1], want[4])  # the exits differ: each is checked against its own layer


def test_a_training_step_with_time_masking_is_transformers_own(tmp_path):
    """Training mode with the backbone's time masking on (SpecAugment on the feature encoder's output, drawn from
    numpy's global generator by transformers' _compute_mask_indices): seeded alike, every exit equals
    transformers' hidden states given that very mask; the mask bites, and it trains masked_spec_embed."""
    import numpy as np
    import transformers
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    from hf_fixture import TINY

    # pre-LN with layer-normed convolutions: padding-free, so a padded batch matches transformers' batch exactly;
    # built with masking on, as the published checkpoints are, so that it has its masked_spec_embed
    torch.manual_seed(0)
    masking = dict(TINY, mask_time_prob=0.3, mask_time_length=3, mask_time_min_masks=2)
    transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**masking, do_stable_layer_norm=True, feat_extract_norm="layer")
                               ).save_pretrained(str(tmp_path / "masking"))
    model = build_model(hf_args(tmp_path / "masking", hf_normalize="false", exit_layers="1,2,3,4"), VOCAB)
    backbone = model.encoder.backbone
    cfg = backbone.config
    x, lens = audio()
    frames = model.encoder.output_lengths(lens)
    sample_mask = (torch.arange(x.size(1))[None] < lens[:, None]).long()
    frame_mask = (torch.arange(int(frames.max()))[None] < frames[:, None]).long()
    model.train()
    assert cfg.layerdrop == 0.0  # our encoder turns LayerDrop off for good (an exit needs its layer)

    np.random.seed(11)
    want_mask = _compute_mask_indices((x.size(0), int(frames.max())), cfg.mask_time_prob, cfg.mask_time_length,
                                      attention_mask=frame_mask, min_masks=cfg.mask_time_min_masks)
    assert want_mask.sum() >= 2 * cfg.mask_time_min_masks and not want_mask[frame_mask.numpy() == 0].any()
    np.random.seed(11)
    ours = model.encoder(x, lens)
    ref = backbone(x.clone(), attention_mask=sample_mask, mask_time_indices=torch.from_numpy(want_mask),
                   output_hidden_states=True).hidden_states
    want = _reference_exits(backbone, ref, [1, 2, 3, 4])
    for (out, out_lens), e in zip(ours, (1, 2, 3, 4)):
        assert out_lens.tolist() == frames.tolist()
        for i, n in enumerate(frames.tolist()):
            torch.testing.assert_close(out[i, :n], want[e][i, :n], atol=2e-5, rtol=1e-4)
    # in eval mode (no masking) the outputs are others: the masking really ran
    model.eval()
    with torch.no_grad():
        unmasked = model.encoder(x, lens)[-1][0]
    n0 = int(frames[0])
    assert not torch.allclose(ours[-1][0][0, :n0], unmasked[0, :n0], atol=1e-3)
    # one training step: the loss reaches the mask embedding only through the masked frames
    model.train()
    np.random.seed(11)
    res = model(x, lens, [[3, 4, 5], [6, 7]])
    sum(r["ctc"] + r["pruned"] for r in res.values()).backward()
    assert backbone.masked_spec_embed.grad is not None and backbone.masked_spec_embed.grad.abs().sum() > 0


def test_missing_weights_and_unsupported_models_are_refused(tmp_path):
    import transformers

    d = tiny_backbone_dir(tmp_path, "wav2vec2")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, str(d / "model.safetensors"))
    with pytest.raises(HfBackboneError, match="weights are missing"):
        load_backbone(str(d))
    sew = transformers.SEWModel(transformers.SEWConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64))
    with pytest.raises(HfBackboneError, match="model types"):
        HfExitEncoder(sew, [1, 2])


def test_parameters_are_the_backbones_plus_our_heads(tmp_path):
    original = tiny_backbone("wav2vec2")
    model = build_model(hf_args(tiny_backbone_dir(tmp_path, "wav2vec2")), VOCAB)
    assert count_params(model.encoder) == count_params(original)
    assert count_params(model.encoder_embed) == 0
    heads = sum(count_params(getattr(model, n)) for n in HEADS)
    assert count_params(model) == count_params(original) + heads
    # per exit: joiner projection, simple-loss projection and CTC head, each a Linear from the 32-wide output
    assert count_params(model.encoder_proj) == 2 * (32 * 32 + 32)
    assert count_params(model.ctc_output) == count_params(model.simple_am_proj) == 2 * (32 * VOCAB + VOCAB)


@pytest.mark.parametrize("preset, params", [("w2v2-base-exits", 94_371_712), ("hubert-base-exits", 94_371_712),
                                            ("wavlm-base-plus-exits", 94_381_936)])
def test_presets_build_the_base_architectures(preset, params):
    """Built from transformers' default config of each family (--hf-weights random: nothing to download):
    Wav2Vec2-base's published 94.4M, exits every 2 of its 12 layers."""
    model = build_model(default_model_args(preset=preset, hf_weights="random"), VOCAB)
    assert count_params(model.encoder) == params
    assert model.exits == [2, 4, 6, 8, 10, 12]
    assert model.input_kind == "waveform"


def test_encode_runs_only_the_layers_up_to_the_exit(tmp_path):
    model = build_model(hf_args(tiny_backbone_dir(tmp_path, "wavlm")), VOCAB).eval()
    layers = model.encoder.backbone.encoder.layers
    calls = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x, lens = audio()
    with torch.no_grad():
        model.encode(x, lens, exit_layer=2)
        assert calls == [0, 1]
        calls.clear()
        model.encode(x, lens)
        assert calls == [0, 1, 2, 3]
        calls.clear()
        it = model.iter_exits(x, lens)
        first = next(it)
        assert first[0] == 2 and calls == [0, 1]  # dynamic exits: the next block runs only when asked
        second = next(it)
        assert second[0] == 4 and calls == [0, 1, 2, 3]
        # each exit equals the same exit computed alone (WavLM's position bias carried from layer to layer)
        torch.testing.assert_close(second[1], model.encode(x, lens, exit_layer=4)[0])


def test_a_checkpoint_rebuilds_the_model_without_its_directory(tmp_path):
    d = tiny_backbone_dir(tmp_path, "hubert")
    args = hf_args(d)
    model = build_model(args, VOCAB).eval()
    stored = model_args_dict(args)
    assert json.loads(stored["hf_config"])["model_type"] == "hubert"
    shutil.rmtree(d)
    ckpt = torch.load(_save(tmp_path, model, args), weights_only=True)
    loaded = build_and_load(checkpoint_args(ckpt, tmp_path), ckpt["model"], VOCAB, "test").eval()
    x, lens = audio()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x, lens)[0], model.encode(x, lens)[0])


def test_freezing_and_the_backbone_learning_rate(tmp_path):
    from splitformer.trainer.loop import set_backbone_frozen
    from splitformer.trainer.parts import build_optimizer

    model = build_model(hf_args(tiny_backbone_dir(tmp_path, "wav2vec2")), VOCAB)
    conv = list(model.encoder.backbone.feature_extractor.parameters())
    assert conv and not any(p.requires_grad for p in conv)  # --freeze-feature-encoder is on by default
    opt = build_optimizer(model, argparse.Namespace(base_lr=0.04, backbone_lr_scale=0.1))
    heads, backbone = opt.param_groups
    assert heads["lr"] == 0.04 and backbone["lr"] == pytest.approx(0.004)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in conv)
    assert len(in_opt) == sum(p.requires_grad for p in model.parameters())

    x, lens = audio()
    model.train()
    set_backbone_frozen(model, True)  # --freeze-backbone-steps: only the heads learn
    res = model(x, lens, [[3, 4, 5], [6, 7]])
    sum(r["ctc"] + r["pruned"] for r in res.values()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.ctc_output[0][1].weight.grad is not None
    set_backbone_frozen(model, False)
    res = model(x, lens, [[3, 4, 5], [6, 7]])
    sum(r["ctc"] + r["pruned"] for r in res.values()).backward()
    assert model.encoder.backbone.encoder.layers[0].attention.q_proj.weight.grad is not None


def test_cost_includes_the_convolutional_feature_encoder(tmp_path):
    model = build_model(hf_args(tiny_backbone_dir(tmp_path, "wav2vec2")), VOCAB)
    macs = exit_macs(model, seconds=2.0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encoder.backbone.feature_extractor(torch.zeros(1, 32000))
    conv = counter.get_total_flops() / 2 / 2.0
    assert conv > 0 and macs[2] > conv
    assert macs[4] > macs[2]
    layer_cost = macs[4] - macs[2]  # two transformer layers
    assert macs[2] - layer_cost == pytest.approx(conv, rel=0.2)  # the rest of exit 2 is mostly the convolutions


def test_clear_errors(tmp_path):
    with pytest.raises(HfBackboneError, match="huggingface-cli download"):
        load_backbone(str(tmp_path / "no-such-model"))
    with pytest.raises(HfBackboneError, match="layers 1..4"):
        build_model(hf_args(tiny_backbone_dir(tmp_path, "wav2vec2"), exit_layers="2,6"), VOCAB)
    with pytest.raises(ValueError, match="needs --hf-model"):
        build_model(default_model_args(encoder="hf"), VOCAB)
    model = build_model(hf_args(tiny_backbone_dir(tmp_path, "wav2vec2")), VOCAB)
    with pytest.raises(ValueError, match="raw 16 kHz audio"):
        model.encode(torch.zeros(1, 100, 80), torch.tensor([100]))


def _save(root: Path, model, args, epoch: int = 1) -> Path:
    (root / "exp").mkdir(parents=True, exist_ok=True)
    path = root / "exp" / f"epoch-{epoch}.pt"
    torch.save(dict(model=model.state_dict(), model_avg=model.state_dict(), args=model_args_dict(args), epoch=epoch,
                    batch_idx_train=0), path)
    return path


# ---------------------------------------------------------------- real AN4 audio
@pytest.fixture(scope="module")
def overfit_hf(an4_dir, tmp_path_factory):
    """The tiny pre-LN Wav2Vec2 (padding-invariant, so any batching gives the same words) trained on 8 AN4
    utterances, saved as epoch-1.pt with those cuts as the dev set."""
    from an4_fixture import prepared_an4
    from test_overfit import eight_short_cuts, overfit
    from splitformer.data.tokenizer import Tokenizer

    data = prepared_an4(tmp_path_factory.getbasetemp() / "an4_prepared", an4_dir)
    root = tmp_path_factory.mktemp("hf-an4")
    tok = Tokenizer(data / "lang_bpe_30" / "bpe.model")
    cuts = eight_short_cuts(data)
    torch.manual_seed(0)
    args = hf_args(tiny_backbone_dir(root, "wav2vec2-stable"))
    model = build_model(args, tok.vocab_size)
    losses, words, texts = overfit(model, cuts, tok)
    (root / "manifests").mkdir()
    cuts.to_file(root / "manifests" / "an4_cuts_dev.jsonl.gz")
    _save(root, model, args)
    return dict(root=root, losses=losses, words=words, texts=texts, cuts=cuts, bpe=data / "lang_bpe_30" / "bpe.model")


def test_overfits_eight_an4_utterances_at_every_exit(overfit_hf):
    from test_overfit import assert_overfit

    assert_overfit(overfit_hf["losses"], overfit_hf["words"], overfit_hf["texts"])


def test_decode_py_all_exits_and_dynamic_exits_on_audio(overfit_hf):
    from splitformer.decode import main as decode_main

    t = overfit_hf
    common = ["--exp-dir", str(t["root"] / "exp"), "--epoch", "1", "--avg", "1", "--manifest-dir", str(t["root"] / "manifests"),
              "--bpe-model", str(t["bpe"]), "--test-sets", "dev", "--max-duration", "6", "--num-threads", "1",
              "--decoding-method", "ctc_greedy_search"]
    decode_main(common + ["--exit-layer", "all"])
    out = t["root"] / "exp" / "ctc_greedy_search"
    runs = json.loads((out / "results-dev.json").read_text())["runs"]
    by_exit = {r["exit_layer"]: r for r in runs.values() if r["kind"] == "fixed"}
    assert sorted(by_exit) == [2, 4]
    for e, r in by_exit.items():
        # decode.py reads the audio itself, in batches of its own: the same words as the training batch
        _, hyps = read_recogs(out / f"recogs-dev-epoch-1_avg-1_exit-{e}_ctc_greedy_search.txt")
        hyp = {cid: " ".join(h) for cid, h in hyps.items()}
        expected = dict(zip([c.id for c in t["cuts"].sort_by_duration(ascending=False)], t["words"][e]))
        assert hyp == expected
        assert r["macs_per_second"] > 0 and r["num_utts"] == 8
    decode_main(common + ["--exit-strategy", "confidence", "--exit-threshold", "0.5"])
    dyn = [r for r in json.loads((out / "results-dev.json").read_text())["runs"].values() if r["kind"] != "fixed"]
    assert dyn and all(r["wer"] <= max(x["wer"] for x in by_exit.values()) for r in dyn)


def _sph_files(t) -> list:
    """The overfit cuts' audio files, in the order of the training batch (longest first)."""
    return [c.recording.sources[0].source for c in t["cuts"].sort_by_duration(ascending=False)]


def _transcripts(stdout: str) -> list:
    """The transcripts of pretrained.py's / onnx_decode.py's ``<file>\t<transcript>`` lines."""
    return [ln.split("\t", 1)[1] if "\t" in ln else "" for ln in stdout.splitlines() if ln.strip()]


def test_pretrained_py_transcribes_the_sph_files(overfit_hf, capsys):
    from splitformer.pretrained import main as pretrained_main

    t = overfit_hf
    rc = pretrained_main(["--checkpoint", str(t["root"] / "exp" / "epoch-1.pt"), "--bpe-model", str(t["bpe"]),
                          "--exit-layer", "4", "--decoding-method", "ctc_greedy_search", *_sph_files(t)])
    assert rc == 0
    assert _transcripts(capsys.readouterr().out) == t["words"][4]


def test_export_writes_pretrained_pt(overfit_hf, capsys):
    from splitformer.export import main as export_main
    from splitformer.pretrained import main as pretrained_main

    t = overfit_hf
    exp = ["--exp-dir", str(t["root"] / "exp"), "--epoch", "1", "--avg", "1", "--output-dir", str(t["root"] / "export")]
    (written,) = export_main(exp + ["--onnx", "false"])
    capsys.readouterr()
    assert pretrained_main(["--checkpoint", str(written), "--bpe-model", str(t["bpe"]), "--decoding-method",
                            "ctc_greedy_search", *_sph_files(t)]) == 0
    assert _transcripts(capsys.readouterr().out) == t["words"][4]


def test_train_py_fine_tunes_from_a_model_directory(overfit_hf, tmp_path):
    """train.py --encoder hf on AN4 audio: the data module reads samples, --freeze-backbone-steps trains only the
    heads, a resumed run then moves the backbone, the feature encoder never moves, and the checkpoint carries the
    backbone's config."""
    import subprocess
    import sys

    t = overfit_hf
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    t["cuts"].to_file(manifests / "an4_cuts_train.jsonl.gz")
    t["cuts"].to_file(manifests / "an4_cuts_dev.jsonl.gz")
    model_dir = tiny_backbone_dir(tmp_path, "wavlm")

    def train(*extra: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "splitformer" / "train.py"),
               "--encoder", "hf", "--hf-model", str(model_dir), "--exit-layers", "2,4", "--decoder-dim", "32",
               "--joiner-dim", "32", "--manifest-dir", str(manifests), "--bpe-model", str(t["bpe"]), "--exp-dir",
               str(tmp_path / "exp"), "--max-duration", "8", "--num-workers", "0", "--num-threads", "1",
               "--bucketing-sampler", "false", "--progress-bar", "false", "--tensorboard", "false", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]

    original = {f"encoder.backbone.{k}": v for k, v in tiny_backbone("wavlm").state_dict().items()}
    q = "encoder.backbone.encoder.layers.0.attention.q_proj.weight"
    conv = "encoder.backbone.feature_extractor.conv_layers.0.conv.weight"
    train("--num-epochs", "1", "--freeze-backbone-steps", "1000")
    first = torch.load(tmp_path / "exp" / "epoch-1.pt", weights_only=True)
    assert first["batch_idx_train"] >= 2
    assert json.loads(first["args"]["hf_config"])["model_type"] == "wavlm"
    assert all(torch.equal(first["model"][k], v) for k, v in original.items() if v.is_floating_point())
    train("--num-epochs", "2", "--start-epoch", "2")
    second = torch.load(tmp_path / "exp" / "epoch-2.pt", weights_only=True)
    assert not torch.equal(second["model"][q], original[q])
    assert torch.equal(second["model"][conv], original[conv])  # the feature encoder stays frozen
    log = (tmp_path / "exp" / "log" / "epochs.txt").read_text()
    assert "epoch 2: train loss" in log and "nan" not in log.lower()


def test_onnx_export_and_onnxruntime_give_pretrained_pys_words(overfit_hf, capsys):
    """export.py checks every exported exit against PyTorch over other lengths and batch shapes; the
    onnxruntime example (no torch) then transcribes the .sph files as pretrained.py does."""
    import subprocess
    import sys

    from splitformer.export import main as export_main
    from splitformer.export import read_metadata

    t = overfit_hf
    out = t["root"] / "onnx"
    tokens = t["bpe"].parent / "tokens.txt"
    export_main(["--exp-dir", str(t["root"] / "exp"), "--epoch", "1", "--avg", "1", "--output-dir", str(out),
                 "--tokens", str(tokens), "--pretrained", "false"])
    meta = read_metadata(out / "ctc-exit4.onnx")
    assert meta["input"] == "waveform" and meta["sample_rate"] == "16000" and meta["subsampling_factor"] == "320"
    assert meta["architecture"] == "hf-wav2vec2"
    repo = Path(__file__).resolve().parents[1]

    def transcripts(cmd: list) -> list:
        proc = subprocess.run([sys.executable, *cmd, *_sph_files(t)], capture_output=True, text=True, check=True)
        return _transcripts(proc.stdout)

    for method, exit_layer in (("ctc", 4), ("ctc", 2), ("transducer", 4)):
        words = transcripts([str(repo / "examples" / "onnx_decode.py"), "--model-dir", str(out),
                             "--exit-layer", str(exit_layer), "--method", method])
        if method == "ctc":
            assert words == t["words"][exit_layer]
        else:  # the transducer's greedy search: as pretrained.py's
            assert words == transcripts([str(repo / "splitformer" / "pretrained.py"), "--checkpoint",
                                         str(t["root"] / "exp" / "epoch-1.pt"), "--bpe-model", str(t["bpe"]),
                                         "--exit-layer", "4", "--decoding-method", "greedy_search"])
