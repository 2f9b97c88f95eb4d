"""Results files in icefall's layout: recogs, errs (alignments and error statistics), wer-summary,
plus a JSON file per test set that ``compare.py`` reads."""
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import kaldialign

# (utterance id, reference words, hypothesis words)
Result = Tuple[str, List[str], List[str]]
EPS = "*"


def write_recogs(path: Path, results: Sequence[Result]) -> None:
    with open(path, "w") as f:
        for cut_id, ref, hyp in sorted(results):
            f.write(f"{cut_id}:\tref={ref}\n{cut_id}:\thyp={hyp}\n")


def word_error_rate(results: Sequence[Result]) -> Tuple[float, Dict[str, int]]:
    """Corpus WER in percent and the error counts; an empty reference set gives 0."""
    counts = Counter(ins=0, dels=0, sub=0, ref=0)
    for _, ref, hyp in results:
        d = kaldialign.edit_distance(ref, hyp)
        counts["ins"] += d["ins"]
        counts["dels"] += d["del"]
        counts["sub"] += d["sub"]
        counts["ref"] += len(ref)
    errs = counts["ins"] + counts["dels"] + counts["sub"]
    return (100.0 * errs / counts["ref"] if counts["ref"] else 0.0), dict(counts)


def word_errors(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Insertions + deletions + substitutions of ``hyp`` against ``ref``."""
    d = kaldialign.edit_distance(list(ref), list(hyp))
    return int(d["ins"] + d["del"] + d["sub"])


def utterance_errors(results: Sequence[Result]) -> Dict[str, List[int]]:
    """cut id -> [word errors, reference words]: what a bootstrap over utterances resamples."""
    out: Dict[str, List[int]] = {}
    for cut_id, ref, hyp in results:
        out[cut_id] = [word_errors(ref, hyp), len(ref)]
    return out


def write_error_stats(path: Path, test_set: str, results: Sequence[Result]) -> float:
    """Writes the per-utterance alignments and the most frequent errors; returns the WER (%).

    Sections, as in icefall: the %WER line, PER-UTT DETAILS, SUBSTITUTIONS, DELETIONS,
    INSERTIONS and PER-WORD STATS (word, correct, errors, count in ref, count in hyp).
    """
    subs: Counter = Counter()
    ins: Counter = Counter()
    dels: Counter = Counter()
    # word -> [correct, ref-side errors, hyp-side errors]
    words: Dict[str, List[int]] = defaultdict(lambda: [0, 0, 0])
    lines = []
    for cut_id, ref, hyp in sorted(results):
        ali = kaldialign.align(ref, hyp, EPS)
        parts = []
        for r, h in ali:
            if r == EPS:
                ins[h] += 1
                words[h][2] += 1
                parts.append(f"(->{h})")
            elif h == EPS:
                dels[r] += 1
                words[r][1] += 1
                parts.append(f"({r}->)")
            elif r != h:
                subs[(r, h)] += 1
                words[r][1] += 1
                words[h][2] += 1
                parts.append(f"({r}->{h})")
            else:
                words[r][0] += 1
                parts.append(r)
        lines.append(f"{cut_id}:\t" + " ".join(parts))
    wer, c = word_error_rate(results)
    errs = c["ins"] + c["dels"] + c["sub"]
    with open(path, "w") as f:
        f.write(f"%WER = {wer:.2f}\n")
        f.write(f"Errors: {c['ins']} insertions, {c['dels']} deletions, {c['sub']} substitutions, "
                f"over {c['ref']} reference words ({c['ref'] - c['sub'] - c['dels']} correct)\n")
        f.write(f"Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, DELETIONS:, "
                f"INSERTIONS:, PER-WORD STATS: ({test_set}, {errs} errors)\n\n")
        f.write("PER-UTT DETAILS: corr or (ref->hyp)\n")
        f.writelines(line + "\n" for line in lines)
        f.write("\nSUBSTITUTIONS: count ref -> hyp\n")
        for (r, h), n in sorted(subs.items(), key=lambda kv: (-kv[1], kv[0])):
            f.write(f"{n}   {r} -> {h}\n")
        f.write("\nDELETIONS: count ref\n")
        for w, n in sorted(dels.items(), key=lambda kv: (-kv[1], kv[0])):
            f.write(f"{n}   {w}\n")
        f.write("\nINSERTIONS: count hyp\n")
        for w, n in sorted(ins.items(), key=lambda kv: (-kv[1], kv[0])):
            f.write(f"{n}   {w}\n")
        f.write("\nPER-WORD STATS: word  corr tot_errs count_in_ref count_in_hyp\n")
        for w, (corr, ref_e, hyp_e) in sorted(words.items(), key=lambda kv: (-(kv[1][1] + kv[1][2]), kv[0])):
            f.write(f"{w}   {corr} {ref_e + hyp_e} {corr + ref_e} {corr + hyp_e}\n")
    return wer


def update_results_json(path: Path, entry: Dict) -> None:
    """Merges one decoding run into ``results-<set>.json`` (keyed by its tag), so that single-exit
    runs and sweeps accumulate and compare.py can read them all."""
    data = {"runs": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {"runs": {}}
    data.setdefault("runs", {})[entry["tag"]] = dict(entry, written=time.time())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def run_tag(args, exit_part: str, streaming: bool = False) -> str:
    """The name of one decoding run (file names and the key in results-<set>.json): checkpoint and average,
    exit (or exit rule), chunking, method and beam."""
    tag = f"iter-{args.iter}_avg-{args.avg}" if args.iter > 0 else f"epoch-{args.epoch}_avg-{args.avg}"
    if args.use_averaged_model:
        tag += "_use-averaged-model"
    if not exit_part.isdigit() and exit_part != "all":  # a dynamic run: what its criterion read
        nbest = "posterior" in exit_part or exit_part == "sweep"
        if getattr(args, "exit_scorer", None) == "transducer":
            exit_part += "-scorer-transducer"  # the transducer, not the CTC heads
        if nbest:
            exit_part += f"-nbest-{getattr(args, 'exit_nbest', 4)}"
        if not getattr(args, "exit_count_blank", True):
            exit_part += "-tokens-only"  # frames whose best symbol is blank not averaged
    tag += f"_exit-{exit_part}"
    chunk = getattr(args, "chunk_size", -1)
    if chunk and chunk > 0:
        tag += f"_{'streaming' if streaming else 'simulated'}-chunk-{chunk}-left-{args.left_context_frames}"
    tag += f"_{args.decoding_method}"
    if args.decoding_method in ("modified_beam_search", "ctc_prefix_beam_search"):
        tag += f"_beam-{args.beam_size}"
    return tag


def fmt_macs(macs) -> str:
    return "nan" if macs is None else f"{macs / 1e6:.1f}M"


def mean_seconds(cuts) -> float:
    """A set's mean utterance length (0.1 s steps, at least 0.5 s): the length at which MACs are counted."""
    return max(0.5, round(float(sum(c.duration for c in cuts)) / max(len(cuts), 1), 1))


def write_run(out_dir: Path, test_set: str, tag: str, results: Sequence[Result], enc_s: float, dec_s: float,
              audio_s: float, macs, extra: Dict) -> Dict:
    """recogs, errs and wer-summary files of one run; returns its entry for results-<set>.json."""
    import math

    write_recogs(out_dir / f"recogs-{test_set}-{tag}.txt", results)
    wer = write_error_stats(out_dir / f"errs-{test_set}-{tag}.txt", test_set, results)
    _, counts = word_error_rate(results)
    entry = dict(
        tag=tag, test_set=test_set, wer=wer, num_errors=counts["ins"] + counts["dels"] + counts["sub"],
        ins=counts["ins"], dels=counts["dels"], sub=counts["sub"], ref_words=counts["ref"], num_utts=len(results),
        audio_seconds=audio_s, rtf_encoder=enc_s / audio_s if audio_s else math.nan,
        rtf_decode=dec_s / audio_s if audio_s else math.nan, macs_per_second=macs,
        utt_errors=utterance_errors(results), **extra,
    )
    with open(out_dir / f"wer-summary-{test_set}-{tag}.txt", "w") as f:
        f.write("settings\tWER\tRTF-encoder\tRTF-decode\tencoder-MACs-per-s\n")
        f.write(f"{tag}\t{wer:.2f}\t{entry['rtf_encoder']:.4f}\t{entry['rtf_decode']:.4f}\t{fmt_macs(macs)}\n")
    return entry
