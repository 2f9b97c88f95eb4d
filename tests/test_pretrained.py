"""pretrained.py: raw audio of any rate -> training-compatible features -> transcripts; bad input."""

import numpy as np
import soundfile as sf
import torch

from splitformer.decoding.audio import fbank, file_features, resample
from splitformer.pretrained import main as pretrained_main
from recogs import read_recogs
from an4_fixture import an4_utterances
from test_decoding_fixture import trained_an4  # noqa: F401  (fixture)

torch.set_num_threads(1)  # the test machines are small and shared


def _lhotse_fbank(samples: np.ndarray, sr: int) -> np.ndarray:
    from lhotse import Fbank, FbankConfig

    return Fbank(FbankConfig(num_mel_bins=80)).extract(samples, sr)


def test_features_match_lhotse_fbank_used_in_training(an4_dir):
    path = an4_utterances(an4_dir, 3)[2].path
    x, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000
    for n in (len(x), 1600 + 37, 16000 + 80):  # full file, 0.1 s and odd lengths
        ours = fbank(x[:n])
        ref = _lhotse_fbank(x[:n], sr)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_resampled_input_matches_lhotse_fbank_and_the_original_rate(an4_dir, tmp_path):
    path = an4_utterances(an4_dir, 1)[0].path
    x, _ = sf.read(str(path), dtype="float32")
    f = tmp_path / "a.flac"
    sf.write(str(f), resample(x, 16000, 44100), 44100, subtype="PCM_24")
    ours, peak = file_features(f)
    y, sr = sf.read(str(f), dtype="float32")
    ref = _lhotse_fbank(resample(y, sr, 16000), 16000)
    assert peak > 0.01 and ours.shape == ref.shape == fbank(x).shape
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    # The 16k -> 44.1k -> 16k round trip keeps the features close to the original ones.
    assert np.abs(ours - fbank(x)).mean() < 0.1


def _run(t, files, *extra, checkpoint=None):
    return pretrained_main(["--checkpoint", str(checkpoint or t["exp"] / "epoch-2.pt"), "--bpe-model", str(t["bpe"]),
                            "--num-threads", "1", *extra, *map(str, files)])


def test_decodes_files_of_any_rate_and_empty_or_silent_audio_gives_empty_results(trained_an4, an4_dir, tmp_path, capsys):
    path = an4_utterances(an4_dir, 1)[0].path
    x, _ = sf.read(str(path), dtype="float32")
    wav16 = tmp_path / "same.wav"
    sf.write(str(wav16), x, 16000)
    wav8 = tmp_path / "low.wav"
    sf.write(str(wav8), resample(x, 16000, 8000), 8000)
    empty = tmp_path / "empty.wav"  # a valid header and no samples
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    silent = tmp_path / "silent.flac"
    sf.write(str(silent), np.zeros(32000, dtype=np.float32), 22050)
    short = tmp_path / "short.wav"
    sf.write(str(short), x[:1600], 16000)
    files = [path, wav16, wav8, empty, silent, short]
    for method in ("greedy_search", "ctc_greedy_search"):
        assert _run(trained_an4, files, "--exit-layer", "4", "--decoding-method", method) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [ln.split("\t")[0] for ln in lines] == [str(f) for f in files]  # 0.1 s decodes too
        texts = [ln.split("\t", 1)[1] for ln in lines]
        assert texts[0] == texts[1]  # sph and wav of the same samples
        assert texts[3] == texts[4] == ""  # never reach the model
        if method == "greedy_search":
            assert texts[0]  # the (barely trained) transducer emits words, so the equality above bites


def _good_and_bad_files(an4_dir, tmp_path, n_good=3):
    """AN4 utterances as wav, with every kind of bad input pretrained.py must survive between them."""
    good = []
    for k, u in enumerate(an4_utterances(an4_dir, n_good)):
        x, _ = sf.read(str(u.path), dtype="float32")
        good.append(tmp_path / f"good{k}.wav")
        sf.write(str(good[-1]), x, 16000)
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    inf = tmp_path / "inf.wav"
    y = np.zeros(16000, dtype=np.float32)
    y[100] = np.inf
    sf.write(str(inf), y, 16000, subtype="FLOAT")
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    folder = tmp_path / "a_folder"
    folder.mkdir(exist_ok=True)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file" * 20)
    bad = {nan: "NaN or infinite", inf: "NaN or infinite", zero: "0 bytes", folder: "is a directory",
           tmp_path / "missing.wav": "does not exist", junk: "cannot read audio file"}
    files = [good[0], *list(bad)[:3], *good[1:-1], *list(bad)[3:], good[-1]]
    return files, good, bad


def test_bad_files_cost_only_themselves(trained_an4, an4_dir, tmp_path, capsys):
    files, good, bad = _good_and_bad_files(an4_dir, tmp_path)
    assert _run(trained_an4, good, "--exit-layer", "4") == 0
    alone = capsys.readouterr().out.splitlines()
    # good and bad mixed, in batches of about one utterance: the good ones come out, in order, as alone
    assert _run(trained_an4, files, "--exit-layer", "4", "--max-duration", "3") == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == alone
    err = captured.err
    for f, reason in bad.items():
        line = next((ln for ln in err.splitlines() if f"skipped {f}:" in ln), None)
        assert line is not None and reason in line, (f, err)
    assert f"{len(bad)} of {len(files)} file(s) could not be transcribed" in err


def test_files_from_and_output_tsv(trained_an4, an4_dir, tmp_path, capsys):
    files, good, bad = _good_and_bad_files(an4_dir, tmp_path, n_good=2)
    listing = tmp_path / "list.txt"
    listing.write_text("# AN4\n" + "\n".join(map(str, files)) + "\n\n")
    out = tmp_path / "out.tsv"
    assert pretrained_main(["--checkpoint", str(trained_an4["exp"] / "epoch-2.pt"), "--bpe-model", str(trained_an4["bpe"]),
                            "--num-threads", "1", "--files-from", str(listing), "--output", str(out)]) == 1
    assert capsys.readouterr().out == ""
    rows = [ln.split("\t") for ln in out.read_text().splitlines()]
    assert [r[0] for r in rows] == [str(f) for f in good]
    empty_list = tmp_path / "none.txt"
    empty_list.write_text("\n")
    assert pretrained_main(["--checkpoint", str(trained_an4["exp"] / "epoch-2.pt"), "--bpe-model",
                            str(trained_an4["bpe"]), "--files-from", str(empty_list)]) == 2
    assert "no audio files" in capsys.readouterr().err


def test_averaged_model_comes_from_export_and_decodes_as_decode_py(trained_an4, an4_dir, tmp_path, capsys):
    """icefall's way: export.py writes the average of the last epochs; pretrained.py on it gives decode.py's
    hypotheses. The whole-run model_avg of an epoch-N.pt is refused."""
    from splitformer.decode import main as decode_main
    from splitformer.export import main as export_main

    t = trained_an4
    assert _run(t, [tmp_path / "x.wav"], "--use-averaged-model") == 2
    assert "export.py" in capsys.readouterr().err
    out_dir = tmp_path / "export"
    export_main(["--exp-dir", str(t["exp"]), "--epoch", "2", "--avg", "1", "--use-averaged-model", "--onnx", "false",
                 "--output-dir", str(out_dir)])
    assert decode_main(["--exp-dir", str(t["exp"]), "--epoch", "2", "--avg", "1", "--use-averaged-model",
                        "--exit-layer", "4", "--manifest-dir", str(t["manifests"]), "--bpe-model", str(t["bpe"]),
                        "--test-sets", "dev", "--num-threads", "1"]) == 0
    recogs = t["exp"] / "greedy_search" / "recogs-dev-epoch-2_avg-1_use-averaged-model_exit-4_greedy_search.txt"
    _, hyps = read_recogs(recogs)
    want = {cut_id.rsplit("-", 1)[0]: " ".join(words) for cut_id, words in hyps.items()}  # cut id = recording id-N
    utts = an4_utterances(an4_dir, 20)
    assert _run(t, [u.path for u in utts], "--exit-layer", "4", checkpoint=out_dir / "pretrained.pt") == 0
    got = [ln.split("\t", 1)[1] for ln in capsys.readouterr().out.splitlines()]
    assert any(got)
    assert got == [want[u.id] for u in utts]


def test_missing_unreadable_and_foreign_checkpoint_errors(trained_an4, tmp_path, capsys):
    t = trained_an4
    assert _run(t, [tmp_path / "nope.wav"]) == 1
    assert "nope.wav does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio" * 50)
    assert _run(t, [junk]) == 1
    err = capsys.readouterr().err
    assert f"skipped {junk}: cannot read audio file" in err
    ckpt = torch.load(t["exp"] / "epoch-2.pt", weights_only=True)
    ckpt["args"] = dict(ckpt["args"], encoder_dim="48", encoder_unmasked_dim="48")
    foreign = tmp_path / "foreign.pt"
    torch.save(ckpt, foreign)
    assert _run(t, [junk], checkpoint=foreign) == 2
    err = capsys.readouterr().err
    assert "foreign.pt does not match the model architecture" in err
    assert _run(t, [junk], "--exit-layer", "5") == 2
    assert "valid exits: 2, 4, 6" in capsys.readouterr().err
