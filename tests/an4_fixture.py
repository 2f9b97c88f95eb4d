"""AN4 prepared once per test session (features + BPE), for every test that needs real data.

Tests take it as the session fixture `an4_data` (conftest.py), which calls
`prepared_an4(<basetemp>/an4_prepared, an4_dir)`; tests/ is on sys.path under pytest's default import mode.

`prepared_an4(root)` returns `root/data` holding `fbank/an4_cuts_{train,dev,test}.jsonl.gz` and
`lang_bpe_30/bpe.model`. Calls with the same root in one process run `./prepare.sh` only once; a root
prepared by an earlier process is reused as is (prepare.sh skips complete stages). Set
SPLITFORMER_AN4_DATA to an already prepared data dir to skip preparation altogether.

A module that trains a model with run.sh's recipe registers it at import, `recipe_run("name", __file__, flags,
epochs)`, and takes it from the session fixture `an4_recipe_runs` (conftest.py): `an4_recipe_runs.wait("name")`.
Every registered run whose module has selected tests starts the first time one is asked for, side by side.
"""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_AN4 = Path(os.environ.get("AN4_DIR", REPO.parent / "shared" / "data" / "an4"))
VOCAB_SIZE = 30

_cache: Dict[Path, Path] = {}


def recipe_args() -> List[str]:
    """run.sh's AN4 training settings and its short schedule's --max-duration (read from run.sh, so that the
    tests follow the recipe)."""
    import re
    import shlex

    text = (REPO / "run.sh").read_text()
    args = shlex.split(re.search(r'^an4_train_args="([^"]*)"', text, re.M).group(1))
    max_duration = re.search(r"short\) def_epochs=\d+; def_avg=[^;]*; def_max_duration=(\d+)", text).group(1)
    return args + ["--max-duration", max_duration]


def recipe_command(exp: Path, data: Path, model_args: List[str], epochs: int) -> List[str]:
    """train.py with run.sh's recipe on prepared AN4 ``data`` (see :func:`prepared_an4`), into ``exp``."""
    import sys

    return [sys.executable, str(REPO / "splitformer" / "train.py"), *model_args, *recipe_args(),
            "--num-epochs", str(epochs), "--exp-dir", str(exp), "--manifest-dir", str(data / "fbank"),
            "--bpe-model", str(data / f"lang_bpe_{VOCAB_SIZE}" / "bpe.model"), "--num-workers", "0",
            "--progress-bar", "false", "--tensorboard", "false"]


# The models that test modules train with the recipe: name -> (the files of the modules that use it, model flags,
# epochs). A module registers its run at import (several modules may share one); the session starts every run
# that a module with selected tests uses, side by side.
_RUNS: Dict[str, Tuple[Set[str], List[str], int]] = {}


def recipe_run(name: str, module_file: str, model_args: List[str], epochs: int) -> None:
    files, args, n = _RUNS.get(name, (set(), list(model_args), epochs))
    assert (args, n) == (list(model_args), epochs), f"recipe run {name!r} is registered twice with other flags"
    _RUNS[name] = (files | {str(Path(module_file).resolve())}, args, n)


class CausalRecipe(NamedTuple):
    """The small causal Splitformer that the streaming and serving tests train with run.sh's recipe (one run,
    "causal", shared), and the chunking they stream it with."""

    flags: List[str]
    epochs: int
    chunk: int  # 320 ms chunks (40 ms frames)
    left: int  # 1.28 s of left context
    avg: List[str]


CAUSAL = CausalRecipe(["--preset", "splitformer-cpu-causal", "--num-encoder-layers", "4", "--exit-layers", "2,4",
                       "--split-blocks", "0,1", "--encoder-dim", "64", "--encoder-unmasked-dim", "64",
                       "--feedforward-dim", "128", "--chunk-exit-prob", "0.5"],
                      5, 8, 32, ["--epoch", "5", "--avg", "2", "--use-averaged-model"])


class RecipeRuns:
    """The registered recipe runs that this session's tests need, started together (one thread each when there
    are several: a small model gains little from a second thread, and two side by side finish sooner than one
    after the other), each waited for by the module that uses it."""

    def __init__(self, root: Path, data: Path, selected_files: Set[str]) -> None:
        wanted = {n: r for n, r in sorted(_RUNS.items()) if r[0] & selected_files}
        threads = "1" if len(wanted) > 1 else "2"
        self.procs: Dict[str, Tuple[Path, Path, subprocess.Popen]] = {}
        for name, (_, args, epochs) in wanted.items():
            exp = root / name / "exp"
            exp.parent.mkdir(parents=True, exist_ok=True)
            log = root / name / "train.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(recipe_command(exp, data, args + ["--num-threads", threads], epochs),
                                        cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            self.procs[name] = (exp, log, proc)

    def wait(self, name: str, timeout: int = 900) -> Path:
        """The run's experiment directory once it has finished (failing with the end of its log if it failed)."""
        assert name in self.procs, f"recipe run {name!r} was not started: register it with recipe_run()"
        exp, log, proc = self.procs[name]
        rc = proc.wait(timeout=timeout)
        assert rc == 0, f"training {name} failed (exit {rc}); the end of {log}:\n" + log.read_text()[-3000:]
        return exp

    def stop(self) -> None:
        for _, _, proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class Utterance(NamedTuple):
    id: str  # e.g. an251-fash-b
    path: Path  # its .sph file
    text: str  # the transcript, upper case, without <s> </s> and the id
    line: str  # the transcription line as it is in etc/
    fileid: str  # its path under wav/, without the suffix


def an4_utterances(an4_dir: Path, n: Optional[int] = None, skip: int = 0, part: str = "train") -> List[Utterance]:
    """The AN4 utterances ``skip .. skip + n`` of ``etc/an4_<part>.transcription`` (with ``.fileids``), in file
    order: the one reader of AN4's layout that the tests share (prepare.sh has its own, local/an4.py)."""
    etc = Path(an4_dir) / "etc"
    lines = [ln for ln in (etc / f"an4_{part}.transcription").read_text().splitlines() if ln.strip()]
    fileids = [f for f in (etc / f"an4_{part}.fileids").read_text().splitlines() if f.strip()]
    end = None if n is None else skip + n
    out = []
    for line, fid in zip(lines[skip:end], fileids[skip:end]):
        text = " ".join(line.rsplit("(", 1)[0].replace("<s>", " ").replace("</s>", " ").split()).upper()
        out.append(Utterance(Path(fid).name, Path(an4_dir) / "wav" / f"{fid}.sph", text, line, fid))
    return out
_lock = threading.Lock()


def _is_prepared(data: Path) -> bool:
    return all(
        (data / p).is_file()
        for p in [
            "fbank/an4_cuts_train.jsonl.gz",
            "fbank/an4_cuts_dev.jsonl.gz",
            "fbank/an4_cuts_test.jsonl.gz",
            f"lang_bpe_{VOCAB_SIZE}/bpe.model",
            f"lang_bpe_{VOCAB_SIZE}/tokens.txt",
            ".done/an4.stage5",
            ".done/an4.stage6",
            "fbank/an4_cuts_train-narrowband.jsonl.gz",
            "fbank/an4_cuts_dev-narrowband.jsonl.gz",
            "fbank/an4_cuts_test-trimmed.jsonl.gz",
        ]
    )


def prepared_an4(tmp_root: Path, an4_dir: Optional[Path] = None) -> Path:
    """Run `./prepare.sh --dataset an4 --variants true` (as run.sh does) into `tmp_root/data` (once) and
    return that data dir."""
    override = os.environ.get("SPLITFORMER_AN4_DATA")
    if override and _is_prepared(Path(override)):
        return Path(override)
    tmp_root = Path(tmp_root).resolve()
    with _lock:
        if tmp_root in _cache:
            return _cache[tmp_root]
        data = tmp_root / "data"
        if not _is_prepared(data):
            corpus = Path(an4_dir) if an4_dir is not None else DEFAULT_AN4
            tmp_root.mkdir(parents=True, exist_ok=True)
            cmd = [
                str(REPO / "prepare.sh"), "--dataset", "an4", "--corpus-dir", str(corpus),
                "--data-dir", str(data), "--num-jobs", "1", "--vocab-size", str(VOCAB_SIZE), "--variants", "true",
            ]
            proc = subprocess.run(cmd, cwd=tmp_root, capture_output=True, text=True)
            (tmp_root / "prepare.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(cmd)} failed with exit status {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                )
        _cache[tmp_root] = data
        return data
