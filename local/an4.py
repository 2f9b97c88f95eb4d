#!/usr/bin/env python3
"""AN4 (CMU) -> lhotse RecordingSet + SupervisionSet per split. lhotse has no AN4 recipe, so this is one.

The distribution lists utterances in `etc/an4_{train,test}.transcription`, lines like
`<s> YES </s> (an251-fash-b)`, and their audio in `etc/an4_{train,test}.fileids` (paths under `wav/`
without the `.sph` suffix). Splits: dev = the first 100 training utterances (as ESPnet), train = the
other 848, test = the 130 test utterances.

A line or an utterance that cannot be used (no id, empty transcript, missing/empty/unreadable audio)
is reported by id with the reason in `data/<split>_rejected.txt` and left out.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

from prep_utils import add_repo_to_path, atomic_to_file, die_empty, record_rejects, setup_logging

add_repo_to_path()
from splitformer.data import use_soundfile_for_sphere  # noqa: E402

log = logging.getLogger("prepare")

NUM_DEV = 100
# the utterance id is the last parenthesised token on the line
_ID_RE = re.compile(r"\(([^()\s]+)\)\s*$")
_MARKERS = re.compile(r"</?s>")


@dataclass
class Utterance:
    utt_id: str
    text: str
    line: str  # "file:lineno", to point at the source in messages


def parse_transcription(path: Path) -> Tuple[List[Optional[Utterance]], List[Tuple[str, str]]]:
    """Parse a `.transcription` file.

    Returns one entry per non-blank line (None where the line is unusable, so that positions, and
    with them the dev/train boundary, do not move) and the problems found as (key, reason).
    """
    entries: List[Optional[Utterance]] = []
    problems: List[Tuple[str, str]] = []
    for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path.name}:{lineno}"
        m = _ID_RE.search(raw)
        if m is None:
            problems.append((where, f"{path}: line {lineno} has no utterance id '(...)': {raw.strip()!r}"))
            entries.append(None)
            continue
        text = " ".join(_MARKERS.sub(" ", raw[: m.start()]).split()).upper()
        entries.append(Utterance(utt_id=m.group(1), text=text, line=where))
    return entries, problems


def parse_fileids(path: Path) -> Dict[str, str]:
    """Map utterance id -> path under wav/ (no suffix)."""
    out: Dict[str, str] = {}
    if not path.is_file():
        log.warning("%s is missing; audio paths will be guessed from the utterance ids", path)
        return out
    for raw in path.read_text(errors="replace").splitlines():
        rel = raw.strip()
        if rel:
            out[Path(rel).name] = rel
    return out


def _guess_rel_path(utt_id: str, part: str) -> str:
    # ids look like an251-fash-b: the speaker directory is the middle field
    fields = utt_id.split("-")
    speaker = fields[1] if len(fields) >= 3 else "unknown"
    top = "an4_clstk" if part == "train" else "an4test_clstk"
    return f"{top}/{speaker}/{utt_id}"


def _speaker(utt_id: str) -> str:
    fields = utt_id.split("-")
    return fields[1] if len(fields) >= 3 else utt_id


def open_recording(audio: Path, utt_id: str) -> Tuple[Optional[Recording], Optional[str]]:
    """Read the audio header; return (recording, None) or (None, reason)."""
    if not audio.is_file():
        return None, f"missing audio file {audio}"
    if audio.stat().st_size == 0:
        return None, f"zero-length audio file {audio}"
    try:
        return Recording.from_file(audio, recording_id=utt_id), None
    except Exception as e:  # soundfile raises several types for corrupt headers
        return None, f"unreadable audio file {audio}: {type(e).__name__}: {e}"


def prepare_part(
    corpus_dir: Path, part: str
) -> Dict[str, Tuple[List[Recording], List[SupervisionSegment], List[Tuple[str, str]]]]:
    """Build recordings/supervisions for `part` ("train" -> dev+train, "test" -> test)."""
    trans = corpus_dir / "etc" / f"an4_{part}.transcription"
    if not trans.is_file():
        die_empty(f"{trans} not found: is {corpus_dir} an AN4 copy (etc/, wav/)?")
    entries, problems = parse_transcription(trans)
    fileids = parse_fileids(corpus_dir / "etc" / f"an4_{part}.fileids")

    def split_of(index: int) -> str:
        if part == "test":
            return "test"
        return "dev" if index < NUM_DEV else "train"

    result: Dict[str, Tuple[list, list, list]] = {}
    for s in (["test"] if part == "test" else ["dev", "train"]):
        result[s] = ([], [], [])
    # line problems (in line order, one per None entry) go to the split of the position they occupy
    line_problems = iter(problems)
    seen = set()
    for index, entry in enumerate(entries):
        recs, sups, rejects = result[split_of(index)]
        if entry is None:
            rejects.append(next(line_problems))
            continue
        if entry.utt_id in seen:
            rejects.append((entry.utt_id, f"{entry.line}: duplicate utterance id {entry.utt_id}"))
            continue
        seen.add(entry.utt_id)
        if not entry.text:
            rejects.append((entry.utt_id, f"{entry.line}: empty transcript"))
            continue
        rel = fileids.get(entry.utt_id) or _guess_rel_path(entry.utt_id, part)
        rec, reason = open_recording(corpus_dir / "wav" / f"{rel}.sph", entry.utt_id)
        if rec is None:
            rejects.append((entry.utt_id, reason))
            continue
        recs.append(rec)
        sups.append(
            SupervisionSegment(
                id=entry.utt_id,
                recording_id=entry.utt_id,
                start=0.0,
                duration=rec.duration,
                channel=0,
                text=entry.text,
                language="English",
                speaker=_speaker(entry.utt_id),
            )
        )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", type=Path, required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="where <split>_rejected.txt go")
    args = p.parse_args()
    setup_logging()
    use_soundfile_for_sphere()
    # absolute paths in the manifests, so that they work from any working directory
    args.corpus_dir = args.corpus_dir.resolve()
    for part in ("train", "test"):
        for split, (recs, sups, rejects) in prepare_part(args.corpus_dir, part).items():
            record_rejects(args.data_dir, split, rejects)
            if not recs:
                die_empty(f"AN4 split {split!r}: no usable utterance in {args.corpus_dir} (see {split}_rejected.txt)")
            atomic_to_file(RecordingSet.from_recordings(recs), args.manifest_dir / f"an4_recordings_{split}.jsonl.gz")
            atomic_to_file(SupervisionSet.from_segments(sups), args.manifest_dir / f"an4_supervisions_{split}.jsonl.gz")
            log.info("AN4 %s: %d utterances, %d rejected", split, len(recs), len(rejects))


if __name__ == "__main__":
    main()
