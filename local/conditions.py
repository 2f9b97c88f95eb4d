#!/usr/bin/env python3
"""Stage 7: test sets under conditions that no training run uses (unmatched), with fbank.

Stage 6's ``<split>-narrowband`` and ``<split>-trimmed`` are made by the very function that makes the training
variants (``train.py --train-variants``), so a model trained with them is tested on what it trained on: those
are *matched*. The sets here are *unmatched*: nothing in training makes audio like them.

- ``telephone``: a telephone line: 300-3400 Hz band-pass (Butterworth, scipy), 8 kHz (soxr), G.711 mu-law
  (libsndfile's codec, through soundfile), then back to 16 kHz, as pretrained.py resamples a call recording.
- ``babble10``, ``babble20``: six-talker babble at 10 / 20 dB SNR (over the whole utterance, as
  audiomentations and lhotse define it). The talkers are time-reversed utterances of *other speakers of the
  same test split*: speech that no training run hears, with its spectrum and rhythm but no words to transcribe.
- ``reverb``: a simulated room (pyroomacoustics image source model): a shoebox of 4-8 x 3-6 x 2.5-3.5 m,
  RT60 0.3-0.7 s, the talker 1-2.5 m from the microphone (AN4 was recorded close-talking). Aligned on the direct
  path, cut to the original length and brought back to the original RMS level.
- ``speed0.9``, ``speed1.1``: played 0.9x / 1.1x as fast (soxr resampling, so the pitch moves too). Unmatched
  unless the model was trained on ``./prepare.sh --speed-perturb true`` data, which run.sh does not use.
- ``quiet``: scaled so that its loudest sample is -30 dBFS. AN4 test's median *RMS* is already -31 dBFS, so
  an RMS of -30 dBFS would change little; its median peak is -14 dBFS, 16 dB above this.

Every condition is deterministic: the random draws of an utterance are seeded from the condition and the cut id.
Cut ids stay those of ``<split>`` (compare.py pairs utterances across sets). The audio is written as 16-bit FLAC
under ``<manifest-dir>/conditions/<set>/`` (listen to it), the cuts to ``<manifest-dir>/<dataset>_cuts_<set>``,
and with features to ``<fbank-dir>/<dataset>_cuts_<set>.jsonl.gz``. Each set's label (matched/unmatched and what
it is) goes to ``<fbank-dir>/<dataset>_conditions.json``, which compare.py --conditions reads.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("prepare")
SR = 16000
PHONE_SR = 8000
PHONE_BAND = (300.0, 3400.0)
BABBLE_TALKERS = 6
BABBLE_POOL_PER_SPEAKER = 4  # utterances per speaker that babble may draw from (bounds memory on big sets)
QUIET_PEAK_DBFS = -30.0
MAX_PEAK = 0.99  # a mixture that would clip is scaled down to this peak (SNR unchanged)


# ------------------------------------------------------------------------------------------ the conditions
def seed_for(condition: str, cut_id: str) -> int:
    """A seed that depends on nothing but the condition and the utterance: the same audio on every machine."""
    return int.from_bytes(hashlib.sha256(f"{condition}/{cut_id}".encode()).digest()[:8], "little")


def band_limit(x: np.ndarray, sr: int, low: float = PHONE_BAND[0], high: float = PHONE_BAND[1],
               order: int = 6) -> np.ndarray:
    """Butterworth band-pass, run forwards and backwards so that the words stay where the transcript says."""
    from scipy.signal import butter, sosfiltfilt

    sos = butter(order, [low, high], btype="bandpass", fs=sr, output="sos")
    return sosfiltfilt(sos, x)


def resample(x: np.ndarray, from_sr: float, to_sr: float) -> np.ndarray:
    import soxr

    return soxr.resample(np.ascontiguousarray(x, dtype=np.float64), from_sr, to_sr, quality="HQ")


def mulaw_round_trip(x: np.ndarray, sr: int = PHONE_SR) -> np.ndarray:
    """Encode to G.711 mu-law and decode again (libsndfile's codec): 8 bits a sample, as a phone line carries."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), sr, format="WAV", subtype="ULAW")
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float64")
    return y


def telephone(x: np.ndarray, sr: int = SR) -> np.ndarray:
    """Band-limit, take to 8 kHz, mu-law round trip, and back to ``sr``: the length is kept to the sample."""
    narrow = mulaw_round_trip(resample(band_limit(x, sr), sr, PHONE_SR), PHONE_SR)
    return _fit_length(resample(narrow, PHONE_SR, sr), x.size)


def speed(x: np.ndarray, factor: float, sr: int = SR) -> np.ndarray:
    """Played ``factor`` times as fast: read as if sampled at ``sr * factor``, resampled to ``sr``."""
    return resample(x, sr * factor, sr)


def set_peak(x: np.ndarray, dbfs: float) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return x if peak == 0.0 else x * (10.0 ** (dbfs / 20.0) / peak)


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def mix_at_snr(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``x`` plus ``noise`` scaled so that power(x) / power(scaled noise) is ``snr_db``."""
    if power(noise) == 0.0:
        raise ValueError("the noise is silent: it cannot be mixed at an SNR")
    gain = np.sqrt(power(x) / (power(noise) * 10.0 ** (snr_db / 10.0)))
    return x + gain * noise[: x.size]


def babble(n: int, talkers: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Reversed ``talkers`` (each at unit power, looped from a random point to ``n`` samples), summed."""
    out = np.zeros(n)
    for t in talkers:
        if t.size == 0 or power(t) == 0.0:
            continue
        rev = t[::-1] / np.sqrt(power(t))
        start = int(rng.integers(0, rev.size))
        out += np.resize(np.roll(rev, -start), n)
    return out


def pick_talkers(speaker: str, pool: Mapping[str, Sequence[np.ndarray]], rng: np.random.Generator,
                 k: int = BABBLE_TALKERS) -> List[np.ndarray]:
    """``k`` utterances of speakers other than ``speaker``: one per speaker while there are enough speakers."""
    others = sorted(s for s in pool if s != speaker and len(pool[s]) > 0)
    if not others:
        raise ValueError(f"babble needs speakers other than {speaker!r} in the split; this split has none")
    chosen = []
    order = list(rng.permutation(len(others)))
    while len(chosen) < k:
        for i in order[: k - len(chosen)]:
            utts = pool[others[i]]
            chosen.append(utts[int(rng.integers(0, len(utts)))])
    return chosen


@dataclass(frozen=True)
class Room:
    dims: Tuple[float, float, float]
    rt60: float
    source: Tuple[float, float, float]
    mic: Tuple[float, float, float]

    @property
    def distance(self) -> float:
        return float(np.linalg.norm(np.subtract(self.source, self.mic)))


def draw_room(rng: np.random.Generator) -> Room:
    """A room, a talker and a microphone within the ranges the module docstring names."""
    dims = (rng.uniform(4.0, 8.0), rng.uniform(3.0, 6.0), rng.uniform(2.5, 3.5))
    rt60 = rng.uniform(0.3, 0.7)
    for _ in range(1000):
        mic = (rng.uniform(0.5, dims[0] - 0.5), rng.uniform(0.5, dims[1] - 0.5), rng.uniform(0.7, 1.5))
        dist, az = rng.uniform(1.0, 2.5), rng.uniform(0.0, 2.0 * np.pi)
        src = (mic[0] + dist * np.cos(az), mic[1] + dist * np.sin(az), rng.uniform(1.2, 1.8))
        if 0.3 < src[0] < dims[0] - 0.3 and 0.3 < src[1] < dims[1] - 0.3:
            return Room(tuple(float(d) for d in dims), float(rt60), tuple(float(s) for s in src),
                        tuple(float(m) for m in mic))
    raise RuntimeError("draw_room: no talker position fits the room")  # pragma: no cover - rooms are >= 4 x 3 m


def room_impulse_response(room: Room, sr: int = SR) -> np.ndarray:
    """The room's impulse response from talker to microphone (pyroomacoustics' image sources, Sabine's walls)."""
    import pyroomacoustics as pra

    absorption, max_order = pra.inverse_sabine(room.rt60, list(room.dims))
    shoebox = pra.ShoeBox(list(room.dims), fs=sr, materials=pra.Material(absorption), max_order=max_order)
    shoebox.add_source(list(room.source))
    shoebox.add_microphone(list(room.mic))
    shoebox.compute_rir()
    return np.asarray(shoebox.rir[0][0], dtype=np.float64)


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``x`` through ``rir``, shifted so the direct path arrives at sample 0, cut to ``x``'s length, at ``x``'s
    RMS level (the room changes the sound, not the loudness)."""
    from scipy.signal import fftconvolve

    direct = int(np.argmax(np.abs(rir)))
    y = fftconvolve(x, rir[direct:])[: x.size]
    return y * np.sqrt(power(x) / power(y)) if power(y) > 0 else y


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.size >= n else np.pad(x, (0, n - x.size))


def _guard_clip(x: np.ndarray) -> Tuple[np.ndarray, bool]:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return (x * (MAX_PEAK / peak), True) if peak > MAX_PEAK else (x, False)


# ------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Condition:
    what: str  # one line for the report
    # (audio, speaker, babble pool, rng) -> (audio, facts recorded in the cut's custom field)
    make: Callable[[np.ndarray, str, Mapping[str, Sequence[np.ndarray]], np.random.Generator], Tuple[np.ndarray, Dict]]


def _telephone(x, speaker, pool, rng):
    return telephone(x), {}


def _babble(snr_db: float):
    def make(x, speaker, pool, rng):
        return mix_at_snr(x, babble(x.size, pick_talkers(speaker, pool, rng), rng), snr_db), {"snr_db": snr_db}
    return make


def _reverb(x, speaker, pool, rng):
    room = draw_room(rng)
    return reverberate(x, room_impulse_response(room)), {"rt60": round(room.rt60, 3),
                                                         "distance_m": round(room.distance, 2),
                                                         "room_m": [round(d, 2) for d in room.dims]}


def _speed(factor: float):
    return lambda x, speaker, pool, rng: (speed(x, factor), {"speed": factor})


def _quiet(x, speaker, pool, rng):
    return set_peak(x, QUIET_PEAK_DBFS), {"peak_dbfs": QUIET_PEAK_DBFS}


CONDITIONS: Dict[str, Condition] = {
    "telephone": Condition("telephone line: 300-3400 Hz, 8 kHz, G.711 mu-law", _telephone),
    "babble10": Condition("six-talker babble of other test speakers (reversed) at 10 dB SNR", _babble(10.0)),
    "babble20": Condition("six-talker babble of other test speakers (reversed) at 20 dB SNR", _babble(20.0)),
    "reverb": Condition("simulated room: RT60 0.3-0.7 s, talker 1-2.5 m away", _reverb),
    "speed0.9": Condition("played 0.9x as fast (pitch moves too)", _speed(0.9)),
    "speed1.1": Condition("played 1.1x as fast (pitch moves too)", _speed(1.1)),
    "quiet": Condition("quiet input: peak -30 dBFS", _quiet),
}
# stage 6's sets (local/make_variants.py): the training variants' own function makes them
MATCHED = {"narrowband": "8 kHz and back (as train.py --train-variants narrowband)",
           "trimmed": "leading and trailing silence cut off (as train.py --train-variants trimmed)"}


def apply(name: str, x: np.ndarray, cut_id: str, speaker: str,
          pool: Mapping[str, Sequence[np.ndarray]]) -> Tuple[np.ndarray, Dict]:
    """Condition ``name`` applied to one utterance, seeded by its id; the facts to keep with the cut."""
    y, facts = CONDITIONS[name].make(np.asarray(x, dtype=np.float64), speaker, pool,
                                     np.random.default_rng(seed_for(name, cut_id)))
    y, scaled = _guard_clip(y)
    if scaled:
        facts["scaled_to_peak"] = MAX_PEAK
    return y, facts


# ------------------------------------------------------------------------------------------ labels
def labels_path(fbank_dir: Path, dataset: str) -> Path:
    return Path(fbank_dir) / f"{dataset}_conditions.json"


def update_labels(fbank_dir: Path, dataset: str, labels: Mapping[str, Dict]) -> Path:
    """Merge ``{set: {matched, condition, source, what}}`` into the dataset's labels file (stages 6 and 7 both
    write it), atomically."""
    path = labels_path(fbank_dir, dataset)
    table: Dict[str, Dict] = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON: written afresh", path)
    table.update(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def label(split: str, condition: str, matched: bool) -> Dict:
    what = MATCHED[condition] if matched else CONDITIONS[condition].what
    return {"matched": matched, "condition": condition, "source": split, "what": what}


# ------------------------------------------------------------------------------------------ the stage
def _speaker(cut) -> str:
    sup = cut.supervisions[0] if cut.supervisions else None
    return (sup.speaker if sup is not None and sup.speaker else None) or cut.id


def speech_only(x: np.ndarray, sr: int = SR) -> np.ndarray:
    """``x`` without its leading and trailing silence (stage 6's trim), so that looped talkers leave no gaps."""
    from make_variants import speech_bounds

    bounds = speech_bounds(x, sr)
    return x if bounds is None else x[int(bounds[0] * sr): int(bounds[1] * sr)]


def babble_pool(cuts) -> Dict[str, List[np.ndarray]]:
    """Speaker -> the speech of up to BABBLE_POOL_PER_SPEAKER of its utterances (the first by id)."""
    by_speaker: Dict[str, List] = {}
    for c in sorted(cuts, key=lambda c: c.id):
        group = by_speaker.setdefault(_speaker(c), [])
        if len(group) < BABBLE_POOL_PER_SPEAKER:
            group.append(c)
    return {s: [speech_only(c.load_audio()[0]).astype(np.float32) for c in cs] for s, cs in by_speaker.items()}


def make_condition(cuts, name: str, split: str, audio_dir: Path, pool: Mapping[str, Sequence[np.ndarray]]):
    """The cuts of ``<split>-<name>``, their audio written under ``audio_dir``; and the cuts that failed."""
    import soundfile as sf
    from lhotse import CutSet, Recording
    from lhotse.utils import fastcopy

    audio_dir.mkdir(parents=True, exist_ok=True)
    out, rejects = [], []
    for c in cuts:
        try:
            y, facts = apply(name, c.load_audio()[0], c.id, _speaker(c), pool)
            path = audio_dir / f"{c.id}.flac"
            sf.write(str(path), y, c.sampling_rate, subtype="PCM_16")
            rec = Recording.from_file(path, recording_id=c.recording_id)
        except Exception as e:  # noqa: BLE001  (one utterance's failure costs that utterance)
            rejects.append((c.id, f"{split}-{name}: {type(e).__name__}: {e}"))
            continue
        sups = [fastcopy(s, start=0.0, duration=rec.duration) for s in c.supervisions]
        custom = dict(c.custom or {}, condition=dict(facts, name=name, matched=False))
        out.append(fastcopy(c, start=0.0, duration=rec.duration, recording=rec, supervisions=sups, custom=custom))
    return CutSet.from_cuts(out), rejects


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lhotse import CutSet

    from compute_fbank import _init_worker, compute_split
    from prep_utils import atomic_to_file, cuts_path, die_empty, existing_cuts, record_rejects, setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--splits", nargs="+", required=True, help="test splits to make the conditions of")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--fbank-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="where <set>_rejected.txt go")
    p.add_argument("--num-jobs", type=int, default=1)
    args = p.parse_args(argv)
    setup_logging()
    _init_worker()
    for split in args.splits:
        cuts = CutSet.from_file(existing_cuts(args.manifest_dir, args.dataset, split, "stage 1")).to_eager()
        pool = babble_pool(cuts) if any(n.startswith("babble") for n in args.conditions) else {}
        for name in args.conditions:
            made, rejects = make_condition(cuts, name, split, args.manifest_dir / "conditions" / f"{split}-{name}", pool)
            src = cuts_path(args.manifest_dir, args.dataset, f"{split}-{name}")
            atomic_to_file(made, src)
            n, failed = compute_split(src, cuts_path(args.fbank_dir, args.dataset, f"{split}-{name}"),
                                      args.fbank_dir / f"{args.dataset}_feats_{split}-{name}", args.num_jobs)
            record_rejects(args.data_dir, f"{split}-{name}", rejects + failed)
            if n == 0:
                die_empty(f"{args.dataset} {split}-{name}: no cut left (see {split}-{name}_rejected.txt)")
            log.info("%s %s-%s (unmatched: %s): %d cuts with fbank", args.dataset, split, name,
                     CONDITIONS[name].what, n)
        update_labels(args.fbank_dir, args.dataset, {f"{split}-{n}": label(split, n, False) for n in args.conditions})


if __name__ == "__main__":
    main()
