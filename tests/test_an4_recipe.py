"""The AN4 recipe leaves the blank plateau within a few minutes, and the model it trains goes the whole
way a user takes it: prepare.sh -> train.py -> decode.py -> export.py -> pretrained.py and onnxruntime.

The old recipe (--max-duration 100, 34 updates an epoch) sat at a dev loss of ~0.9 per frame with every
dev utterance decoded as blank for 15 epochs. Here a smaller model of the early-exit kind trains with the
very settings run.sh uses (read from run.sh, so that the test follows the recipe) on the whole AN4
training set, and must get past that plateau: a dev loss under PLATEAU_LOSS at its top exit and dev
greedy transcripts that are far from all blank (WER under PLATEAU_WER).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from an4_fixture import recipe_run

REPO = Path(__file__).resolve().parents[1]
# The plateau: dev loss per frame at the top exit of ee-zipformer-cpu with the old recipe was 0.92 (epoch
# 4) to 0.80 (epoch 10) with 100 % WER. This small model with the recipe measured 0.72 / 95 % at epoch 3 (the
# plateau's end), then 0.42 / 52 % at epoch 5 and 0.45 / 52 % at epoch 6 (docs/an4-experiments.md). 0.7 and
# 80 % sit between the plateau and what the recipe reaches, with room for run-to-run noise.
PLATEAU_LOSS = 0.7
PLATEAU_WER = 80.0
EPOCHS = 6
SMALL = ["--preset", "ee-zipformer-cpu", "--num-encoder-layers", "4", "--exit-layers", "2,4",
         "--encoder-dim", "64", "--encoder-unmasked-dim", "64", "--feedforward-dim", "128"]
recipe_run("recipe", __file__, SMALL, EPOCHS)


@pytest.fixture(scope="module")
def recipe_exp(an4_recipe_runs) -> Path:
    """train.py with run.sh's settings on the small model, once for this module's tests."""
    return an4_recipe_runs.wait("recipe")


@pytest.fixture(scope="module")
def recipe_export(recipe_exp, an4_data, tmp_path_factory) -> Path:
    """export.py on the recipe's model: every exit, the per-block form, pretrained.pt (all checked against PyTorch)."""
    from splitformer.export import main as export_main

    out_dir = tmp_path_factory.mktemp("recipe_export") / "export"
    export_main(["--exp-dir", str(recipe_exp), "--epoch", str(EPOCHS), "--avg", "2", "--use-averaged-model",
                 "--exit-layer", "all", "--output-dir", str(out_dir), "--blocks", "true",
                 "--tokens", str(an4_data / "lang_bpe_30" / "tokens.txt")])
    return out_dir


def test_recipe_leaves_the_blank_plateau(recipe_exp):
    last = (recipe_exp / "log" / "epochs.txt").read_text().splitlines()[-1]
    loss = float(re.search(r"exit4=([0-9.]+)", last.split("valid loss")[1]).group(1))
    wer = float(re.search(r"valid WER .*exit4=([0-9.]+)%", last).group(1))
    assert loss < PLATEAU_LOSS, last
    assert wer < PLATEAU_WER, last


def test_the_trained_model_decodes_alike_in_decode_py_pretrained_py_and_onnxruntime(recipe_exp, recipe_export, an4_data,
                                                                                     capsys):
    """decode.py's WER is what its recogs say (kaldialign, paired by cut id), and the same cut gets the same
    words from decode.py (lhotse features), pretrained.py (raw audio), examples/onnx_decode.py (onnxruntime,
    torch barred) and sherpa-onnx, at every exit, from the one averaged model export.py writes."""
    from lhotse import CutSet

    from recogs import read_recogs, wer_from_recogs
    from splitformer.decode import main as decode_main
    from splitformer.pretrained import main as pretrained_main

    bpe = an4_data / "lang_bpe_30" / "bpe.model"
    avg = ["--epoch", str(EPOCHS), "--avg", "2", "--use-averaged-model"]
    assert decode_main(["--exp-dir", str(recipe_exp), *avg, "--exit-layer", "all", "--test-sets", "test",
                        "--manifest-dir", str(an4_data / "fbank"), "--bpe-model", str(bpe), "--num-threads", "1"]) == 0
    runs = json.loads((recipe_exp / "greedy_search" / "results-test.json").read_text())["runs"]
    out_dir = recipe_export
    cuts = CutSet.from_file(an4_data / "fbank" / "an4_cuts_test.jsonl.gz").subset(first=24).to_eager()
    files = [c.recording.sources[0].source for c in cuts]
    for exit_layer in (2, 4):
        tag = f"epoch-{EPOCHS}_avg-2_use-averaged-model_exit-{exit_layer}_greedy_search"
        recogs = recipe_exp / "greedy_search" / f"recogs-test-{tag}.txt"
        assert wer_from_recogs(recogs) == pytest.approx(runs[tag]["wer"], abs=1e-9)
        _, hyps = read_recogs(recogs)
        from_decode = [" ".join(hyps[c.id]) for c in cuts]
        assert sum(1 for w in from_decode if w) >= len(from_decode) // 2, from_decode  # it says words: the checks bite

        sherpa = _sherpa_texts(out_dir, exit_layer, files)
        for kind, method in (("transducer", "greedy_search"), ("ctc", "ctc_greedy_search")):
            assert pretrained_main(["--checkpoint", str(out_dir / "pretrained.pt"), "--bpe-model", str(bpe),
                                    "--exit-layer", str(exit_layer), "--decoding-method", method, "--num-threads", "1",
                                    *files]) == 0
            torch_words = [ln.split("\t", 1)[1] for ln in capsys.readouterr().out.splitlines()]
            script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                      "runpy.run_path(sys.argv[0], run_name='__main__')")
            r = subprocess.run([sys.executable, "-c", script, str(REPO / "examples" / "onnx_decode.py"),
                                "--model-dir", str(out_dir), "--exit-layer", str(exit_layer), "--method", kind, *files],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            onnx_words = [ln.split("\t", 1)[1] for ln in r.stdout.splitlines()]
            # the same raw audio through PyTorch, onnxruntime and sherpa-onnx: the same words, exactly
            assert onnx_words == torch_words, (exit_layer, kind)
            assert sherpa[kind] == torch_words, (exit_layer, kind)
            if kind == "transducer":
                # decode.py reads prepare.sh's stored features, which lilcom compresses lossily (~0.03 in log-mel):
                # on a half-trained model that may flip a near tie, so allow one cut in twelve to differ
                same = sum(a == b for a, b in zip(from_decode, torch_words))
                assert same >= len(cuts) - len(cuts) // 12, list(zip(from_decode, torch_words))


@pytest.mark.parametrize("scorer", ["ctc", "transducer"])
def test_dynamic_exits_in_onnxruntime_stop_where_pytorch_stops(recipe_export, an4_data, scorer):
    """The per-block ONNX form (export.py --blocks true) run by examples/onnx_decode.py --exit-strategy, reading
    the CTC heads or the transducer: each utterance stops at the exit PyTorch's own climb picks for the same audio
    and threshold, with the same words, and the blocks above it are not run (the stderr log names one exit per
    file). (The same check on a three-block model with branches: tests/test_export_blocks.py.)"""
    from lhotse import CutSet

    from splitformer.decoding.audio import file_features
    from splitformer.decoding.exits import model_exit_scores, stops
    from splitformer.decoding.loading import load_tokenizer
    from splitformer.decoding.search import greedy_search
    from splitformer.pretrained import load_model

    out_dir = recipe_export
    model = load_model(out_dir / "pretrained.pt").eval()
    sp = load_tokenizer(an4_data / "lang_bpe_30" / "bpe.model")
    cuts = CutSet.from_file(an4_data / "fbank" / "an4_cuts_test.jsonl.gz").subset(first=24).to_eager()
    files = [c.recording.sources[0].source for c in cuts]
    climbs = []
    with torch.no_grad():
        for f in files:
            x = torch.from_numpy(file_features(f)[0])[None]
            lens = torch.tensor([x.shape[1]])
            climbs.append([(e, model_exit_scores(model, o, l, e, scorer, strategies=("confidence",))["confidence"].item(),
                            o, l) for e, o, l in model.iter_exits(x, lens)])
    first = sorted(c[0][1] for c in climbs)
    threshold = (first[len(first) // 2 - 1] + first[len(first) // 2]) / 2  # half the files stop at the first exit
    want_exits, want_words = [], []
    with torch.no_grad():
        for climb in climbs:
            e, _, o, l = next((c for c in climb if stops("confidence", c[1], threshold)), climb[-1])
            hyp = greedy_search(model, model.project_encoder(o, e), l)[0]
            want_exits.append(e)
            want_words.append(" ".join(sp.decode(hyp.tokens).split()) if hyp.tokens else "")
    assert len(set(want_exits)) > 1, want_exits  # the threshold splits the files between exits
    r = subprocess.run([sys.executable, str(REPO / "examples" / "onnx_decode.py"), "--model-dir", str(out_dir),
                        "--exit-strategy", "confidence", "--exit-threshold", repr(threshold), "--exit-scorer", scorer,
                        *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got_exits = [int(ln.rsplit("exit ", 1)[1]) for ln in r.stderr.splitlines() if ": exit " in ln]
    assert got_exits == want_exits
    assert [ln.split("\t", 1)[1] for ln in r.stdout.splitlines()] == want_words


def _sherpa_texts(model_dir: Path, exit_layer: int, files) -> dict:
    """sherpa-onnx's greedy transcripts of ``files`` with the exported transducer and CTC files of one exit."""
    import sherpa_onnx
    import soundfile as sf

    tokens = str(model_dir / "tokens.txt")
    recognizers = {
        "transducer": sherpa_onnx.OfflineRecognizer.from_transducer(
            encoder=str(model_dir / f"encoder-exit{exit_layer}.onnx"), decoder=str(model_dir / "decoder.onnx"),
            joiner=str(model_dir / "joiner.onnx"), tokens=tokens, num_threads=1, decoding_method="greedy_search"),
        "ctc": sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(
            model=str(model_dir / f"ctc-exit{exit_layer}.onnx"), tokens=tokens, num_threads=1),
    }
    out = {}
    for kind, rec in recognizers.items():
        texts = []
        for f in files:
            samples, sr = sf.read(str(f), dtype="float32")
            stream = rec.create_stream()
            stream.accept_waveform(sr, samples)
            rec.decode_stream(stream)
            texts.append(" ".join(stream.result.text.split()))
        out[kind] = texts
    return out
