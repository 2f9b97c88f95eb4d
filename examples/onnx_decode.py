#!/usr/bin/env python3
"""Decode audio at a chosen exit with onnxruntime alone: no torch, the files export.py writes.

    ./splitformer/export.py --exp-dir exp/ee-zipformer-cpu --epoch 12 --avg 4 --use-averaged-model \\
        --tokens data/lang_bpe_30/tokens.txt --int8
    python examples/onnx_decode.py --model-dir exp/ee-zipformer-cpu/onnx --exit-layer 6 a.wav b.wav
    python examples/onnx_decode.py --model-dir ... --exit-layer 6 --method ctc --int8 a.wav
    ./splitformer/export.py ... --blocks true            # adds stem.onnx and block<i>.onnx
    python examples/onnx_decode.py --model-dir ... --exit-strategy confidence --exit-threshold 0.93 a.wav

Prints ``<file>\\t<transcript>`` per file. ``--method transducer`` (the default) runs
``encoder-exit<N>.onnx`` + ``decoder.onnx`` + ``joiner.onnx`` with greedy search, one symbol per frame
(as decode.py's ``greedy_search``); ``--method ctc`` runs ``ctc-exit<N>.onnx`` alone. Only the layers up to
exit N are in those files, so the layers above it never run.

With ``--exit-strategy entropy|confidence`` (dynamic exits) it runs ``stem.onnx`` and then ``block0.onnx``,
``block1.onnx``, ... and stops at the first exit whose CTC posteriors pass ``--exit-threshold`` (mean frame entropy
below it, or mean max posterior above it; the last exit always stops), then decodes there: the blocks above that
exit never run. The exit each file stopped at goes to stderr.

Needs numpy, soundfile, kaldi-native-fbank and onnxruntime (scipy to resample audio that is not 16 kHz),
and the features of splitformer.decoding.audio, which import no torch. A model exported from a pretrained
backbone (``--encoder hf``; metadata ``input=waveform``) is fed the 16 kHz samples instead of fbank.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitformer.decoding.audio import SAMPLE_RATE, fbank  # noqa: E402  (torch-free)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="export.py's output directory")
    p.add_argument("--exit-layer", type=int, default=None, help="the exit to decode at (encoder-exit<N>.onnx)")
    p.add_argument("--exit-strategy", choices=["fixed", "entropy", "confidence"], default="fixed",
                   help="entropy/confidence: run block after block and stop at the first confident exit")
    p.add_argument("--exit-threshold", type=float, default=None)
    p.add_argument("--method", choices=["transducer", "ctc"], default="transducer")
    p.add_argument("--int8", action="store_true", help="use the *.int8.onnx files")
    p.add_argument("--tokens", type=Path, default=None, help="default: <model-dir>/tokens.txt")
    p.add_argument("sound_files", nargs="+", type=Path)
    return p


def read_tokens(path: Path) -> Dict[int, str]:
    """tokens.txt: '<piece> <id>' per line."""
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            piece, idx = line.rsplit(maxsplit=1)
            table[int(idx)] = piece
    return table


def unk_id(tokens: Dict[int, str]) -> int:
    return next((i for i, p in tokens.items() if p == "<unk>"), -1)


def to_text(ids: List[int], tokens: Dict[int, str]) -> str:
    """Pieces joined, word boundaries ('\u2581') as single spaces, as sentencepiece decodes them."""
    return " ".join("".join(tokens[i] for i in ids).replace("\u2581", " ").split())


def model_input(path: Path, meta: Dict[str, str]) -> np.ndarray:
    """What the exported model reads (its metadata's ``input``): (T, 80) fbank, or (S,) 16 kHz samples."""
    samples = audio(path)
    return samples if meta.get("input", "fbank") == "waveform" else fbank(samples)


def features(path: Path) -> np.ndarray:
    """(T, 80) float32 log-mel features of a file (what our fbank models read)."""
    return fbank(audio(path))


def audio(path: Path) -> np.ndarray:
    """(S,) float32 samples of a file, mixed to mono and resampled to 16 kHz."""
    import soundfile as sf

    samples, sr = sf.read(str(path), dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if sr != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, SAMPLE_RATE)
        samples = resample_poly(samples, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return samples


class Session:
    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SystemExit(f"onnx_decode.py: {path} does not exist (did export.py write this exit?)")
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.meta = self.sess.get_modelmeta().custom_metadata_map

    def __call__(self, *inputs: np.ndarray) -> List[np.ndarray]:
        names = [i.name for i in self.sess.get_inputs()]
        return self.sess.run(None, dict(zip(names, inputs)))


def ctc_greedy(log_probs: np.ndarray, blank: int) -> List[int]:
    out, prev = [], blank
    for t in log_probs.argmax(-1).tolist():
        if t != blank and t != prev:
            out.append(t)
        prev = t
    return out


def transducer_greedy(enc: np.ndarray, decoder: Session, joiner: Session, context: int, blank: int,
                      unk: int = -1) -> List[int]:
    """Greedy search over projected encoder frames (T, J), at most one symbol per frame; <unk> is not emitted."""
    hyp = [blank] * context
    dec = decoder(np.array([hyp[-context:]], dtype=np.int64))[0]
    for t in range(enc.shape[0]):
        tok = int(joiner(enc[t:t + 1], dec)[0].argmax(-1)[0])
        if tok not in (blank, unk):
            hyp.append(tok)
            dec = decoder(np.array([hyp[-context:]], dtype=np.int64))[0]
    return hyp[context:]


def frame_scores(log_probs: np.ndarray) -> Dict[str, float]:
    """Mean frame entropy and mean max posterior of (T, V) log-probs (a zero posterior adds 0 entropy)."""
    p = np.exp(log_probs.astype(np.float64))
    ent = -np.where(p > 0, p * log_probs, 0.0).sum(-1)
    return {"entropy": float(ent.mean()), "confidence": float(p.max(-1).mean())}


def passes(strategy: str, score: float, threshold: float) -> bool:
    return score < threshold if strategy == "entropy" else score > threshold


class BlockRunner:
    """stem.onnx then block<i>.onnx, one block at a time: a file's blocks above its exit never run."""

    def __init__(self, d: Path, suffix: str) -> None:
        self.stem = Session(d / f"stem{suffix}")
        n = int(self.stem.meta["num_blocks"])
        self.blocks = [Session(d / f"block{i}{suffix}") for i in range(n)]
        self.names = [o.name for o in self.blocks[0].sess.get_outputs()]
        if "log_probs" not in self.names:
            raise SystemExit("onnx_decode.py: dynamic exits read the CTC posteriors, but these blocks have no CTC head")

    def run(self, x: np.ndarray, strategy: str, threshold: float):
        """(exit layer, its outputs by name, valid frames) of the first exit that passes."""
        h, h_lens = self.stem(x[None], np.array([x.shape[0]], dtype=np.int64))
        n = int(h_lens[0])
        for i, block in enumerate(self.blocks):
            outs = dict(zip(self.names, block(h, h_lens)))
            h = outs["next"]
            last = i == len(self.blocks) - 1
            if last or passes(strategy, frame_scores(outs["log_probs"][0, :n])[strategy], threshold):
                return int(block.meta["exit_layer"]), outs, n


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    suffix = ".int8.onnx" if args.int8 else ".onnx"
    d = args.model_dir
    tokens = read_tokens(args.tokens or d / "tokens.txt")
    if args.exit_strategy != "fixed":
        if args.exit_threshold is None or args.exit_layer is not None:
            raise SystemExit("onnx_decode.py: --exit-strategy needs --exit-threshold, and chooses the exit itself")
        return decode_dynamic(args, d, suffix, tokens)
    if args.exit_layer is None:
        raise SystemExit("onnx_decode.py: give --exit-layer N, or --exit-strategy with --exit-threshold")
    if args.method == "ctc":
        model = Session(d / f"ctc-exit{args.exit_layer}{suffix}")
    else:
        model = Session(d / f"encoder-exit{args.exit_layer}{suffix}")
        decoder, joiner = Session(d / f"decoder{suffix}"), Session(d / f"joiner{suffix}")
        context = int(decoder.meta.get("context_size", 2))
    blank = int(model.meta.get("blank_id", 0))
    for f in args.sound_files:
        x = model_input(f, model.meta)
        out, out_lens = model(x[None], np.array([x.shape[0]], dtype=np.int64))
        n = int(out_lens[0])
        if args.method == "ctc":
            ids = ctc_greedy(out[0, :n], blank)
        else:
            ids = transducer_greedy(out[0, :n], decoder, joiner, context, blank, unk_id(tokens))
        print(f"{f}\t{to_text(ids, tokens)}")
    return 0


def decode_dynamic(args, d: Path, suffix: str, tokens: Dict[int, str]) -> int:
    runner = BlockRunner(d, suffix)
    if args.method == "transducer":
        decoder, joiner = Session(d / f"decoder{suffix}"), Session(d / f"joiner{suffix}")
        context = int(decoder.meta.get("context_size", 2))
    blank = int(runner.blocks[0].meta.get("blank_id", 0))
    for f in args.sound_files:
        exit_layer, outs, n = runner.run(model_input(f, runner.stem.meta), args.exit_strategy, args.exit_threshold)
        if args.method == "ctc":
            ids = ctc_greedy(outs["log_probs"][0, :n], blank)
        else:
            ids = transducer_greedy(outs["encoder_out"][0, :n], decoder, joiner, context, blank, unk_id(tokens))
        print(f"{f}\t{to_text(ids, tokens)}")
        print(f"{f}: exit {exit_layer}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
