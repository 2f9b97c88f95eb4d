"""Resuming from a bad checkpoint fails with one clear line naming the file and the problem:
a truncated file, a pickle that would run code, a checkpoint of another architecture."""
import shutil

import pytest

from test_train_support import tiny_data, train_here  # noqa: F401

COMMON = ["--max-duration", "8", "--seed", "1"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    exp = tmp_path_factory.mktemp("ckpt") / "exp"
    assert train_here([*COMMON, "--num-epochs", "1", "--save-every-n", "2", "--exp-dir", str(exp)], tiny_data)[0] == 0
    assert (exp / "checkpoint-2.pt").is_file() and (exp / "epoch-1.pt").is_file()
    return exp


def _resume(exp, tiny_data, *flags):
    rc, err = train_here([*COMMON, "--num-epochs", "2", "--exp-dir", str(exp), *flags], tiny_data)
    assert rc == 1, err[-3000:]
    assert "train.py: error: " in err and "Traceback" not in err, err[-3000:]
    return err


def test_truncated_checkpoint(trained, tiny_data, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(trained, exp)
    ck = exp / "checkpoint-2.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    err = _resume(exp, tiny_data, "--start-batch", "2")
    assert str(ck) in err and "truncated" in err


def test_checkpoint_that_would_run_code(trained, tiny_data, tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    exp = tmp_path / "exp"
    shutil.copytree(trained, exp)
    ck = exp / "epoch-1.pt"
    with open(ck, "wb") as f:
        pickle.dump({"model": Evil()}, f, protocol=2)
    err = _resume(exp, tiny_data, "--start-epoch", "2")
    assert str(ck) in err and "system" in err
    assert not marker.exists(), "loading the checkpoint ran its code"


def test_checkpoint_of_another_architecture(trained, tiny_data, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(trained, exp)
    err = _resume(exp, tiny_data, "--start-epoch", "2", "--encoder-dim", "24", "--feedforward-dim", "48")
    assert str(exp / "epoch-1.pt") in err
    assert "--encoder-dim: checkpoint '16', now '24'" in err and "--feedforward-dim" in err


def test_missing_checkpoint(trained, tiny_data):
    err = _resume(trained, tiny_data, "--start-batch", "3")
    assert "checkpoint-3.pt: no such file" in err and "--start-batch 3" in err
