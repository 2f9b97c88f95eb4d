#!/usr/bin/env python3
"""Stage 0 helpers: check that a directory holds a corpus in the layout its recipe reads, or download it.

  corpus.py check    --dataset an4 --corpus-dir DIR      exit 1 with what is missing
  corpus.py download --dataset an4 --download-dir DIR    prints the corpus directory on stdout

AN4 comes from CMU (an4_sphere.tar.gz); LibriSpeech and TED-LIUM 3 through lhotse's download functions.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import List

from prep_utils import setup_logging

log = logging.getLogger("prepare")

AN4_URL = "http://www.speech.cs.cmu.edu/databases/an4/an4_sphere.tar.gz"
LIBRISPEECH_PARTS = {
    "librispeech": ["dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360", "train-other-500"],
    "mini_librispeech": ["dev-clean-2", "train-clean-5"],
}


def problems(dataset: str, corpus_dir: Path) -> List[str]:
    """What is missing for `dataset` in `corpus_dir` (empty when it looks usable)."""
    if not corpus_dir.is_dir():
        return [f"{corpus_dir} is not a directory"]
    if dataset == "an4":
        need = ["etc/an4_train.transcription", "etc/an4_test.transcription", "wav"]
        return [f"{corpus_dir / n} is missing (expected the AN4 layout: etc/*.transcription, etc/*.fileids, wav/)"
                for n in need if not (corpus_dir / n).exists()]
    if dataset in LIBRISPEECH_PARTS:
        parts = LIBRISPEECH_PARTS[dataset]
        if not any((corpus_dir / p).is_dir() for p in parts):
            return [f"{corpus_dir} holds none of the {dataset} parts {parts} (speaker/chapter/*.flac + *.trans.txt)"]
        return []
    if dataset == "tedlium3":
        return [f"{corpus_dir / 'legacy' / s / d} is missing (expected TED-LIUM 3's legacy/{{train,dev,test}}/{{sph,stm}})"
                for s in ("train", "dev", "test") for d in ("sph", "stm")
                if not (corpus_dir / "legacy" / s / d).is_dir()]
    return [f"unknown dataset {dataset!r}"]


def download(dataset: str, download_dir: Path) -> Path:
    download_dir.mkdir(parents=True, exist_ok=True)
    if dataset == "an4":
        target = download_dir / "an4"
        if not problems(dataset, target):
            return target
        archive = download_dir / "an4_sphere.tar.gz"
        if not archive.is_file():
            log.info("downloading %s", AN4_URL)
            tmp = archive.with_suffix(".part")
            try:
                urllib.request.urlretrieve(AN4_URL, tmp)
            except OSError as e:
                raise SystemExit(f"cannot download {AN4_URL}: {e}\nDownload it elsewhere and pass --corpus-dir.")
            tmp.rename(archive)
        with tarfile.open(archive) as tar:
            tar.extractall(download_dir, filter="data")
        return target
    if dataset in LIBRISPEECH_PARTS:
        from lhotse.recipes import download_librispeech

        parts = "mini_librispeech" if dataset == "mini_librispeech" else "librispeech"
        return Path(download_librispeech(download_dir, dataset_parts=parts))
    if dataset == "tedlium3":
        from lhotse.recipes import download_tedlium

        return Path(download_tedlium(download_dir))
    raise SystemExit(f"unknown dataset {dataset!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["check", "download"])
    p.add_argument("--dataset", required=True)
    p.add_argument("--corpus-dir", type=Path)
    p.add_argument("--download-dir", type=Path, default=Path("download"))
    args = p.parse_args()
    setup_logging()
    if args.action == "download":
        corpus = download(args.dataset, args.download_dir)
    else:
        if args.corpus_dir is None:
            p.error("check needs --corpus-dir")
        corpus = args.corpus_dir
    found = problems(args.dataset, corpus)
    if found:
        for msg in found:
            log.error("%s", msg)
        sys.exit(1)
    print(corpus)


if __name__ == "__main__":
    main()
