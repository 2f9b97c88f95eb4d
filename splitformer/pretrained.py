#!/usr/bin/env python3
"""Transcribe audio files (any sample rate; wav, flac, ogg, sph) with a trained model.

    ./splitformer/export.py --exp-dir exp/splitformer-cpu --epoch 12 --avg 4 --use-averaged-model --onnx false
    ./splitformer/pretrained.py --checkpoint exp/splitformer-cpu/onnx/pretrained.pt \\
        --bpe-model data/lang_bpe_30/bpe.model --exit-layer 6 a.wav b.flac
    ./splitformer/pretrained.py ... --files-from list.txt --output transcripts.tsv
    ./splitformer/pretrained.py ... --exit-strategy confidence --exit-threshold 0.9 a.wav   # dynamic exits

With ``--exit-strategy`` each file climbs the exits and stops at the first whose criterion passes (the batched
climb decode.py runs; the decision of splitformer.decoding.decision, which examples/onnx_decode.py shares); the
exit each file took goes to stderr.

Writes ``<file>\\t<transcript>`` per file, in the order given (to stdout, or to ``--output``). The
checkpoint must hold ``model`` and ``args`` (the model flags): an ``epoch-N.pt`` of train.py, or the
``pretrained.pt`` export.py writes (with the weights averaged as decode.py averages them).

Files are decoded in batches of at most ``--max-duration`` seconds of audio, so memory does not grow
with the number of files. Empty audio (a valid header, no samples), digital silence and very short
audio give an empty transcript. A file that cannot be used (missing, a directory, 0 bytes, unreadable,
NaN samples) costs only itself: it is named on stderr with the reason, every other file is still
transcribed, and the exit status is 1. A checkpoint or flag error stops everything (exit status 2).
"""
import argparse
import logging
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from splitformer.decoding.audio import AudioError, read_model_input
from splitformer.decoding.loading import DecodeSetupError, build_and_load, checkpoint_args, load_checkpoint_file, model_state
from splitformer.decoding.exits import SCORERS, STRATEGIES, ExitReader
from splitformer.decoding.search import CTC_METHODS, METHODS, run_search
from splitformer.utils import str2bool


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="pretrained.pt from export.py, or an epoch-N.pt of train.py (its raw weights)")
    p.add_argument("--use-averaged-model", action="store_true",
                   help="refused: an epoch-N.pt's model_avg averages the whole run; export.py writes the right average")
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--exit-layer", type=int, default=None, help="layer whose exit decodes (default: the last)")
    p.add_argument("--exit-strategy", choices=STRATEGIES, default="fixed",
                   help="entropy/confidence/posterior: stop each file at the first exit whose criterion passes")
    p.add_argument("--exit-threshold", type=float, default=None)
    p.add_argument("--exit-scorer", choices=SCORERS, default=None,
                   help="what the criterion reads: the CTC heads (default when the model has them) or the transducer")
    p.add_argument("--exit-nbest", type=int, default=4, help="N-best size of the posterior criterion")
    p.add_argument("--exit-count-blank", type=str2bool, default=True,
                   help="entropy/confidence over every frame (true) or the frames whose best symbol is a token")
    p.add_argument("--decoding-method", type=str, default="greedy_search", choices=METHODS)
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--max-duration", type=float, default=200.0, help="seconds of audio (padding included) per batch")
    p.add_argument("--files-from", type=Path, default=None, help="a text file with one audio path per line")
    p.add_argument("--output", type=Path, default=None, help="write <file>\\t<transcript> lines here instead of stdout")
    p.add_argument("--num-threads", type=int, default=0)
    p.add_argument("sound_files", nargs="*", type=Path, help="audio files to transcribe")
    return p


def load_model(checkpoint: Path, use_averaged_model: bool = False):
    ckpt = load_checkpoint_file(checkpoint)
    if use_averaged_model:
        raise DecodeSetupError(
            f"--use-averaged-model: the model_avg of {checkpoint} is the running average over the whole run, "
            "its first epochs included, and decodes far worse than the model itself. Write the average of the "
            "last epochs as decode.py uses it, then pass that file: ./splitformer/export.py --exp-dir DIR "
            "--epoch E --avg A --use-averaged-model --onnx false  (writes DIR/onnx/pretrained.pt)")
    args = checkpoint_args(ckpt, checkpoint)
    state = model_state(ckpt, checkpoint, "model")
    return build_and_load(args, state, getattr(args, "vocab_size", None), str(checkpoint))


def input_files(sound_files: Sequence[Path], files_from: Optional[Path]) -> List[Path]:
    """The positional files, then those listed in ``files_from`` (blank lines and # comments skipped)."""
    files = list(sound_files)
    if files_from is not None:
        try:
            lines = Path(files_from).read_text().splitlines()
        except OSError as e:
            raise DecodeSetupError(f"--files-from {files_from}: cannot read it ({e.strerror})") from e
        files += [Path(ln.strip()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not files:
        raise DecodeSetupError("no audio files: pass them as arguments or list them with --files-from")
    return files


@dataclass
class Transcript:
    path: Path
    text: str = ""
    error: Optional[str] = None
    exit_layer: Optional[int] = None


def batches(items: Iterable[Tuple[int, np.ndarray]], max_frames: int) -> Iterator[List[Tuple[int, np.ndarray]]]:
    """Groups (index, features) in the given order so that each padded batch holds at most
    ``max_frames`` frames; a longer item goes alone."""
    batch: List[Tuple[int, np.ndarray]] = []
    longest = 0
    for item in items:
        n = item[1].shape[0]
        if batch and (len(batch) + 1) * max(longest, n) > max_frames:
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, n)
    if batch:
        yield batch


@torch.no_grad()
def transcribe(model, tokenizer, files: Sequence[Path], exit_layer: Optional[int], method: str, beam: int,
               max_duration: float = 200.0, progress: bool = False,
               rule: Optional[Tuple[ExitReader, str, float]] = None) -> Iterator[Transcript]:
    """One Transcript per file, in order, a batch at a time; a file that cannot be read gets its
    error instead of a transcript and the others go on. ``rule``: (reader, strategy, threshold) of dynamic exits."""
    from splitformer.decoding.runner import climb_batch

    layer = model.exits[model.exit_index(exit_layer)]
    out: Dict[int, Transcript] = {}
    next_out = 0

    def features() -> Iterator[Tuple[int, np.ndarray]]:
        for i, f in enumerate(tqdm(files, desc="transcribing", unit="file", disable=not progress)):
            out[i] = Transcript(f)
            try:  # the reader examples/onnx_decode.py uses too: the same input, the same silence and error rules
                x = read_model_input(f, model.input_kind)
            except AudioError as e:
                out[i].error = str(e)
                continue
            if not x.silent:
                yield i, x.x

    for batch in batches(features(), max(1, int(max_duration * model.input_rate))):
        lens = torch.tensor([x.shape[0] for _, x in batch])
        feats = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(x) for _, x in batch], batch_first=True)
        if rule is not None:
            c = climb_batch(model, feats, lens, tokenizer, rule[0], method, beam, feats.device, rule=rule[1:])
            for j, (i, _) in enumerate(batch):
                k = int(c.stop_index[j])
                out[i].text, out[i].exit_layer = " ".join(c.words[j][k]), model.exits[k]
        else:
            enc, enc_lens = model.encode(feats, lens, exit_layer=layer)
            for (i, _), h in zip(batch, run_search(model, method, enc, enc_lens, layer, beam)):
                out[i].text = " ".join(tokenizer.decode(h.tokens).split()) if h.tokens else ""  # one space between words
        while next_out <= batch[-1][0]:  # every file up to this batch's last one is settled
            yield out.pop(next_out)
            next_out += 1
    while next_out < len(files):  # the rest: unreadable, empty or silent files after the last batch
        yield out.pop(next_out)
        next_out += 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    from splitformer.decoding.loading import load_tokenizer

    try:
        files = input_files(args.sound_files, args.files_from)
        model = load_model(args.checkpoint, args.use_averaged_model)
        if args.exit_layer is not None and args.exit_layer not in model.exits:
            raise DecodeSetupError(f"no exit after layer {args.exit_layer}; valid exits: {', '.join(map(str, model.exits))}")
        if args.decoding_method in CTC_METHODS and not model.use_ctc:
            raise DecodeSetupError(f"{args.decoding_method} needs a CTC head, but this model has none")
        if args.decoding_method not in CTC_METHODS and not model.use_transducer:
            raise DecodeSetupError(f"{args.decoding_method} needs the transducer, but this model is CTC-only")
        rule = None
        if args.exit_strategy != "fixed":
            if args.exit_threshold is None or args.exit_layer is not None:
                raise DecodeSetupError("--exit-strategy needs --exit-threshold, and chooses the exit itself "
                                       "(drop --exit-layer)")
            scorer = args.exit_scorer or ("ctc" if model.use_ctc else "transducer")
            if (scorer == "ctc" and not model.use_ctc) or (scorer == "transducer" and not model.use_transducer):
                raise DecodeSetupError(f"--exit-scorer {scorer}: this model has no {scorer} to read")
            try:
                reader = ExitReader((args.exit_strategy,), scorer, args.exit_nbest, args.decoding_method,
                                    args.beam_size, args.exit_count_blank)
            except ValueError as e:
                raise DecodeSetupError(str(e)) from None
            rule = (reader, args.exit_strategy, args.exit_threshold)
        tokenizer = load_tokenizer(args.bpe_model)
        sink = open(args.output, "w") if args.output is not None else sys.stdout
    except (DecodeSetupError, OSError) as e:
        print(f"pretrained.py: error: {e}", file=sys.stderr)
        return 2
    failed = 0
    try:
        for t in transcribe(model, tokenizer, files, args.exit_layer, args.decoding_method, args.beam_size,
                            args.max_duration, progress=len(files) >= 20, rule=rule):
            if t.error is not None:
                failed += 1
                print(f"pretrained.py: skipped {t.path}: {t.error}", file=sys.stderr)
                continue
            if rule is not None:
                print(f"{t.path}: exit {t.exit_layer if t.exit_layer is not None else '-'}", file=sys.stderr)
            sink.write(f"{t.path}\t{t.text}\n")
            sink.flush()
    finally:
        if sink is not sys.stdout:
            sink.close()
    if failed:
        print(f"pretrained.py: {failed} of {len(files)} file(s) could not be transcribed (named above); "
              f"the other {len(files) - failed} were", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
