"""Checkpoint I/O: atomic writes, refusing code, clear errors, RNG round trip, file management."""
import argparse
import io
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from splitformer.checkpoint import (
    CheckpointError,
    average_checkpoints,
    check_architecture,
    diff_args,
    epoch_checkpoint_paths,
    find_checkpoints,
    find_unsafe,
    get_rng_state,
    load_checkpoint,
    load_model_state,
    plain_args,
    remove_old_checkpoints,
    save_checkpoint,
    set_rng_state,
)

torch.set_num_threads(1)


def _model(hidden=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 2))


def _full_state(model):
    args = argparse.Namespace(num_layers=12, exp_dir=Path("/tmp/exp"), dims=(192, 256), use_ctc=True)
    return dict(
        model=model.state_dict(),
        model_avg=None,
        optimizer={"state": {}, "param_groups": [{"lr": 0.045, "betas": (0.9, 0.98), "params": [0, 1]}]},
        rng=get_rng_state(),
        args=plain_args(args),
        epoch=3,
        batch_idx_train=1234,
    )


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "sub" / "checkpoint-10.pt", **_full_state(model))
    ck = load_checkpoint(path)
    assert ck["epoch"] == 3 and ck["batch_idx_train"] == 1234
    assert ck["args"] == {"num_layers": 12, "exp_dir": "/tmp/exp", "dims": [192, 256], "use_ctc": True}
    other = _model(4)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_model_state(other, ck["model"], path)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["checkpoint-10.pt"]  # no temp file left


def test_save_refuses_values_weights_only_cannot_load(tmp_path):
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "c.pt", model={}, args={"exp_dir": Path("/x")})
    assert "state['args']['exp_dir']" in str(e.value) and "PosixPath" in str(e.value)
    assert not (tmp_path / "c.pt").exists()
    assert find_unsafe({"a": [1, 2.0, "x", None, torch.ones(1), (torch.float32, torch.device("cpu"))]}) is None
    assert "numpy" in find_unsafe({"rng": np.random.get_state()})


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-5.pt"
    save_checkpoint(path, model={"w": torch.ones(3)}, epoch=1)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the file, then die
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        save_checkpoint(path, model={"w": torch.zeros(3)}, epoch=2)
    assert path.read_bytes() == old_bytes  # old checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5.pt"]  # temp file removed
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.pt", model={}, epoch=2)
    assert not (tmp_path / "new.pt").exists()  # never a half-written file under the final name
    assert load_checkpoint(path)["epoch"] == 1


_KILLED_WRITER = r"""
import sys, time, torch
from splitformer.checkpoint import save_checkpoint

def slow_save(obj, f, *a, **k):
    f.write(b"PK\x03\x04" + b"\0" * 100000)  # the start of a zip file ...
    f.flush()
    print("writing", flush=True)
    time.sleep(60)  # ... and the process is killed here

torch.save = slow_save
save_checkpoint(sys.argv[1], model={"w": torch.zeros(3)}, epoch=2)
"""


def test_process_killed_mid_write(tmp_path):
    """A real SIGKILL during the write: the final name keeps the old checkpoint."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "epoch-1.pt"
    save_checkpoint(path, model={"w": torch.ones(3)}, epoch=1)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        temps = list(tmp_path.glob(".epoch-1.pt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 100000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in remove_old_checkpoints(tmp_path, 1)] == [temps[0].name]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-1.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0, 10, 1000])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "checkpoint-7.pt"
    save_checkpoint(path, model={"w": torch.randn(500)}, epoch=1)
    data = path.read_bytes()
    path.write_bytes(data[: min(keep, len(data) - 1)] if keep else b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg
    assert ("truncated" in msg) or ("empty" in msg)


def test_truncated_legacy_format(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.randn(50)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.load(path, weights_only=True)["model"]["w"])
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(text)
    npy = tmp_path / "arr.pt"
    with open(npy, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(npy)
    zpath = tmp_path / "archive.pt"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="zip archive but not a torch checkpoint"):
        load_checkpoint(zpath)
    bare = tmp_path / "bare.pt"
    torch.save(_model().state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"missing \['model'\].*bare state_dict"):
        load_checkpoint(bare)
    lst = tmp_path / "list.pt"
    torch.save([torch.ones(2)], lst)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(lst)


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    # a torch-style (zip) checkpoint whose data.pkl is a plain pickle with a __reduce__ payload
    path = tmp_path / "epoch-1.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    entries[pkl] = pickle.dumps({"model": {}, "epoch": _RunsCode(marker)}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    # plain pickle loading really would run it (sanity check of the payload, on a copy)
    pickle.loads(entries[pkl])
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "code" in msg and "system" in msg
    assert not marker.exists()

    # the same through torch.save itself, and as a raw pickle file
    path2 = tmp_path / "epoch-2.pt"
    torch.save({"model": {}, "x": _RunsCode(marker)}, path2)
    raws = []
    for proto in (2, 4, 5):  # protocol 4+ uses STACK_GLOBAL/FRAME, which weights_only rejects earlier
        raw = tmp_path / f"raw{proto}.pt"
        raw.write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=proto))
        raws.append(raw)
    for p in [path2] + raws:
        with pytest.raises(CheckpointError, match=r"refused to load: it contains code .*\(posix\.system\)"):
            load_checkpoint(p)
    assert not marker.exists()


def test_check_architecture_lists_mismatching_flags():
    saved = {"num_layers": 12, "encoder_dim": [192, 256], "use_ctc": True, "exits": "2,4,6"}
    same = argparse.Namespace(num_layers=12, encoder_dim=(192, 256), use_ctc=True, exits="2,4,6", epoch=30)
    check_architecture(saved, same)  # tuple vs list and extra decode flags are fine
    other = {"num_layers": 6, "encoder_dim": [192, 256], "use_ctc": False}
    assert diff_args(saved, other) == [("num_layers", 12, 6), ("use_ctc", True, False), ("exits", "2,4,6", "<absent>")]
    with pytest.raises(CheckpointError) as e:
        check_architecture(saved, other, path="exp/epoch-3.pt")
    msg = str(e.value)
    assert "exp/epoch-3.pt" in msg and "3 flag(s) differ" in msg
    assert "--num-layers: checkpoint 12, now 6" in msg and "--use-ctc: checkpoint True, now False" in msg
    check_architecture(saved, other, keys=["encoder_dim"])  # only the chosen keys are compared


def test_load_model_state_summarises_mismatch():
    small, big = _model(4), _model(8)
    sd = small.state_dict()
    sd["extra.weight"] = torch.ones(1)
    del sd["2.bias"]
    with pytest.raises(CheckpointError) as e:
        load_model_state(big, sd, "exp/epoch-1.pt")
    msg = str(e.value)
    assert "exp/epoch-1.pt" in msg and "shape mismatch" in msg and "0.weight: checkpoint (4, 3), model (8, 3)" in msg
    assert "1 missing key(s): 2.bias" in msg and "1 unexpected key(s): extra.weight" in msg
    # a DDP "module." prefix is accepted
    ddp_sd = {"module." + k: v for k, v in small.state_dict().items()}
    fresh = _model(4)
    load_model_state(fresh, ddp_sd)
    assert torch.equal(fresh[0].weight, small[0].weight)


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()
    path = save_checkpoint(tmp_path / "rng.pt", model={}, rng=get_rng_state())
    want = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    assert got == want


def test_find_and_remove_old_checkpoints(tmp_path):
    for b in (100, 2000, 300, 40):
        save_checkpoint(tmp_path / f"checkpoint-{b}.pt", model={})
    (tmp_path / "epoch-1.pt").write_bytes(b"x")
    (tmp_path / ".checkpoint-5000.pt.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in find_checkpoints(tmp_path)] == [f"checkpoint-{b}.pt" for b in (2000, 300, 100, 40)]
    assert [p.name for p in find_checkpoints(tmp_path, iteration=300)] == ["checkpoint-300.pt", "checkpoint-100.pt", "checkpoint-40.pt"]
    assert [p.name for p in remove_old_checkpoints(tmp_path, 0)] == [".checkpoint-5000.pt.abc.tmp"]
    removed = remove_old_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-100.pt", "checkpoint-40.pt"]
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-2000.pt", "checkpoint-300.pt"]
    assert find_checkpoints(tmp_path / "absent") == []


def test_average_checkpoints_math(tmp_path):
    for e, val in [(1, 1.0), (2, 2.0), (3, 6.0)]:
        save_checkpoint(
            tmp_path / f"epoch-{e}.pt",
            model={"w": torch.full((2, 2), val), "h": torch.full((2,), val, dtype=torch.float16), "n": torch.tensor(e * 10)},
            epoch=e,
        )
    paths = epoch_checkpoint_paths(tmp_path, epoch=3, avg=2)
    assert [p.name for p in paths] == ["epoch-2.pt", "epoch-3.pt"]
    avg = average_checkpoints(paths)
    assert torch.equal(avg["w"], torch.full((2, 2), 4.0))
    assert avg["h"].dtype == torch.float16 and torch.equal(avg["h"], torch.full((2,), 4.0, dtype=torch.float16))
    assert avg["n"].item() == 30  # integers from the last checkpoint
    avg3 = average_checkpoints(epoch_checkpoint_paths(tmp_path, 3, 3))
    assert torch.allclose(avg3["w"], torch.full((2, 2), 3.0))
    with pytest.raises(CheckpointError, match="too large"):
        epoch_checkpoint_paths(tmp_path, 3, 4)
    with pytest.raises(CheckpointError, match="epoch-4.pt"):
        epoch_checkpoint_paths(tmp_path, 4, 2)
    save_checkpoint(tmp_path / "epoch-9.pt", model={"w": torch.ones(3, 3), "h": torch.ones(2), "n": torch.tensor(1)})
    with pytest.raises(CheckpointError, match="w has shape"):
        average_checkpoints([tmp_path / "epoch-1.pt", tmp_path / "epoch-9.pt"])
