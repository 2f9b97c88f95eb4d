#!/usr/bin/env python3
"""AN4 (CMU) -> lhotse RecordingSet + SupervisionSet per split. lhotse has no AN4 recipe, so this is one.

The distribution lists utterances in `etc/an4_{train,test}.transcription`, lines like
`<s> YES </s> (an251-fash-b)`, and their audio in `etc/an4_{train,test}.fileids` (paths under `wav/`
without the `.sph` suffix). The middle field of an id is the speaker; its first letter is the speaker's sex
(f/m: every f speaker's median F0 lies at 174-232 Hz, every m speaker's at 85-163 Hz, measured on 3 utterances
each). test = the 130 test utterances (10 speakers: 3 f, 7 m).

dev (``--dev-rule speakers``): whole training speakers held out, so that dev WER says how the model
does on voices it has not heard, as test does, with both sexes in about test's proportion (see
``choose_dev_speakers``): on AN4 2 f + 6 m speakers (fbbh fjam mcel mjjs2 mmaf mnjl mscg2 mtje), 101 utterances,
26 of them f (test: 39 of 130); train keeps the other 66 speakers, 847 utterances. ``--dev-rule first-lines``
(the default before the main job was retrained on the speakers rule; it reproduces models trained then) is the
first 100 training lines, as ESPnet: 8 whole speakers, all f.

A line or an utterance that cannot be used (no id, empty transcript, missing/empty/unreadable audio)
is reported by id with the reason in `data/<split>_rejected.txt` and left out.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

from prep_utils import add_repo_to_path, atomic_to_file, die_empty, record_rejects, setup_logging

add_repo_to_path()
from splitformer.data import use_soundfile_for_sphere  # noqa: E402

log = logging.getLogger("prepare")

NUM_DEV = 100  # dev's size in utterances: exactly for first-lines, the target for speakers
DEV_RULES = ("speakers", "first-lines")
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


def speaker_sex(speaker: str) -> str:
    """'f' or 'm' from AN4's speaker naming; '?' for a name that does not follow it."""
    return speaker[0] if speaker[:1] in ("f", "m") else "?"


def speaker_group(speaker: str) -> str:
    """Speakers that may be one person (mdcs and mdcs2: same initials, a trailing number) share a group, and
    a group goes to dev or to train whole."""
    return re.sub(r"\d+$", "", speaker) or speaker


def _stable_order(name: str) -> str:
    """A fixed pseudo-random order of groups: not alphabetical, so dev is not the speakers whose initials come
    first, and not seeded from anything that can change."""
    return hashlib.sha256(name.encode()).hexdigest()


def choose_dev_speakers(train_counts: Dict[str, int], test_counts: Dict[str, int], target: int = NUM_DEV) -> Set[str]:
    """The training speakers held out as dev (``train_counts``/``test_counts``: speaker -> utterances).

    Each sex gets ``target`` times its share of test's utterances; its speaker groups, in ``_stable_order``,
    are taken one at a time while taking the next brings that sex's utterance count closer to its share.
    Groups that test's speakers belong to are never chosen. Raises ValueError when a sex that test has has no
    training speaker left to give, or when dev would take every training speaker.
    """
    test_groups = {speaker_group(s) for s in test_counts}
    groups: Dict[str, List[str]] = {}
    for s in sorted(train_counts):
        if speaker_group(s) not in test_groups:
            groups.setdefault(speaker_group(s), []).append(s)
    total_test = sum(test_counts.values())
    share = Counter()
    for s, n in test_counts.items():
        share[speaker_sex(s)] += n / max(total_test, 1)
    chosen: Set[str] = set()
    for sex in sorted(share):
        want = round(target * share[sex])
        if want == 0:
            continue
        pool = sorted((g for g, members in groups.items() if speaker_sex(members[0]) == sex), key=_stable_order)
        if not pool:
            raise ValueError(f"test has speakers of sex {sex!r} but no training speaker of that sex is left for dev")
        got = 0
        for g in pool:
            n = sum(train_counts[s] for s in groups[g])
            if got and abs(got + n - want) >= abs(got - want):
                break
            chosen.update(groups[g])
            got += n
    if chosen >= set(train_counts):
        raise ValueError(f"dev would take all {len(train_counts)} training speakers: the corpus is too small for "
                         "--dev-rule speakers; use --dev-rule first-lines")
    return chosen


def utterance_speakers(entries: Iterable[Optional["Utterance"]]) -> Dict[str, int]:
    """speaker -> utterances among the usable lines of a transcription."""
    return dict(Counter(_speaker(e.utt_id) for e in entries if e is not None))


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


def read_part(corpus_dir: Path, part: str) -> Tuple[List[Optional[Utterance]], List[Tuple[str, str]]]:
    """The parsed ``etc/an4_<part>.transcription``; stops naming the file when it is absent."""
    trans = corpus_dir / "etc" / f"an4_{part}.transcription"
    if not trans.is_file():
        die_empty(f"{trans} not found: is {corpus_dir} an AN4 copy (etc/, wav/)?")
    return parse_transcription(trans)


def dev_speakers_of(corpus_dir: Path, dev_rule: str) -> Optional[Set[str]]:
    """The dev speakers of ``--dev-rule speakers`` (None for first-lines), stopping with the fix on failure."""
    if dev_rule == "first-lines":
        return None
    train, _ = read_part(corpus_dir, "train")
    test, _ = read_part(corpus_dir, "test")
    try:
        return choose_dev_speakers(utterance_speakers(train), utterance_speakers(test))
    except ValueError as e:
        die_empty(f"{corpus_dir / 'etc'}: cannot choose a speaker-disjoint dev set: {e}. Pass --dev-rule "
                  f"first-lines to hold out the first {NUM_DEV} training lines instead")
    return None  # not reached: die_empty exits


def prepare_part(
    corpus_dir: Path, part: str, dev_speakers: Optional[Set[str]] = None
) -> Dict[str, Tuple[List[Recording], List[SupervisionSegment], List[Tuple[str, str]]]]:
    """Build recordings/supervisions for `part` ("train" -> dev+train, "test" -> test).

    ``dev_speakers`` None: dev is the first NUM_DEV lines (first-lines); else the lines of those speakers.
    """
    entries, problems = read_part(corpus_dir, part)
    fileids = parse_fileids(corpus_dir / "etc" / f"an4_{part}.fileids")

    def split_of(index: int) -> str:
        if part == "test":
            return "test"
        if dev_speakers is None:
            return "dev" if index < NUM_DEV else "train"
        # a line without an id has no speaker: its problem is reported with train's
        entry = entries[index]
        return "dev" if entry is not None and _speaker(entry.utt_id) in dev_speakers else "train"

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
    p.add_argument("--dev-rule", choices=DEV_RULES, default="speakers",
                   help="speakers: whole training speakers, both sexes as in test; first-lines: the first 100 "
                        "training lines (8 speakers, all female; the split models trained before the main job "
                        "moved to speakers were trained on)")
    args = p.parse_args()
    setup_logging()
    use_soundfile_for_sphere()
    # absolute paths in the manifests, so that they work from any working directory
    args.corpus_dir = args.corpus_dir.resolve()
    dev_speakers = dev_speakers_of(args.corpus_dir, args.dev_rule)
    if dev_speakers is not None:
        log.info("AN4 dev speakers (--dev-rule speakers): %s", " ".join(sorted(dev_speakers)))
    for part in ("train", "test"):
        for split, (recs, sups, rejects) in prepare_part(args.corpus_dir, part, dev_speakers).items():
            record_rejects(args.data_dir, split, rejects)
            if not recs:
                die_empty(f"AN4 split {split!r}: no usable utterance in {args.corpus_dir} (see {split}_rejected.txt)")
            atomic_to_file(RecordingSet.from_recordings(recs), args.manifest_dir / f"an4_recordings_{split}.jsonl.gz")
            atomic_to_file(SupervisionSet.from_segments(sups), args.manifest_dir / f"an4_supervisions_{split}.jsonl.gz")
            log.info("AN4 %s: %d utterances, %d rejected", split, len(recs), len(rejects))


if __name__ == "__main__":
    main()
