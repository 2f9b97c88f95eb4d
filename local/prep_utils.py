"""Helpers shared by the data-preparation tools in local/ (imported, never copied into a recipe).

Every tool reports a problem with one item the same way: a WARNING naming the item and the reason,
and a line `<id>\t<reason>` in `data/<split>_rejected.txt`. The item is then left out and the run goes on.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, Tuple

EXIT_EMPTY = 2  # exit status when going on makes no sense (nothing usable left)
SAMPLING_RATE = 16000

log = logging.getLogger("prepare")


def setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s [%(filename)s] %(message)s",
        level=logging.INFO,
        stream=sys.stderr,
    )


def rejected_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / f"{split}_rejected.txt"


def read_rejected(path: Path) -> Dict[str, str]:
    if not path.is_file():
        return {}
    out: Dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, _, reason = line.partition("\t")
            out[key] = reason
    return out


def record_rejects(data_dir: Path, split: str, rejects: Iterable[Tuple[str, str]]) -> int:
    """Log each reject and upsert it into `<data_dir>/<split>_rejected.txt`.

    Upserting (rather than appending) keeps a re-run from listing the same item twice.
    Returns how many items were rejected in this call.
    """
    rejects = list(rejects)
    path = rejected_path(data_dir, split)
    table = read_rejected(path)
    for key, reason in rejects:
        log.warning("rejected %s (split %s): %s", key, split, reason)
        table[key] = reason.replace("\n", " ").replace("\t", " ")
    if rejects or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}\t{v}\n" for k, v in sorted(table.items())))
        os.replace(tmp, path)
    return len(rejects)


def die_empty(message: str) -> None:
    """Stop the whole preparation: nothing usable is left."""
    log.error("%s", message)
    sys.exit(EXIT_EMPTY)


def cuts_path(manifest_dir: Path, dataset: str, split: str) -> Path:
    """Where stage 1 (manifests) and stage 3 (fbank) keep a split's cuts."""
    return Path(manifest_dir) / f"{dataset}_cuts_{split}.jsonl.gz"


def existing_cuts(manifest_dir: Path, dataset: str, split: str, made_by: str) -> Path:
    """The split's cuts file; stops with exit 2 naming the stage to run if an earlier stage left none."""
    path = cuts_path(manifest_dir, dataset, split)
    if not path.is_file():
        die_empty(f"{path} is missing: run {made_by} first")
    return path


def atomic_to_file(manifest, path: Path) -> None:
    """Write a lhotse manifest so that a crash never leaves a half-written file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name.replace(".jsonl.gz", ".tmp.jsonl.gz"))
    manifest.to_file(tmp)
    os.replace(tmp, path)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def add_repo_to_path() -> None:
    """Let local/ tools import splitformer without the caller setting PYTHONPATH."""
    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
