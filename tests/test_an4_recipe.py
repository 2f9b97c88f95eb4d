"""The AN4 recipe leaves the blank plateau within a few minutes.

The old recipe (--max-duration 100, 34 updates an epoch) sat at a dev loss of ~0.9 per frame with every
dev utterance decoded as blank for 15 epochs. Here a smaller model of the early-exit kind trains with the
very settings run.sh uses (read from run.sh, so that the test follows the recipe) on the whole AN4
training set, and must get past that plateau: a dev loss under PLATEAU_LOSS at its top exit and dev
greedy transcripts that are far from all blank (WER under PLATEAU_WER).
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from an4_fixture import prepared_an4

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


def recipe_args() -> list:
    """run.sh's AN4 training settings and its short schedule's --max-duration."""
    text = (REPO / "run.sh").read_text()
    args = shlex.split(re.search(r'^an4_train_args="([^"]*)"', text, re.M).group(1))
    max_duration = re.search(r"short\) def_epochs=\d+; def_avg=\d+; def_max_duration=(\d+)", text).group(1)
    return args + ["--max-duration", max_duration]


@pytest.fixture(scope="module")
def an4_data(an4_dir, tmp_path_factory) -> Path:
    return prepared_an4(tmp_path_factory.getbasetemp() / "an4_prepared", an4_dir)


def test_recipe_leaves_the_blank_plateau(an4_data, tmp_path):
    exp = tmp_path / "exp"
    cmd = [sys.executable, str(REPO / "splitformer" / "train.py"), *SMALL, *recipe_args(),
           "--num-epochs", str(EPOCHS), "--exp-dir", str(exp), "--manifest-dir", str(an4_data / "fbank"),
           "--bpe-model", str(an4_data / "lang_bpe_30" / "bpe.model"), "--num-workers", "0",
           "--progress-bar", "false", "--tensorboard", "false"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    last = (exp / "log" / "epochs.txt").read_text().splitlines()[-1]
    loss = float(re.search(r"exit4=([0-9.]+)", last.split("valid loss")[1]).group(1))
    wer = float(re.search(r"valid WER .*exit4=([0-9.]+)%", last).group(1))
    assert loss < PLATEAU_LOSS, last
    assert wer < PLATEAU_WER, last
