"""Shared pieces of the training tests: a tiny prepared AN4 subset, a tiny model, and a
helper that runs ``./splitformer/train.py`` as a subprocess.  Also unit tests of the
trainer's pure helpers (loss warm-up, metrics, guards)."""
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "splitformer" / "train.py"
CUT_SECONDS = 2.0  # every cut has exactly this duration: batches then hold a fixed number of cuts

# A model with two exits that runs a batch in a fraction of a second on one core.
TINY_MODEL = [
    "--encoder", "early-exit", "--layer-type", "zipformer", "--pos-encoding", "rel",
    "--encoder-embed", "conv2d", "--input-downsample", "2",
    "--num-encoder-layers", "2", "--exit-layers", "1,2", "--encoder-dim", "16", "--encoder-unmasked-dim", "16",
    "--feedforward-dim", "32", "--num-heads", "2", "--query-head-dim", "4", "--value-head-dim", "4",
    "--pos-head-dim", "2", "--pos-dim", "8", "--cnn-module-kernel", "3",
    "--decoder-dim", "16", "--joiner-dim", "16", "--split-blocks", "",
]


_TINY_CACHE: Dict[str, Path] = {}


def _pick(items, n: int):
    """The first n (recording-or-cut, text) pairs long enough to cut to CUT_SECONDS, with short texts
    (so that CTC can align them in CUT_SECONDS)."""
    out = []
    for item, text in items:
        if len(text.replace(" ", "")) <= 8 and item.duration >= CUT_SECONDS + 0.1:
            out.append((item, text))
        if len(out) == n:
            return out
    raise AssertionError(f"AN4 has fewer than {n} short utterances")


@pytest.fixture(scope="session")
def tiny_data(an4_dir: Path, tmp_path_factory) -> Path:
    """A ``data/`` directory laid out as ./prepare.sh makes it, with 16 train and 4 dev cuts
    of exactly CUT_SECONDS each (AN4 utterances with short transcripts, truncated).

    Built from the session's prepared AN4 (tests/an4_fixture.py: ./prepare.sh output, its features and
    BPE model)."""
    from lhotse import CutSet, load_manifest

    from an4_fixture import prepared_an4

    key = str(tmp_path_factory.getbasetemp())
    if key in _TINY_CACHE:  # each test module imports this fixture: build it once per session
        return _TINY_CACHE[key]
    root = tmp_path_factory.mktemp("an4tiny")
    data = root / "data"
    (data / "fbank").mkdir(parents=True)
    full = prepared_an4(tmp_path_factory.getbasetemp() / "an4_prepared", an4_dir)
    train = load_manifest(full / "fbank" / "an4_cuts_train.jsonl.gz")
    picked = _pick(((c, c.supervisions[0].text) for c in train), 20)
    cuts = CutSet.from_cuts(c for c, _ in picked).truncate(max_duration=CUT_SECONDS, offset_type="start")
    cuts = CutSet.from_cuts(_clip_supervision(c) for c in cuts)
    (data / "lang_bpe_30").symlink_to(full / "lang_bpe_30")
    cuts = CutSet.from_cuts(c.with_id(c.supervisions[0].recording_id) for c in cuts)  # short, stable ids
    ids = sorted(c.id for c in cuts)
    cuts.subset(cut_ids=ids[:16]).to_file(data / "fbank" / "an4_cuts_train.jsonl.gz")
    cuts.subset(cut_ids=ids[16:]).to_file(data / "fbank" / "an4_cuts_dev.jsonl.gz")
    _TINY_CACHE[key] = data
    return data


def _clip_supervision(cut):
    """The supervision must end with the truncated cut (its text stays whole: fine for these tests)."""
    from lhotse.utils import fastcopy

    return fastcopy(cut, supervisions=[fastcopy(s, start=0.0, duration=cut.duration) for s in cut.supervisions])


def data_flags(data: Path) -> List[str]:
    return ["--manifest-dir", str(data / "fbank"), "--dataset", "an4", "--num-workers", "0", "--num-buckets", "2"]


def run_train(args: Sequence[str], data: Path, check: bool = True, env: Dict[str, str] = None,
              timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ./splitformer/train.py (from the repository root, as users do) on the tiny data."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    e.pop("PYTHONPATH", None)  # train.py must find the package by itself
    e.update(env or {})
    cmd = [sys.executable, str(TRAIN), *TINY_MODEL, *data_flags(data), "--progress-bar", "false",
           "--tensorboard", "false", "--log-interval", "1", *args]
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def train_here(args: Sequence[str], data: Path):
    """Run train.py's ``main`` in this process (no interpreter start-up): (exit status, stderr)."""
    import contextlib
    import io

    from splitformer.trainer import main

    argv = [*TINY_MODEL, *data_flags(data), "--progress-bar", "false", "--tensorboard", "false",
            "--log-interval", "1", *args]
    err = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1), so that results can be compared
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, err.getvalue()


def load_weights(path: Path, key: str = "model") -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# ---------------------------------------------------------------- unit tests of pure helpers
def test_warmup_scales_follow_icefall():
    from splitformer.trainer.objective import warmup_scales

    assert warmup_scales(0, 2000, 0.5) == (1.0, 0.1)
    s, p = warmup_scales(1000, 2000, 0.5)
    assert math.isclose(s, 0.75) and math.isclose(p, 0.55)
    assert warmup_scales(2000, 2000, 0.5) == (0.5, 1.0)
    assert warmup_scales(5000, 2000, 0.5) == (0.5, 1.0)


def test_combine_losses_weights_exits_and_ctc():
    from splitformer.trainer.objective import combine_losses

    out = {2: {"simple": torch.tensor(10.0), "pruned": torch.tensor(4.0), "ctc": torch.tensor(8.0)},
           4: {"simple": torch.tensor(6.0), "pruned": torch.tensor(2.0), "ctc": torch.tensor(3.0)}}
    loss, parts = combine_losses(out, {2: 1.0, 4: 0.5}, 0.5, 1.0, 0.2)
    e2, e4 = 0.5 * 10 + 4 + 0.2 * 8, 0.5 * 6 + 2 + 0.2 * 3
    assert math.isclose(float(loss), e2 + 0.5 * e4, rel_tol=1e-6)
    assert math.isclose(parts["exit2/loss"], e2, rel_tol=1e-6) and math.isclose(parts["exit4/ctc"], 3.0)
    ctc_only, _ = combine_losses({4: {"ctc": torch.tensor(3.0)}}, {4: 1.0}, 0.5, 1.0, 0.2)
    assert float(ctc_only) == 3.0  # a CTC-only model trains on plain CTC


def test_metrics_normalise_per_frame():
    from splitformer.trainer.objective import Metrics

    m = Metrics()
    m.add({"loss": 30.0, "frames": 10, "utterances": 2})
    m.add({"loss": 10.0, "frames": 10, "utterances": 1})
    assert m.per_frame() == {"loss": 2.0}
    assert m.sums["utterances"] == 3


def test_max_duration_guard_names_longest_cut():
    from splitformer.trainer.guards import TrainingError, check_max_duration

    check_max_duration([("a", 3.0), ("b", 5.0)], 5.0, "train")
    with pytest.raises(TrainingError, match=r"longest, b, lasts 7.00 s.*--max-duration"):
        check_max_duration([("a", 3.0), ("b", 7.0)], 5.0, "train")


def test_bad_batch_guard_counts_and_stops():
    from splitformer.trainer.guards import BadBatchGuard, TrainingError

    g = BadBatchGuard(max_bad=1)
    g.record(3, "non-finite loss", ["cut-a", "cut-b"])
    assert g.count == 1 and "cut-a" in g.log[0]
    with pytest.raises(TrainingError, match="--max-bad-batches 1"):
        g.record(5, "non-finite gradient", ["cut-c"])
