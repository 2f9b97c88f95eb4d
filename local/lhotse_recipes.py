#!/usr/bin/env python3
"""Stage 1 for corpora that lhotse has recipes for (LibriSpeech, mini LibriSpeech, TED-LIUM 3).

Runs lhotse's `prepare_librispeech` / `prepare_tedlium` and writes the result under our names,
`<manifest-dir>/<dataset>_{recordings,supervisions}_<split>.jsonl.gz`, for local/make_cuts.py to check.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from collections import defaultdict
from typing import Dict, List, Tuple

from lhotse import RecordingSet, SupervisionSet, fastcopy

from prep_utils import add_repo_to_path, atomic_to_file, die_empty, record_rejects, setup_logging

add_repo_to_path()
from splitformer.data import use_soundfile_for_sphere  # noqa: E402
from splitformer.data.recipes import get_dataset  # noqa: E402

log = logging.getLogger("prepare")


def tolerant_librispeech_lines(problems: Dict[str, List[Tuple[str, str]]]) -> None:
    """Make lhotse's LibriSpeech recipe report bad lines/files instead of dying or dropping them quietly.

    lhotse parses each `*.trans.txt` line with `parse_utterance`, which raises on a line without text or
    on an unreadable file, and returns None (with only a log line) when the file is missing. Wrapping it
    turns each of those into a reject for `<split>_rejected.txt` while the rest of the part goes on.
    """
    import lhotse.recipes.librispeech as L

    original = L.parse_utterance

    def parse(split_path: Path, line: str, alignments):
        fields = line.split()
        if not fields:
            return None  # blank line
        uid = fields[0]
        where = Path(split_path) / Path(uid.replace("-", "/")).parent
        if len(fields) == 1:
            problems[Path(split_path).name].append((uid, f"{where}: transcript line for {uid} has no text"))
            return None
        audio = where / f"{uid}.flac"
        try:
            result = original(split_path, line, alignments)
        except Exception as e:
            reason = f"zero-length audio file {audio}" if audio.is_file() and audio.stat().st_size == 0 else \
                f"unreadable audio file {audio}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            problems[Path(split_path).name].append((uid, reason))
            return None
        if result is None:
            problems[Path(split_path).name].append((uid, f"missing audio file {audio}"))
        return result

    L.parse_utterance = parse


def tedlium_usable_root(
    corpus_dir: Path, splits: List[str], scratch: Path, problems: Dict[str, List[Tuple[str, str]]]
) -> Path:
    """The TED-LIUM root to give lhotse: the corpus itself, or a scratch copy of its layout without bad talks.

    lhotse's `prepare_tedlium` stops at the first unreadable .sph and asserts one .stm per .sph. Each talk
    is checked here first; a talk with a missing, empty or unreadable .sph is reported (by talk id) and
    left out of a scratch tree of symlinks to the good talks, so that the rest of the corpus goes on.
    """
    from lhotse import Recording

    bad_any = False
    good: Dict[str, List[str]] = {}
    for split in splits:
        root = corpus_dir / "legacy" / split
        good[split] = []
        for stm in sorted((root / "stm").glob("*.stm")):
            talk = stm.stem
            sph = root / "sph" / f"{talk}.sph"
            reason = None
            if not sph.is_file():
                reason = f"missing audio file {sph} (for {stm})"
            elif sph.stat().st_size == 0:
                reason = f"zero-length audio file {sph}"
            else:
                try:
                    Recording.from_file(sph)
                except Exception as e:
                    reason = f"unreadable audio file {sph}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if reason is None:
                good[split].append(talk)
            else:
                bad_any = True
                problems[split].append((talk, reason + " (every segment of this talk is left out)"))
        orphans = {p.stem for p in (root / "sph").glob("*.sph")} - {p.stem for p in (root / "stm").glob("*.stm")}
        for talk in sorted(orphans):
            bad_any = True
            problems[split].append((talk, f"{root / 'sph' / (talk + '.sph')} has no transcript {root / 'stm' / (talk + '.stm')}"))
        if not good[split]:
            die_empty(f"TED-LIUM {split}: no usable talk under {root}")
    if not bad_any:
        return corpus_dir
    if scratch.exists():
        shutil.rmtree(scratch)
    for split, talks in good.items():
        for sub, ext in (("sph", "sph"), ("stm", "stm")):
            d = scratch / "legacy" / split / sub
            d.mkdir(parents=True)
            for talk in talks:
                os.symlink(corpus_dir / "legacy" / split / sub / f"{talk}.{ext}", d / f"{talk}.{ext}")
    log.info("TED-LIUM: %d bad talk(s) left out; lhotse reads the good ones through %s",
             sum(len(v) for v in problems.values()), scratch)
    return scratch


def run_lhotse_recipe(
    dataset: str, corpus_dir: Path, splits: List[str], num_jobs: int, problems: Dict[str, List[Tuple[str, str]]],
    scratch: Path,
) -> Dict[str, dict]:
    if dataset in ("librispeech", "mini_librispeech"):
        from lhotse.recipes import prepare_librispeech

        missing = [s for s in splits if not (corpus_dir / s).is_dir()]
        if missing:
            die_empty(f"{corpus_dir} lacks the {dataset} parts {missing}: each must be a directory "
                      "speaker/chapter/*.flac with *.trans.txt")
        tolerant_librispeech_lines(problems)
        return prepare_librispeech(corpus_dir, dataset_parts=splits, num_jobs=num_jobs)
    if dataset == "tedlium3":
        from lhotse.recipes import prepare_tedlium

        root = tedlium_usable_root(corpus_dir, splits, scratch, problems)
        # "kaldi" drops <unk> and [NOISE] marks and re-attaches split contractions (they 're -> they're)
        return prepare_tedlium(root, dataset_parts=splits, num_jobs=num_jobs, normalize_text="kaldi")
    raise SystemExit(f"lhotse_recipes.py does not handle dataset {dataset!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--corpus-dir", type=Path, required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="where <split>_rejected.txt go")
    p.add_argument("--num-jobs", type=int, default=1)
    args = p.parse_args()
    setup_logging()
    use_soundfile_for_sphere()
    corpus_dir = args.corpus_dir.resolve()
    splits = get_dataset(args.dataset).all_splits()
    problems: Dict[str, List[Tuple[str, str]]] = defaultdict(list)
    scratch = (args.manifest_dir / "tedlium_good_talks").resolve()
    manifests = run_lhotse_recipe(args.dataset, corpus_dir, splits, args.num_jobs, problems, scratch)
    for split in splits:
        record_rejects(args.data_dir, split, problems.get(split, []))
        if split not in manifests:
            die_empty(f"lhotse found no {args.dataset} {split!r} data under {corpus_dir}")
        recs, sups = manifests[split]["recordings"], manifests[split]["supervisions"]
        sups = SupervisionSet.from_segments(fastcopy(s, text=" ".join((s.text or "").split())) for s in sups)
        if (scratch / "legacy").exists():  # point at the corpus, not at the scratch tree of symlinks
            recs = RecordingSet.from_recordings(
                fastcopy(r, sources=[fastcopy(src, source=os.path.realpath(src.source)) for src in r.sources])
                for r in recs
            )
        atomic_to_file(recs, args.manifest_dir / f"{args.dataset}_recordings_{split}.jsonl.gz")
        atomic_to_file(sups, args.manifest_dir / f"{args.dataset}_supervisions_{split}.jsonl.gz")
        log.info("%s %s: %d recordings, %d segments", args.dataset, split, len(recs), len(sups))


if __name__ == "__main__":
    main()
