"""pretrained.py: raw audio of any rate -> training-compatible features -> transcripts; bad input."""

import numpy as np
import soundfile as sf
import torch

from splitformer.decoding.audio import fbank, file_features, resample
from splitformer.pretrained import main as pretrained_main
from test_decoding_fixture import an4_utterances, trained_an4  # noqa: F401  (fixture)

torch.set_num_threads(1)  # the test machines are small and shared


def _lhotse_fbank(samples: np.ndarray, sr: int) -> np.ndarray:
    from lhotse import Fbank, FbankConfig

    return Fbank(FbankConfig(num_mel_bins=80)).extract(samples, sr)


def test_features_match_lhotse_fbank_used_in_training(an4_dir):
    _, path, _ = an4_utterances(an4_dir, 3)[2]
    x, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000
    for n in (len(x), 1600 + 37, 16000 + 80):  # full file, 0.1 s and odd lengths
        ours = fbank(x[:n])
        ref = _lhotse_fbank(x[:n], sr)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_resampled_input_matches_lhotse_fbank_and_the_original_rate(an4_dir, tmp_path):
    _, path, _ = an4_utterances(an4_dir, 1)[0]
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


def test_decodes_files_of_any_rate_and_bad_audio_gives_empty_results(trained_an4, an4_dir, tmp_path, capsys):
    _, path, _ = an4_utterances(an4_dir, 1)[0]
    x, _ = sf.read(str(path), dtype="float32")
    wav16 = tmp_path / "same.wav"
    sf.write(str(wav16), x, 16000)
    wav8 = tmp_path / "low.wav"
    sf.write(str(wav8), resample(x, 16000, 8000), 8000)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    silent = tmp_path / "silent.flac"
    sf.write(str(silent), np.zeros(32000, dtype=np.float32), 22050)
    short = tmp_path / "short.wav"
    sf.write(str(short), x[:1600], 16000)
    files = [path, wav16, wav8, empty, zero_bytes, silent, short]
    for method in ("greedy_search", "ctc_greedy_search"):
        assert _run(trained_an4, files, "--exit-layer", "4", "--decoding-method", method) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [ln.split("\t")[0] for ln in lines] == [str(f) for f in files]
        texts = [ln.split("\t", 1)[1] for ln in lines]
        assert texts[0] == texts[1]  # sph and wav of the same samples
        assert texts[3] == texts[4] == texts[5] == ""
        if method == "greedy_search":
            assert texts[0]  # the (untrained) transducer emits something, so the checks above bite
    # 0.1 s decodes (to whatever the model says) without an error; CTC after brief training says nothing.
    assert texts[6] == ""


def test_missing_unreadable_and_foreign_checkpoint_errors(trained_an4, tmp_path, capsys):
    t = trained_an4
    assert _run(t, [tmp_path / "nope.wav"]) == 2
    assert "nope.wav does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio" * 50)
    assert _run(t, [junk]) == 2
    assert "cannot read audio file" in capsys.readouterr().err and "junk.wav" in capsys.readouterr().err + str(junk)
    ckpt = torch.load(t["exp"] / "epoch-2.pt", weights_only=True)
    ckpt["args"] = dict(ckpt["args"], encoder_dim="48", encoder_unmasked_dim="48")
    foreign = tmp_path / "foreign.pt"
    torch.save(ckpt, foreign)
    assert _run(t, [junk], checkpoint=foreign) == 2
    err = capsys.readouterr().err
    assert "foreign.pt does not match the model architecture" in err
    assert _run(t, [junk], "--exit-layer", "5") == 2
    assert "valid exits: 2, 4, 6" in capsys.readouterr().err
