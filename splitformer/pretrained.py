#!/usr/bin/env python3
"""Transcribe audio files (any sample rate; wav, flac, ogg, sph) with a trained checkpoint.

    ./splitformer/pretrained.py --checkpoint exp/splitformer-cpu/epoch-30.pt \\
        --bpe-model data/lang_bpe_30/bpe.model --exit-layer 6 a.wav b.flac

Prints ``<file>\\t<transcript>`` per file, in the order given. The checkpoint must hold ``model``
and ``args`` (the model flags), as train.py writes them. Files with no audio, digital silence
or very short audio give an empty transcript; a missing or unreadable file, or a checkpoint
that does not match its flags, is an error (exit status 2) that names it.
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from splitformer.decoding.audio import AudioError, file_features
from splitformer.decoding.loading import DecodeSetupError, build_and_load, checkpoint_args, load_checkpoint_file, model_state
from splitformer.decoding.search import CTC_METHODS, METHODS, run_search

# Audio shorter than this is padded with silence before the front end (its convolutions need
# a few frames); the padding is silence, so it adds no words.
MIN_SECONDS = 0.5
# Peak amplitude below which a file is digital silence (-100 dBFS): nothing to transcribe.
SILENCE_PEAK = 1e-5


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="epoch-N.pt (or any file with 'model' and 'args')")
    p.add_argument("--use-averaged-model", action="store_true", help="decode with the checkpoint's model_avg")
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--exit-layer", type=int, default=None, help="layer whose exit decodes (default: the last)")
    p.add_argument("--decoding-method", type=str, default="greedy_search", choices=METHODS)
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--num-threads", type=int, default=0)
    p.add_argument("sound_files", nargs="+", type=Path, help="audio files to transcribe")
    return p


def load_model(checkpoint: Path, use_averaged_model: bool = False):
    ckpt = load_checkpoint_file(checkpoint)
    args = checkpoint_args(ckpt, checkpoint)
    state = model_state(ckpt, checkpoint, "model_avg" if use_averaged_model else "model")
    return build_and_load(args, state, getattr(args, "vocab_size", None), str(checkpoint))


@torch.no_grad()
def transcribe(model, tokenizer, files: Sequence[Path], exit_layer: Optional[int], method: str, beam: int) -> List[str]:
    """One transcript per file; the audio that holds something to decode goes through in one batch."""
    feats: List[Tuple[int, np.ndarray]] = []
    texts = [""] * len(files)
    for i, f in enumerate(files):
        x, peak = file_features(f, MIN_SECONDS)
        if x.shape[0] == 0 or peak < SILENCE_PEAK:
            continue
        feats.append((i, x))
    if not feats:
        return texts
    lens = torch.tensor([x.shape[0] for _, x in feats])
    batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(x) for _, x in feats], batch_first=True)
    enc, enc_lens = model.encode(batch, lens, exit_layer=exit_layer)
    layer = model.exits[model.exit_index(exit_layer)]
    hyps = run_search(model, method, enc, enc_lens, layer, beam)
    for (i, _), h in zip(feats, hyps):
        texts[i] = tokenizer.decode(h.tokens) if h.tokens else ""
    return texts


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    from splitformer.decoding.loading import load_tokenizer

    try:
        model = load_model(args.checkpoint, args.use_averaged_model)
        if args.exit_layer is not None and args.exit_layer not in model.exits:
            raise DecodeSetupError(f"no exit after layer {args.exit_layer}; valid exits: {', '.join(map(str, model.exits))}")
        if args.decoding_method in CTC_METHODS and not model.use_ctc:
            raise DecodeSetupError(f"{args.decoding_method} needs a CTC head, but this model has none")
        if args.decoding_method not in CTC_METHODS and not model.use_transducer:
            raise DecodeSetupError(f"{args.decoding_method} needs the transducer, but this model is CTC-only")
        tokenizer = load_tokenizer(args.bpe_model)
        texts = transcribe(model, tokenizer, args.sound_files, args.exit_layer, args.decoding_method, args.beam_size)
    except (DecodeSetupError, AudioError) as e:
        print(f"pretrained.py: error: {e}", file=sys.stderr)
        return 2
    for f, t in zip(args.sound_files, texts):
        print(f"{f}\t{t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
