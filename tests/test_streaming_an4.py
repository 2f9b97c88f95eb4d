"""A small causal Splitformer trained on AN4 with run.sh's recipe, decoded as live streams the ways a user would:
streaming_decode.py against decode.py's simulated chunks, the streaming ONNX files in sherpa-onnx's online
recognizer (transducer and CTC, every exit) and in examples/onnx_decode.py --streaming (onnxruntime alone, fixed
and per-chunk exits), and the errors a user gets for sizes that do not line up."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from an4_fixture import CAUSAL, recipe_run

REPO = Path(__file__).resolve().parents[1]
EPOCHS, CHUNK, LEFT, AVG = CAUSAL.epochs, CAUSAL.chunk, CAUSAL.left, CAUSAL.avg
recipe_run("causal", __file__, CAUSAL.flags, EPOCHS)


@pytest.fixture(scope="module")
def causal_exp(an4_recipe_runs) -> Path:
    return an4_recipe_runs.wait("causal")


@pytest.fixture(scope="module")
def streaming_export(causal_exp, an4_data, tmp_path_factory) -> Path:
    from splitformer.export import main as export_main

    out = tmp_path_factory.mktemp("causal_export") / "export"
    export_main(["--exp-dir", str(causal_exp), *AVG, "--exit-layer", "all", "--output-dir", str(out),
                 "--streaming", "true", "--chunk-size", str(CHUNK), "--left-context-frames", str(LEFT),
                 "--tokens", str(an4_data / "lang_bpe_30" / "tokens.txt")])
    return out


@pytest.fixture(scope="module")
def model_and_files(streaming_export, an4_data):
    from lhotse import CutSet

    from splitformer.decoding.loading import load_tokenizer
    from splitformer.pretrained import load_model

    model = load_model(streaming_export / "pretrained.pt").eval()
    cuts = CutSet.from_file(an4_data / "fbank" / "an4_cuts_test.jsonl.gz").subset(first=24).to_eager()
    files = [c.recording.sources[0].source for c in cuts]
    return model, load_tokenizer(an4_data / "lang_bpe_30" / "bpe.model"), files


def _words(tokenizer, ids) -> str:
    return " ".join(tokenizer.decode(ids).split()) if ids else ""


def _stream(model, feats, exit_layer=None, rule=None, method="greedy_search"):
    from splitformer.decoding.streaming import StreamingDecoder, Utterance

    dec = StreamingDecoder(model, CHUNK, LEFT, method=method, exit_layer=exit_layer, rule=rule)
    return dec.decode([Utterance(str(i), torch.from_numpy(f)) for i, f in enumerate(feats)])


def test_streaming_decode_gives_the_simulated_words_at_every_exit(causal_exp, an4_data):
    from recogs import read_recogs
    from splitformer.decode import main as decode_main
    from splitformer.streaming_decode import main as stream_main

    common = ["--exp-dir", str(causal_exp), *AVG, "--exit-layer", "all", "--test-sets", "test", "--chunk-size",
              str(CHUNK), "--left-context-frames", str(LEFT), "--manifest-dir", str(an4_data / "fbank"),
              "--bpe-model", str(an4_data / "lang_bpe_30" / "bpe.model"), "--num-threads", "1"]
    assert stream_main(common + ["--max-streams", "7"]) == 0
    assert decode_main(common) == 0
    runs = json.loads((causal_exp / "greedy_search" / "results-test.json").read_text())["runs"]
    for e in (2, 4):
        tag = f"epoch-{EPOCHS}_avg-2_use-averaged-model_exit-{e}_%s-chunk-{CHUNK}-left-{LEFT}_greedy_search"
        streamed, simulated = runs[tag % "streaming"], runs[tag % "simulated"]
        assert streamed["streaming"] is True and simulated["streaming"] is False and streamed["chunk_ms"] == 320
        _, hyp_s = read_recogs(causal_exp / "greedy_search" / f"recogs-test-{tag % 'streaming'}.txt")
        _, hyp_m = read_recogs(causal_exp / "greedy_search" / f"recogs-test-{tag % 'simulated'}.txt")
        assert hyp_s == hyp_m and streamed["wer"] == simulated["wer"]
        assert sum(1 for h in hyp_s.values() if h) > len(hyp_s) // 2  # it says words: the check bites
        assert streamed["macs_per_second"] > 0


def test_sherpa_onnx_online_recognizer_gives_our_streaming_words_at_every_exit(streaming_export, model_and_files):
    """sherpa-onnx 2.0.1's OnlineRecognizer loads the streaming files as they are (transducer: encoder, shared
    decoder and joiner; CTC: one file) and its words equal our StreamingDecoder's on the same audio: the file's
    samples and 0.66 s of silence (sherpa-onnx's own examples pad so), over the chunks sherpa-onnx runs."""
    import sherpa_onnx

    from sherpa_support import frames_sherpa_runs, padded, sherpa_text
    from splitformer.decoding.audio import file_samples
    from splitformer.export import read_metadata

    model, tok, files = model_and_files
    d = streaming_export / "streaming"
    for e in model.exits:
        meta = read_metadata(d / f"encoder-exit{e}.onnx")
        window, shift = int(meta["T"]), int(meta["decode_chunk_len"])
        recognizers = {
            "greedy_search": sherpa_onnx.OnlineRecognizer.from_transducer(
                tokens=str(d / "tokens.txt"), encoder=str(d / f"encoder-exit{e}.onnx"), decoder=str(d / "decoder.onnx"),
                joiner=str(d / "joiner.onnx"), num_threads=1, decoding_method="greedy_search"),
            "ctc_greedy_search": sherpa_onnx.OnlineRecognizer.from_zipformer2_ctc(
                tokens=str(d / "tokens.txt"), model=str(d / f"ctc-exit{e}.onnx"), num_threads=1),
        }
        waves = [padded(file_samples(f)[0]) for f in files]
        feats = [frames_sherpa_runs(w, window, shift) for w in waves]
        for method, rec in recognizers.items():
            theirs = [sherpa_text(rec, w) for w in waves]
            ours = [_words(tok, r.tokens[0]) for r in _stream(model, feats, exit_layer=e, method=method)]
            assert sum(1 for w in ours if w) > len(ours) // 2, ours
            assert theirs == ours, (e, method)


def _example(model_dir: Path, *args) -> subprocess.CompletedProcess:
    """examples/onnx_decode.py with torch barred from importing."""
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", script, str(REPO / "examples" / "onnx_decode.py"), "--model-dir",
                        str(model_dir), "--streaming", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_the_onnx_example_streams_with_fixed_and_per_chunk_exits_as_pytorch_does(streaming_export, model_and_files):
    """examples/onnx_decode.py --streaming (stem.onnx and block<i>.onnx, onnxruntime alone): at each fixed exit,
    transducer and CTC, and with per-chunk exits (each chunk stops at the first exit whose CTC confidence passes;
    the blocks above record it as absent), the words and every chunk's exit equal PyTorch's streaming decoder."""
    from splitformer.decoding.audio import file_samples, stream_features
    from splitformer.decoding.streaming import ChunkExitRule

    model, tok, files = model_and_files
    files = files[:12]
    from splitformer.export import read_metadata

    meta = read_metadata(streaming_export / "streaming" / "stem.onnx")
    feats = [stream_features(file_samples(f)[0], int(meta["T"]), int(meta["decode_chunk_len"])) for f in files]
    for e in model.exits:
        for kind, method in (("transducer", "greedy_search"), ("ctc", "ctc_greedy_search")):
            r = _example(streaming_export, "--exit-layer", e, "--method", kind, *files)
            ours = [_words(tok, x.tokens[0]) for x in _stream(model, feats, exit_layer=e, method=method)]
            assert [ln.split("\t", 1)[1] for ln in r.stdout.splitlines()] == ours, (e, kind)
    # per-chunk exits: a threshold between the chunks' scores at the first exit, so that chunks split
    trace = _stream(model, feats, exit_layer="all", rule=ChunkExitRule(model, "confidence", 0.0, "ctc"))
    first = sorted(c[0] for x in trace for c in x.chunk_scores)
    threshold = (first[len(first) // 2 - 1] + first[len(first) // 2]) / 2
    want = _stream(model, feats, rule=ChunkExitRule(model, "confidence", threshold, "ctc"))
    assert len({e for x in want for e in x.chunk_exits}) > 1
    r = _example(streaming_export, "--exit-strategy", "confidence", "--exit-threshold", repr(threshold), *files)
    got_exits = [[int(v) for v in ln.split("chunk exits ", 1)[1].split()] for ln in r.stderr.splitlines()
                 if "chunk exits" in ln]
    assert got_exits == [x.chunk_exits for x in want]
    assert [ln.split("\t", 1)[1] for ln in r.stdout.splitlines()] == [_words(tok, x.tokens[0]) for x in want]


def test_a_budget_is_met_on_dev_and_errors_name_the_fix(causal_exp, an4_data, capsys):
    from splitformer.streaming_decode import main as stream_main

    common = ["--exp-dir", str(causal_exp), *AVG, "--manifest-dir", str(an4_data / "fbank"),
              "--bpe-model", str(an4_data / "lang_bpe_30" / "bpe.model"), "--num-threads", "1"]
    assert stream_main(common + ["--chunk-size", str(CHUNK), "--left-context-frames", str(LEFT), "--test-sets", "test",
                                 "--exit-strategy", "confidence", "--exit-budget-fraction", "0.6",
                                 "--budget-thresholds", "6"]) == 0
    runs = json.loads((causal_exp / "greedy_search" / "results-test.json").read_text())["runs"]
    budget = [r for r in runs.values() if r["kind"] == "budget"]
    assert len(budget) == 1 and budget[0]["per"] == "chunk"
    b = budget[0]
    assert b["dev_cost"] <= b["budget"] and all(c["cost"] > b["budget"] or c["wer"] >= b["dev_wer"]
                                                for c in b["candidates"])
    assert 0 < b["achieved_cost"] and b["mean_exit_layer"] >= 2
    for bad, message in ((["--chunk-size", "7", "--left-context-frames", "28"], "multiple of 2"),
                         (["--chunk-size", "8", "--left-context-frames", "20"], "multiple of chunk"),
                         (["--chunk-size", "8", "--left-context-frames", "-1"], "left-context-frames > 0"),
                         (["--chunk-size", "8", "--left-context-frames", "32", "--exit-layer", "3"], "valid exits")):
        assert stream_main(common + ["--test-sets", "test"] + bad) == 2
        assert message in capsys.readouterr().err, bad
