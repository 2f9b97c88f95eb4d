#!/usr/bin/env python3
"""Compare decoding results of several experiments (e.g. Zipformer baseline, early-exit baseline,
Splitformer): a markdown table and plots of WER against exit layer and against encoder compute.

    ./splitformer/compare.py exp/zipformer-cpu exp/ee-zipformer-cpu exp/splitformer-cpu --out exp/report

Reads ``<exp-dir>/<decoding-method>/results-<set>.json`` as decode.py writes them and writes
``<out>/report.md``, ``<out>/results.tsv``, ``<out>/results.json`` and ``<out>/wer-<set>.png`` (one per
test set). When several runs decoded the same weights, set, method and exit, the newest one counts.

Weights: a directory decoded at several checkpoints (epoch or iter, --avg, --use-averaged-model) would mix
them under one name, so compare.py stops and lists them unless --checkpoint picks one (or ``all``).

Seeds: directories given the same display name (``--names``) are seeds of one system; its WER is the
mean over seeds. Every WER gets a 95 % interval from a two-stage bootstrap, speakers and then their
utterances (and, with several seeds, seeds), so that it says how the WER would move on other voices as well
as on other sentences; the speaker comes from the utterance id (AN4, LibriSpeech) or from a run's
``utt_speakers``. Every pair of systems is compared at each exit they share with a paired bootstrap of the
difference; the p-values of one pair, set and method are Holm-corrected across the exits, and a difference
whose corrected p is 0.05 or more is marked as inside the noise.
"""
import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp_dirs", nargs="+", type=Path, help="experiment directories decoded with decode.py")
    p.add_argument("--out", type=Path, default=Path("exp/report"))
    p.add_argument("--names", type=str, default=None,
                   help="comma list of display names (default: directory names); a name given to several "
                        "directories makes them seeds of one system")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the 95%% intervals")
    p.add_argument("--wall-seconds", type=float, default=None,
                   help="wall time of the job that produced the results, stored in results.json")
    p.add_argument("--checkpoint", type=str, default=None,
                   help="which decoded weights to report where a directory holds several, spelled as decode.py's "
                        "tags begin (epoch-30_avg-10_use-averaged-model, iter-...): one for every directory, a comma "
                        "list in directory order (empty: that directory's only one), or 'all' (each its own system)")
    p.add_argument("--conditions", type=Path, default=None,
                   help="prepare.sh's test-set labels, data/fbank/<dataset>_conditions.json: headings say which sets "
                        "are matched (made as training's variants) and which unmatched")
    p.add_argument("--method", type=str, default=None,
                   help="report only decodes of this method (a table whose search was chosen on dev should not "
                        "show the others); with --choose-avg, the method of the decodes it chooses from "
                        "(default greedy_search)")
    p.add_argument("--beam-size", type=int, default=None,
                   help="with --method, only decodes at this beam (a method decoded at several beams needs it)")
    g = p.add_argument_group("choosing a model's average on dev (run.sh's stage 2) instead of a report")
    g.add_argument("--choose-avg", type=str, default=None,
                   help="comma or space list of --avg values decoded at --epoch: print the one whose last exit has "
                        "the lowest WER on --choose-on (a tie goes to the first listed), then a line of every WER")
    g.add_argument("--epoch", type=int, default=None, help="the epoch the --choose-avg decodes end at")
    g.add_argument("--choose-on", type=str, default="dev", help="the set the average is chosen on")
    return p


# ------------------------------------------------------------------------------------------- speakers
# AN4: an251-fash-b, cen1-fcaw-b (the middle field); LibriSpeech: 1089-134686-0000 (the first)
_SPEAKER_PATTERNS = (re.compile(r"^(?:an|cen)\d+-([a-z]+\d*)-[a-z]+$"), re.compile(r"^(\d+)-\d+-\d+$"))


def speaker_of(utt_id: str, known: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The speaker of an utterance: from a run's ``utt_speakers`` when decode.py recorded it, else from the id's
    pattern (AN4, LibriSpeech); None when neither says."""
    if known and utt_id in known:
        return known[utt_id]
    for pattern in _SPEAKER_PATTERNS:
        m = pattern.match(utt_id)
        if m:
            return m.group(1)
    return None


def speaker_groups(utts: Sequence[str], runs: Sequence[Dict] = ()) -> Tuple[List[List[int]], bool]:
    """Indices of ``utts`` grouped by speaker (in first-seen order) and whether every speaker was known; an
    utterance of unknown speaker is a group of its own (the bootstrap is then over utterances)."""
    known: Dict[str, str] = {}
    for r in runs:
        known.update(r.get("utt_speakers") or {})
    groups: Dict[str, List[int]] = {}
    all_known = True
    for i, u in enumerate(utts):
        s = speaker_of(u, known)
        if s is None:
            all_known = False
            s = f"\0{u}"  # its own group, never equal to a real speaker
        groups.setdefault(s, []).append(i)
    return list(groups.values()), all_known


# ------------------------------------------------------------------------------------------- statistics
def _error_table(seed_runs: Sequence[Dict], utts: Sequence[str]):
    """(seeds, utterances) arrays of word errors and reference words, in the order of ``utts``."""
    import numpy as np

    errs = np.array([[r["utt_errors"][u][0] for u in utts] for r in seed_runs], dtype=np.float64)
    refs = np.array([[r["utt_errors"][u][1] for u in utts] for r in seed_runs], dtype=np.float64)
    return errs, refs


def speaker_draws(groups: Sequence[Sequence[int]], n_utts: int, draws: int, seed: int = 0):
    """(draws, utterances) counts of a two-stage bootstrap: the speakers drawn with replacement, then within
    each drawn speaker as many of its utterances, drawn with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_spk = len(groups)
    sizes = np.array([len(g) for g in groups])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    members = np.array([u for g in groups for u in g], dtype=np.int64)
    chosen = rng.integers(0, n_spk, size=(draws, n_spk))
    per = sizes[chosen].ravel()
    draw_of = np.repeat(np.arange(draws), sizes[chosen].sum(axis=1))
    spk = np.repeat(chosen.ravel(), per)
    pick = members[starts[spk] + (rng.random(spk.size) * sizes[spk]).astype(np.int64)]
    weights = np.zeros((draws, n_utts))
    np.add.at(weights, (draw_of, pick), 1.0)
    return weights


def seed_draws(n_seeds: int, draws: int, seed: int):
    """Which seeds each draw averages (resampled only when there are several)."""
    import numpy as np

    if n_seeds == 1:
        return np.zeros((draws, 1), dtype=int)
    return np.random.default_rng(seed).integers(0, n_seeds, size=(draws, n_seeds))


def _boot_wer(errs, refs, s_idx, weights):
    """WER (%) of each bootstrap draw: mean over the drawn seeds of corpus WER on the drawn utterances."""
    import numpy as np

    e = errs @ weights.T  # (seeds, draws)
    r = refs @ weights.T
    per_seed = 100.0 * e / np.maximum(r, 1.0)
    return np.take_along_axis(per_seed.T, s_idx, axis=1).mean(axis=1)


def small_sample_factor(n_speakers: int) -> float:
    """How much the bootstrap spread is widened: the spread of a mean over n resampled speakers is too small by
    sqrt((n - 1) / n); with one speaker there is no spread over speakers to estimate (inf)."""
    return math.inf if n_speakers < 2 else math.sqrt(n_speakers / (n_speakers - 1))


def widened(samples, point: float, n_speakers: int):
    """The bootstrap samples spread about ``point`` by ``small_sample_factor``; None with one speaker."""
    c = small_sample_factor(n_speakers)
    return None if math.isinf(c) else point + c * (samples - point)


def bootstrap_p(diff) -> float:
    """Two-sided p-value of 'no difference' from bootstrap samples of a difference: twice the smaller tail
    beyond 0 (each tail counted with the draw itself, so never 0)."""
    import numpy as np

    n = len(diff)
    tail = min(int(np.sum(diff <= 0.0)), int(np.sum(diff >= 0.0)))
    return min(1.0, 2.0 * (tail + 1) / (n + 1))


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the family)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def common_utts(runs: Sequence[Dict]) -> Optional[List[str]]:
    """Utterance ids that every run scored (None if a run has no per-utterance errors: old results)."""
    if not runs or any("utt_errors" not in r for r in runs):
        return None
    ids = set(runs[0]["utt_errors"])
    for r in runs[1:]:
        ids &= set(r["utt_errors"])
    return sorted(ids)


def wer_interval(seed_runs: Sequence[Dict], draws: int = 1000) -> Optional[Tuple[float, float]]:
    """95 % interval of a system's mean WER: two-stage bootstrap over speakers and their utterances (and seeds),
    widened for the number of speakers; None with one speaker or without per-utterance errors."""
    import numpy as np

    utts = common_utts(seed_runs)
    if not utts or draws <= 0:
        return None
    groups, _ = speaker_groups(utts, seed_runs)
    errs, refs = _error_table(seed_runs, utts)
    boot = _boot_wer(errs, refs, seed_draws(len(seed_runs), draws, 0), speaker_draws(groups, len(utts), draws))
    point = float(np.mean([_corpus_wer(r, utts) for r in seed_runs]))
    spread = widened(boot, point, len(groups))
    if spread is None:
        return None
    lo, hi = np.percentile(spread, [2.5, 97.5])
    return float(lo), float(hi)


def difference_test(a: Sequence[Dict], b: Sequence[Dict], draws: int = 1000) -> Optional[Dict]:
    """WER of a - b on the utterances both scored: the point, its 95 % interval and p-value from a paired
    two-stage bootstrap (the same speakers and utterances for both), and the speakers it rests on."""
    import numpy as np

    utts = common_utts(list(a) + list(b))
    if not utts or draws <= 0:
        return None
    groups, _ = speaker_groups(utts, list(a) + list(b))
    ea, ra = _error_table(a, utts)
    eb, rb = _error_table(b, utts)
    weights = speaker_draws(groups, len(utts), draws, seed=1)
    diff = (_boot_wer(ea, ra, seed_draws(len(a), draws, 2), weights)
            - _boot_wer(eb, rb, seed_draws(len(b), draws, 3), weights))
    point = float(np.mean([_corpus_wer(r, utts) for r in a]) - np.mean([_corpus_wer(r, utts) for r in b]))
    spread = widened(diff, point, len(groups))
    if spread is None:
        return dict(diff=point, ci95=None, p=None, speakers=len(groups))
    lo, hi = np.percentile(spread, [2.5, 97.5])
    return dict(diff=point, ci95=[float(lo), float(hi)], p=bootstrap_p(spread), speakers=len(groups))


def _corpus_wer(run: Dict, utts: Sequence[str]) -> float:
    e = sum(run["utt_errors"][u][0] for u in utts)
    r = sum(run["utt_errors"][u][1] for u in utts)
    return 100.0 * e / max(r, 1)


def group_seeds(fixed: Dict[Tuple, Dict]) -> Dict[Tuple, List[Dict]]:
    """(system, set, method, exit) -> the runs of its seeds (experiments of one display name)."""
    out: Dict[Tuple, List[Dict]] = defaultdict(list)
    for (exp, ts, method, layer, _, _), r in sorted(fixed.items()):
        out[(exp, ts, method, layer)].append(r)
    return out


# ------------------------------------------------------------------------------------------- checkpoints
_TAG_CHECKPOINT = re.compile(r"^((?:epoch|iter)-\d+_avg-\d+(?:_use-averaged-model)?)(?:_|$)")


def checkpoint_of(run: Dict) -> str:
    """Which weights a run decoded, spelled as decode.py's tags begin: ``epoch-30_avg-10_use-averaged-model``
    (from the entry's epoch, iter, avg and use_averaged_model; from its tag for results written before them)."""
    if "avg" in run and ("epoch" in run or "iter" in run):
        it = run.get("iter") or 0
        name = f"iter-{it}_avg-{run['avg']}" if it > 0 else f"epoch-{run.get('epoch')}_avg-{run['avg']}"
        return name + ("_use-averaged-model" if run.get("use_averaged_model") else "")
    m = _TAG_CHECKPOINT.match(str(run.get("tag", "")))
    return m.group(1) if m else "unknown"


class CompareError(Exception):
    """Results that one report cannot hold as they are, with the flag that resolves it."""


def choose_average(runs: Sequence[Dict], epoch: int, avgs: Sequence[int], test_set: str = "dev",
                   method: str = "greedy_search", beam: Optional[int] = None) -> Tuple[int, Dict[int, float]]:
    """The ``--avg`` (of whole-utterance ``--use-averaged-model`` decodes at ``epoch``) whose last exit has the
    lowest WER on ``test_set``, and each one's WER; a tie goes to the first listed. run.sh chooses every model's
    average this way on dev before any other set is decoded. A beam search decoded at several beams needs ``beam``,
    so that one choice never mixes them."""
    decodes = list(latest_fixed([r for r in runs if r["test_set"] == test_set and not r.get("chunk_size")
                                 and _searched_by(r, method, beam)]).values())
    searches = sorted({_method(r) for r in decodes})
    if len(searches) > 1:
        raise CompareError(f"{test_set} was decoded with {' and '.join(searches)}: pick one with --beam-size")
    wer: Dict[int, float] = {}
    for a in avgs:
        name = f"epoch-{epoch}_avg-{a}_use-averaged-model"
        mine = {r["exit_layer"]: r["wer"] for r in decodes
                if checkpoint_of(r) == name and isinstance(r["exit_layer"], int)}
        if not mine:
            raise CompareError(f"no {method} decode of {test_set} at epoch {epoch} --avg {a} --use-averaged-model: "
                               f"run decode.py --epoch {epoch} --avg {a} --use-averaged-model --test-sets {test_set} first")
        wer[a] = mine[max(mine)]
    best = min(avgs, key=lambda a: (wer[a], list(avgs).index(a)))
    return best, wer


def _searched_by(run: Dict, method: str, beam: Optional[int]) -> bool:
    """Whether a run decoded with ``method`` (at ``beam``, for a search whose beam matters)."""
    return run["method"] == method and (beam is None or method not in BEAM_METHODS or run.get("beam") == beam)


def only_search(runs: Sequence[Dict], method: Optional[str], beam: Optional[int]) -> List[Dict]:
    """The runs of one search, so that a report shows only what dev chose (all runs when ``method`` is None)."""
    if method is None:
        if beam is not None:
            raise CompareError("--beam-size picks a beam of --method: give the method too")
        return list(runs)
    kept = [r for r in runs if _searched_by(r, method, beam)]
    if not kept:
        found = sorted({_method(r) for r in runs})
        raise CompareError(f"no decode of {method}" + (f" at beam {beam}" if beam is not None else "")
                           + f"; these directories hold {', '.join(found)}")
    return kept


def checkpoints_by_source(runs: Sequence[Dict]) -> Dict[str, Dict[str, Dict[str, int]]]:
    """directory -> checkpoint -> test set -> runs."""
    out: Dict[str, Dict[str, Dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for r in runs:
        out[r["source"]][checkpoint_of(r)][r.get("test_set", "?")] += 1
    return out


def _listing(found: Dict[str, Dict[str, int]]) -> str:
    return "; ".join(f"{ck} ({', '.join(f'{ts}: {n}' for ts, n in sorted(sets.items()))})"
                     for ck, sets in sorted(found.items()))


def select_checkpoints(runs: Sequence[Dict], sources: Sequence[str], choice: Optional[str]) -> List[Dict]:
    """The runs of one checkpoint per directory, so that a table never mixes weights under one name.

    ``choice``: None (each directory must hold results of one checkpoint), one checkpoint for every directory,
    a comma list with one per directory (empty: that directory's only one), or ``all`` (each checkpoint becomes
    a system of its own, ``<name> @ <checkpoint>``). Raises CompareError listing what is there otherwise.
    """
    found = checkpoints_by_source(runs)
    if choice == "all":
        return [dict(r, experiment=f"{r['experiment']} @ {checkpoint_of(r)}") if len(found[r["source"]]) > 1 else r
                for r in runs]
    wanted = [c.strip() for c in choice.split(",")] if choice else [""]
    if len(wanted) == 1:
        wanted = wanted * len(sources)
    if len(wanted) != len(sources):
        raise CompareError(f"--checkpoint has {len(wanted)} entries for {len(sources)} directories: give one for "
                           "all, or one per directory in order")
    keep: Dict[str, str] = {}
    for src, want in zip(sources, wanted):
        there = found.get(src, {})
        if not there:
            continue
        if want:
            if want not in there:
                raise CompareError(f"{src} has no results of checkpoint {want}; it has: {_listing(there)}")
            keep[src] = want
        elif len(there) > 1:
            first = sorted(there)[0]
            raise CompareError(
                f"{src} holds results of {len(there)} checkpoints (epoch/iter, --avg, --use-averaged-model): "
                f"{_listing(there)}. One table would mix them under one name: pick one with --checkpoint {first} "
                "(one for every directory, or a comma list in directory order), or --checkpoint all to show each "
                "as a system of its own")
        else:
            keep[src] = next(iter(there))
    return [r for r in runs if keep.get(r["source"]) == checkpoint_of(r)]


def load_runs(exp_dir: Path, name: str) -> List[Dict]:
    """Every run recorded under ``exp_dir``, tagged with the experiment's display name."""
    runs = []
    for path in sorted(exp_dir.glob("*/results-*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"compare.py: error: {path} is not valid JSON ({e}); re-run decode.py") from None
        for run in data.get("runs", {}).values():
            runs.append(dict(run, experiment=name, source=str(exp_dir)))
    return runs


def latest_fixed(runs: Sequence[Dict]) -> Dict[Tuple, Dict]:
    """(experiment, set, method, exit, source directory, checkpoint) -> newest fixed-exit run (a decode of the same
    weights, exit and method run again replaces the older)."""
    best: Dict[Tuple, Dict] = {}
    for r in runs:
        if r.get("kind") != "fixed":
            continue
        key = (r["experiment"], r["test_set"], _method(r), r["exit_layer"], r.get("source", r["experiment"]),
               checkpoint_of(r))
        if key not in best or r.get("written", 0) >= best[key].get("written", 0):
            best[key] = r
    return best


def fixed_at_cost(runs: Sequence[Dict], dyn: Dict) -> Optional[Dict]:
    """The fixed exit a dynamic run should beat: of the same experiment, set and decode (search and chunking),
    the cheapest whose MACs per second are at least what the dynamic run spent (the newest run of each exit)."""
    same = [r for k, r in latest_fixed(runs).items()
            if k[:3] == (dyn["experiment"], dyn["test_set"], _method(dyn)) and k[4] == dyn.get("source", dyn["experiment"])
            and k[5] == checkpoint_of(dyn) and r.get("macs_per_second") is not None]
    dearer = [r for r in same if r["macs_per_second"] >= (dyn.get("achieved_cost") or dyn.get("macs_per_second") or 0)]
    return min(dearer, key=lambda r: r["macs_per_second"]) if dearer else None


BEAM_METHODS = ("modified_beam_search", "ctc_prefix_beam_search")  # the searches whose beam changes the words


def _method(r: Dict) -> str:
    """How a run decoded: the search (and beam), and for a causal model its chunks, streamed or simulated."""
    m = r["method"]
    label = f"{m} (beam {r['beam']})" if m in BEAM_METHODS else m
    if r.get("chunk_size"):
        how = "streaming" if r.get("streaming") else "simulated"
        left = r.get("left_context_ms")
        label += f", {how} {r['chunk_ms']:g} ms chunks, " + ("all left" if left is None or left < 0 else f"{left / 1000:g} s left")
    return label


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summarize(runs: Sequence[Dict], draws: int = 1000) -> Dict[Tuple, Dict]:
    """(system, set, method, exit) -> mean WER over seeds, its 95 % interval, per-seed WERs and costs."""
    import numpy as np

    out: Dict[Tuple, Dict] = {}
    for key, seed_runs in group_seeds(latest_fixed(runs)).items():
        first = seed_runs[0]
        out[key] = dict(
            wer=float(np.mean([r["wer"] for r in seed_runs])),
            wer_per_seed=[r["wer"] for r in seed_runs],
            ci95=wer_interval(seed_runs, draws),
            seeds=len(seed_runs),
            checkpoint=", ".join(sorted({checkpoint_of(r) for r in seed_runs})),
            speakers=_speaker_count(seed_runs),
            runs=seed_runs,
            macs_per_second=first.get("macs_per_second"),
            rtf_encoder=float(np.mean([r.get("rtf_encoder", math.nan) for r in seed_runs])),
            rtf_decode=float(np.mean([r.get("rtf_decode", math.nan) for r in seed_runs])),
            params=first.get("params", 0),
        )
    return out


def _speaker_count(runs: Sequence[Dict]) -> Optional[int]:
    """Speakers among the utterances every run scored (None when a speaker is unknown or errors were not kept)."""
    utts = common_utts(runs)
    if not utts:
        return None
    groups, known = speaker_groups(utts, runs)
    return len(groups) if known else None


ALPHA = 0.05
FAMILY = ("one family per pair of systems, test set and decoding method: the differences at every exit both "
          "have, Holm-corrected together")


def differences(summary: Dict[Tuple, Dict], draws: int = 1000) -> List[Dict]:
    """Every pair of systems at every (set, method, exit) they share: the WER difference, its 95 % interval, its
    p-value and the p-value Holm-corrected over the pair's exits (``FAMILY``); significant by the corrected one."""
    by_point: Dict[Tuple, List[str]] = defaultdict(list)
    for (exp, ts, method, layer) in summary:
        by_point[(ts, method, layer)].append(exp)
    families: Dict[Tuple, List[Dict]] = defaultdict(list)
    for (ts, method, layer), exps in sorted(by_point.items()):
        for i, a in enumerate(exps):
            for b in exps[i + 1:]:
                t = difference_test(summary[(a, ts, method, layer)]["runs"], summary[(b, ts, method, layer)]["runs"], draws)
                if t is None:
                    continue
                families[(ts, method, a, b)].append(dict(test_set=ts, method=method, exit_layer=layer, a=a, b=b, **t))
    out = []
    for rows in families.values():
        for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
            row.update(p_holm=adjusted, family_size=sum(r["p"] is not None for r in rows),
                       significant=adjusted is not None and adjusted < ALPHA)
            out.append(row)
    return sorted(out, key=lambda d: (d["test_set"], d["method"], d["exit_layer"], d["a"], d["b"]))


def streaming_ratios(summary: Dict[Tuple, Dict], draws: int = 1000) -> List[Dict]:
    """What streaming costs a causal model: at each exit, the WER of every chunked run (streamed or simulated)
    over the same system's full-context WER with the same search, with a 95 % interval from a paired two-stage
    bootstrap over the speakers and utterances both decoded."""
    import numpy as np

    out = []
    for (exp, ts, method, layer), r in sorted(summary.items()):
        run = r["runs"][0]
        if not run.get("chunk_size"):
            continue
        base_method = method.split(", ")[0]  # the search without the chunking
        base = summary.get((exp, ts, base_method, layer))
        if base is None:
            continue
        a, b = r["runs"], base["runs"]
        utts = common_utts(list(a) + list(b))
        ci = None
        if utts and draws > 0:
            ea, ra = _error_table(a, utts)
            eb, rb = _error_table(b, utts)
            groups, _ = speaker_groups(utts, list(a) + list(b))
            weights = speaker_draws(groups, len(utts), draws, seed=4)
            ratio = (_boot_wer(ea, ra, seed_draws(len(a), draws, 5), weights)
                     / np.maximum(_boot_wer(eb, rb, seed_draws(len(b), draws, 6), weights), 1e-9))
            point = r["wer"] / max(base["wer"], 1e-9)
            spread = widened(ratio, point, len(groups))
            if spread is not None:
                ci = [float(v) for v in np.percentile(spread, [2.5, 97.5])]
        out.append(dict(experiment=exp, test_set=ts, method=method, exit_layer=layer, wer=r["wer"],
                        full_context_wer=base["wer"], ratio=r["wer"] / max(base["wer"], 1e-9), ci95=ci))
    return out


def budget_holm(budgets: Sequence[Dict], tests: Sequence[Optional[Dict]]) -> List[Optional[float]]:
    """Holm-corrected p of each budget run against its fixed exit, one family per experiment and decode (search
    and chunking): the criteria tried on one model form a family; another model's rows are another question."""
    out: List[Optional[float]] = [None] * len(budgets)
    families: Dict[Tuple[str, str], List[int]] = defaultdict(list)
    for i, r in enumerate(budgets):
        families[(r["experiment"], _method(r))].append(i)
    for rows in families.values():
        for i, p in zip(rows, holm([tests[i]["p"] if tests[i] else None for i in rows])):
            out[i] = p
    return out


def _ci(ci: Optional[Sequence[float]]) -> str:
    return "-" if not ci else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def set_facts(runs: Sequence[Dict], conditions: Optional[Dict[str, Dict]] = None) -> Dict[str, Dict]:
    """Test set -> how many utterances and speakers its fixed-exit runs scored, and its condition label (matched
    or unmatched, from prepare.sh's ``<dataset>_conditions.json``) where one is known."""
    utts: Dict[str, set] = defaultdict(set)
    for r in runs:
        if r.get("kind") == "fixed" and "utt_errors" in r:
            utts[r["test_set"]] |= set(r["utt_errors"])
    out: Dict[str, Dict] = {}
    for ts in sorted({r["test_set"] for r in runs if "test_set" in r}):
        ids = sorted(utts.get(ts, ()))
        groups, known = speaker_groups(ids, [r for r in runs if r.get("test_set") == ts]) if ids else ([], False)
        out[ts] = dict(utterances=len(ids) or None, speakers=len(groups) if known and ids else None,
                       condition=(conditions or {}).get(ts))
    return out


def _set_heading(ts: str, facts: Dict) -> List[str]:
    head = f"## {ts}"
    c = facts.get("condition")
    if c:
        head += f" ({'matched' if c.get('matched') else 'unmatched'}: {c.get('what', c.get('condition', ''))})"
    if facts.get("utterances"):
        spk = (f"{facts['speakers']} speaker{'s' if facts['speakers'] != 1 else ''}" if facts.get("speakers")
               else "speakers unknown: intervals over utterances")
        return [head, "", f"{facts['utterances']} utterances, {spk}.", ""]
    return [head, ""]


def _p(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def markdown(runs: Sequence[Dict], summary: Dict[Tuple, Dict], diffs: Sequence[Dict],
             ratios: Sequence[Dict] = (), facts: Optional[Dict[str, Dict]] = None) -> List[str]:
    facts = facts if facts is not None else set_facts(runs)
    lines = ["# Results", "",
             "WER is the mean over seeds. Its 95 % interval is a two-stage bootstrap: the set's speakers drawn with "
             "replacement, then each drawn speaker's utterances (and, with several seeds, the seeds), the spread "
             "widened by sqrt(n/(n-1)) for n speakers; a set of one speaker has no interval over speakers ('-').",
             f"Differences between two systems: a paired bootstrap of the same kind; their p-values are "
             f"Holm-corrected, {FAMILY}.",
             "Test sets are labelled matched (made as training's variants are) or unmatched (a condition no "
             "training run uses) where compare.py --conditions names prepare.sh's labels.", ""]
    sets = sorted({k[1] for k in summary} | {r["test_set"] for r in runs if "test_set" in r})
    for s in sets:
        lines += _set_heading(s, facts.get(s, {}))
        lines += ["| experiment | method | checkpoint | exit layer | WER % | 95 % interval | seeds | RTF encoder | "
                  "RTF decode | encoder MMACs/s | params (M) |",
                  "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for (exp, ts, method, layer), r in sorted(summary.items()):
            if ts != s:
                continue
            lines.append(f"| {exp} | {method} | {r['checkpoint']} | {layer} | {r['wer']:.2f} | {_ci(r['ci95'])} | "
                         f"{r['seeds']} | {_num(r['rtf_encoder'], '.4f')} | {_num(r['rtf_decode'], '.4f')} | "
                         f"{_num(_mmacs(r['macs_per_second']), '.1f')} | {r['params'] / 1e6:.2f} |")
        ds = [d for d in diffs if d["test_set"] == s]
        if ds:
            lines += ["", "Differences at equal exit layer (A - B, paired bootstrap; p Holm-corrected over the pair's "
                      f"exits; *inside the noise* when the corrected p is {ALPHA:g} or more):", "",
                      "| method | exit layer | A | B | WER A - B | 95 % interval | p | p (Holm, family of) | verdict |",
                      "| --- | ---: | --- | --- | ---: | --- | ---: | --- | --- |"]
            for d in ds:
                if d["p"] is None:
                    verdict = "untested (one speaker)"
                else:
                    verdict = ("A better" if d["diff"] < 0 else "B better") if d["significant"] else "inside the noise"
                lines.append(f"| {d['method']} | {d['exit_layer']} | {d['a']} | {d['b']} | {d['diff']:+.2f} | "
                             f"{_ci(d['ci95'])} | {_p(d['p'])} | {_p(d['p_holm'])} ({d['family_size']}) | {verdict} |")
        rs = [r for r in ratios if r["test_set"] == s]
        if rs:
            lines += ["", "What streaming costs (chunked WER over the same model's full-context WER, paired bootstrap):", "",
                      "| experiment | method | exit layer | WER % | full context WER % | ratio | 95 % interval |",
                      "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
            for r in rs:
                ci = "-" if not r["ci95"] else f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
                lines.append(f"| {r['experiment']} | {r['method']} | {r['exit_layer']} | {r['wer']:.2f} | "
                             f"{r['full_context_wer']:.2f} | {r['ratio']:.2f} | {ci} |")
        dyn = [r for r in runs if r.get("kind") == "dynamic" and r["test_set"] == s]
        if dyn:
            lines += ["", "Dynamic exits (one exit per utterance, or per chunk of a stream; MMACs/s count the encoder up "
                      "to each exit and the criterion at every exit scored):", "",
                      "| experiment | method | per | strategy | threshold | WER % | mean exit layer | mean MMACs/s |",
                      "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
            for r in sorted(dyn, key=lambda r: (r["experiment"], r["strategy"], r["threshold"])):
                lines.append(f"| {r['experiment']} | {_method(r)} | {r.get('per', 'utterance')} | {r['strategy']} | "
                             f"{r['threshold']:.4g} | {r['wer']:.2f} | {r['mean_exit_layer']:.2f} | "
                             f"{_num(_mmacs(r['macs_per_second']), '.1f')} |")
        budgets = [r for r in runs if r.get("kind") == "budget" and r["test_set"] == s]
        if budgets:
            lines += ["", f"Compute budgets (threshold chosen on the budget set, then applied to {s}; costs count the "
                      "encoder up to each exit and the criterion at every exit scored; against the cheapest fixed exit "
                      "of the same decode that costs at least as much, paired bootstrap over speakers, p Holm-corrected "
                      "over the rows of one experiment and decode):", "",
                      "| experiment | method | strategy | scorer | budget | threshold | WER % on budget set | WER % | "
                      "cost reached | mean exit layer | fixed exit (WER %, MMACs/s) | WER - fixed | 95 % interval | "
                      "Holm p |",
                      "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
            budgets = sorted(budgets, key=lambda r: (r["experiment"], r["strategy"], r.get("scorer", "ctc"),
                                                     r["budget_kind"], r["budget"]))
            against = [fixed_at_cost(runs, r) for r in budgets]
            tests = [difference_test([r], [f]) if f is not None else None for r, f in zip(budgets, against)]
            corrected = budget_holm(budgets, tests)
            for r, f, t, p in zip(budgets, against, tests, corrected):
                vs = "-" if f is None else f"{f['exit_layer']} ({f['wer']:.2f}, {_num(_mmacs(f['macs_per_second']), '.1f')})"
                lines.append(f"| {r['experiment']} | {_method(r)} | {r['strategy']} | {r.get('scorer', 'ctc')} | "
                             f"{r['budget_kind']} {r['budget']:.4g} | "
                             f"{r['threshold']:.4g} | {r['dev_wer']:.2f} ({r['budget_set']}) | {r['wer']:.2f} | "
                             f"{r['achieved_cost']:.4g} | {r['mean_exit_layer']:.2f} | {vs} | "
                             f"{'-' if t is None else format(t['diff'], '+.2f')} | "
                             f"{'-' if t is None else _ci(t['ci95'])} | "
                             f"{_p(p)} |")
        sweeps = [r for r in runs if r.get("kind") == "dynamic-sweep" and r["test_set"] == s]
        for r in sweeps:
            lines += ["", f"Dynamic-exit sweep, {r['experiment']}, {_method(r)}, criteria read from the "
                      f"{r.get('scorer', 'ctc')} outputs (WER % at mean exit layer / MMACs/s):", ""]
            for strategy, rows in sorted(r["curves"].items()):
                pts = ", ".join(f"{p['wer']:.1f} @ {p['mean_exit_layer']:.1f} / {_mmacs(p['macs_per_second']):.1f}" for p in rows)
                lines.append(f"- {strategy}: {pts}")
        lines += ["", f"![WER against exit layer and compute](wer-{s}.png)", ""]
    return lines + condition_table(summary, facts)


def condition_ratios(summary: Dict[Tuple, Dict], facts: Dict[str, Dict]) -> List[Dict]:
    """Per system, condition set, method and exit: its WER over the same system's WER on the clean set it was made
    from (the label's ``source``), with whether training could have seen the condition."""
    out = []
    for (exp, ts, method, layer), r in sorted(summary.items()):
        c = (facts.get(ts) or {}).get("condition") or {}
        clean = summary.get((exp, c.get("source"), method, layer))
        if clean and clean["wer"] > 0:
            out.append(dict(experiment=exp, test_set=ts, source=c["source"], matched=bool(c.get("matched")),
                            method=method, exit_layer=layer, wer=r["wer"], clean_wer=clean["wer"],
                            ratio=r["wer"] / clean["wer"]))
    return out


def condition_table(summary: Dict[Tuple, Dict], facts: Dict[str, Dict]) -> List[str]:
    """Markdown: every condition's WER as a multiple of the clean WER, per system and exit."""
    rows = condition_ratios(summary, facts)
    if not rows:
        return []
    sets = sorted({r["test_set"] for r in rows}, key=lambda t: (not next(x["matched"] for x in rows
                                                                         if x["test_set"] == t), t))
    label = {t: f"{t} ({'m' if next(x['matched'] for x in rows if x['test_set'] == t) else 'u'})" for t in sets}
    lines = ["", "## Conditions against clean", "",
             "WER on each condition set over the same model's WER on the set it was made from, per exit (m: matched, "
             "a condition training can use; u: unmatched, one no training run uses).", "",
             "| experiment | method | exit layer | clean WER % | " + " | ".join(label[t] for t in sets) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in sets) + " |"]
    for key in sorted({(r["experiment"], r["method"], r["exit_layer"]) for r in rows}):
        got = {r["test_set"]: r for r in rows if (r["experiment"], r["method"], r["exit_layer"]) == key}
        clean = next(iter(got.values()))["clean_wer"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {clean:.2f} | " + " | ".join(
            f"{got[t]['ratio']:.2f}×" if t in got else "-" for t in sets) + " |")
    return lines



def results_json(summary: Dict[Tuple, Dict], diffs: Sequence[Dict], wall_seconds: Optional[float],
                 facts: Optional[Dict[str, Dict]] = None) -> Dict:
    """The machine-readable results: models -> test set -> exit layer -> WER, interval, compute; each test set's
    utterances, speakers and condition label; the differences with their Holm family."""
    models: Dict[str, Dict] = defaultdict(lambda: defaultdict(dict))
    for (exp, ts, method, layer), r in sorted(summary.items()):
        key = ts if len({k[2] for k in summary if k[0] == exp and k[1] == ts}) == 1 else f"{ts}/{method}"
        models[exp][key][str(layer)] = dict(wer=r["wer"], ci95=list(r["ci95"]) if r["ci95"] else None,
                                            macs_per_second=r["macs_per_second"], seeds=r["seeds"],
                                            wer_per_seed=r["wer_per_seed"], method=method, checkpoint=r["checkpoint"],
                                            speakers=r["speakers"])
    return {"wall_seconds": wall_seconds, "models": {m: dict(v) for m, v in models.items()},
            "test_sets": facts or {}, "interval": "two-stage bootstrap over speakers, then their utterances (and seeds), "
            "widened by sqrt(n/(n-1)) for n speakers", "holm_family": FAMILY, "alpha": ALPHA,
            "differences": list(diffs), "condition_ratios": condition_ratios(summary, facts or {})}


def _mmacs(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1e6


def plot(runs: Sequence[Dict], summary: Dict[Tuple, Dict], test_set: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[Tuple[str, str], List[Dict]] = defaultdict(list)
    for (exp, ts, method, layer), r in summary.items():
        if ts == test_set:
            series[(exp, method)].append(dict(r, exit_layer=layer))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (exp, method), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["exit_layer"])
        label = f"{exp} / {method}"
        wer = [r["wer"] for r in rs]
        err = None
        if all(r["ci95"] for r in rs):  # asymmetric error bars from the bootstrap interval
            err = [[w - r["ci95"][0] for w, r in zip(wer, rs)], [r["ci95"][1] - w for w, r in zip(wer, rs)]]
        ax1.errorbar([r["exit_layer"] for r in rs], wer, yerr=err, marker="o", capsize=3, label=label)
        if all(r.get("macs_per_second") for r in rs):
            ax2.errorbar([r["macs_per_second"] / 1e6 for r in rs], wer, yerr=err, marker="o", capsize=3, label=label)
    for r in runs:
        if r.get("kind") == "dynamic-sweep" and r["test_set"] == test_set:
            for strategy, rows in sorted(r["curves"].items()):
                rows = sorted(rows, key=lambda p: p["macs_per_second"])
                ax2.plot([p["macs_per_second"] / 1e6 for p in rows], [p["wer"] for p in rows], linestyle="--",
                         marker=".", label=f"{r['experiment']} / {_method(r)} / dynamic {strategy} ({r.get('scorer', 'ctc')})")
        if r.get("kind") == "dynamic" and r["test_set"] == test_set:
            ax2.scatter([r["macs_per_second"] / 1e6], [r["wer"]], marker="x", color="black")
        if r.get("kind") == "budget" and r["test_set"] == test_set:
            ax2.scatter([r["macs_per_second"] / 1e6], [r["wer"]], marker="*", s=120, color="red", zorder=5,
                        label=f"{r['experiment']} / budget {r['budget_kind']} {r['budget']:.3g} ({r['strategy']})")
            if r["budget_kind"] == "macs":
                ax2.axvline(r["budget"] / 1e6, color="red", linestyle=":", linewidth=1)
    ax1.set_xlabel("exit layer")
    ax1.set_ylabel("WER (%)")
    ax1.set_title(f"{test_set}: WER by exit")
    ax2.set_xlabel("encoder MMACs per second of audio")
    ax2.set_ylabel("WER (%)")
    ax2.set_title(f"{test_set}: WER against compute")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    handles, labels = ax2.get_legend_handles_labels()
    if handles:
        ax2.legend(fontsize=7)
    elif ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tsv(summary: Dict[Tuple, Dict]) -> List[str]:
    out = ["experiment\ttest_set\tmethod\texit_layer\twer\tci95_low\tci95_high\tseeds\trtf_encoder\trtf_decode\t"
           "macs_per_second\tparams\tcheckpoint\tspeakers"]
    for (exp, ts, method, layer), r in sorted(summary.items()):
        lo, hi = r["ci95"] or (None, None)
        out.append(f"{exp}\t{ts}\t{method}\t{layer}\t{r['wer']:.4f}\t{lo}\t{hi}\t{r['seeds']}\t{r['rtf_encoder']}\t"
                   f"{r['rtf_decode']}\t{r['macs_per_second']}\t{r['params']}\t{r['checkpoint']}\t{r['speakers']}")
    return out


def read_conditions(path: Optional[Path]) -> Dict[str, Dict]:
    """prepare.sh's test-set labels (``data/fbank/<dataset>_conditions.json``: set -> matched, what)."""
    if path is None:
        return {}
    if not path.is_file():
        raise CompareError(f"--conditions {path}: no such file; ./prepare.sh --variants true / --conditions true "
                           "writes it as data/fbank/<dataset>_conditions.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompareError(f"--conditions {path} is not valid JSON ({e}); rerun ./prepare.sh stage 7") from None
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.choose_avg is not None:
        return choose_main(args)
    names = args.names.split(",") if args.names else [d.name for d in args.exp_dirs]
    if len(names) != len(args.exp_dirs):
        print(f"compare.py: error: {len(names)} names for {len(args.exp_dirs)} directories", file=sys.stderr)
        return 2
    runs: List[Dict] = []
    for d, n in zip(args.exp_dirs, names):
        if not d.is_dir():
            print(f"compare.py: error: {d} is not a directory", file=sys.stderr)
            return 2
        found = load_runs(d, n)
        if not found:
            print(f"compare.py: warning: no results-*.json under {d}/*/ (run decode.py first)", file=sys.stderr)
        runs += found
    if not runs:
        print("compare.py: error: no results to compare", file=sys.stderr)
        return 2
    try:
        runs = select_checkpoints(runs, [str(d) for d in args.exp_dirs], args.checkpoint)
        runs = only_search(runs, args.method, args.beam_size)
        conditions = read_conditions(args.conditions)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, args.bootstrap)
    diffs = differences(summary, args.bootstrap)
    ratios = streaming_ratios(summary, args.bootstrap)
    facts = set_facts(runs, conditions)
    (args.out / "report.md").write_text("\n".join(markdown(runs, summary, diffs, ratios, facts)) + "\n")
    (args.out / "results.tsv").write_text("\n".join(tsv(summary)) + "\n")
    (args.out / "results.json").write_text(json.dumps(dict(results_json(summary, diffs, args.wall_seconds, facts),
                                                           streaming_ratios=ratios), indent=1) + "\n")
    for s in sorted({r["test_set"] for r in runs}):
        plot(runs, summary, s, args.out / f"wer-{s}.png")
    print(f"wrote {args.out / 'report.md'}")
    return 0


def choose_main(args: argparse.Namespace) -> int:
    """--choose-avg: the chosen average on the first line, every candidate's WER on the second."""
    try:
        avgs = [int(a) for a in args.choose_avg.replace(",", " ").split()]
    except ValueError:
        print(f"compare.py: error: --choose-avg takes integers, not '{args.choose_avg}'", file=sys.stderr)
        return 2
    if len(args.exp_dirs) != 1 or args.epoch is None or not avgs:
        print("compare.py: error: --choose-avg needs one experiment directory, --epoch and at least one value",
              file=sys.stderr)
        return 2
    d = args.exp_dirs[0]
    try:
        best, wer = choose_average(load_runs(d, d.name), args.epoch, avgs, args.choose_on,
                                   args.method or "greedy_search", args.beam_size)
    except CompareError as e:
        print(f"compare.py: error: {d}: {e}", file=sys.stderr)
        return 2
    print(best)
    print(f"{args.choose_on} WER at the last exit by --avg: " + ", ".join(f"{a}: {wer[a]:.2f}" for a in avgs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
