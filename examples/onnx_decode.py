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

``--streaming`` (a causal model exported with ``export.py --streaming true``) reads ``<model-dir>/streaming/`` and
decodes each file as a live stream: chunk after chunk through the streaming ``stem.onnx`` and ``block<i>.onnx``
with their states, each chunk at ``--exit-layer`` or at the first exit that passes ``--exit-strategy``. A block a
chunk does not reach moves its caches on by the chunk (the chunk is absent there), as PyTorch's streaming decoder
does; the search goes on across chunks whatever exit each took. The audio is padded with silence up to whole
chunks. The exit of every chunk goes to stderr.

    ./splitformer/export.py --exp-dir exp/splitformer-cpu-causal --epoch 12 --avg 4 --use-averaged-model \
        --streaming true --chunk-size 8 --left-context-frames 32 --tokens data/lang_bpe_30/tokens.txt
    python examples/onnx_decode.py --model-dir exp/splitformer-cpu-causal/onnx --streaming \
        --exit-strategy confidence --exit-threshold 0.9 a.wav

Needs numpy, soundfile, kaldi-native-fbank and onnxruntime (scipy to resample audio that is not 16 kHz),
and the features of splitformer.decoding.audio, which import no torch. A model exported from a pretrained
backbone (``--encoder hf``; metadata ``input=waveform``) is fed the 16 kHz samples instead of fbank.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitformer.decoding.audio import SAMPLE_RATE, chunks_in, fbank, stream_features  # noqa: E402  (torch-free)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="export.py's output directory")
    p.add_argument("--exit-layer", type=int, default=None, help="the exit to decode at (encoder-exit<N>.onnx)")
    p.add_argument("--exit-strategy", choices=["fixed", "entropy", "confidence"], default="fixed",
                   help="entropy/confidence: run block after block and stop at the first confident exit")
    p.add_argument("--exit-threshold", type=float, default=None)
    p.add_argument("--method", choices=["transducer", "ctc"], default="transducer")
    p.add_argument("--int8", action="store_true", help="use the *.int8.onnx files")
    p.add_argument("--streaming", action="store_true",
                   help="decode chunk by chunk with <model-dir>/streaming/ (export.py --streaming true)")
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
                      unk: int = -1, hyp: Optional[List[int]] = None) -> List[int]:
    """Greedy search over projected encoder frames (T, J), at most one symbol per frame; <unk> is not emitted.
    ``hyp``: where a stream's search stands (its initial context and tokens so far); returned extended."""
    hyp = list(hyp) if hyp is not None else [blank] * context
    dec = decoder(np.array([hyp[-context:]], dtype=np.int64))[0]
    for t in range(enc.shape[0]):
        tok = int(joiner(enc[t:t + 1], dec)[0].argmax(-1)[0])
        if tok not in (blank, unk):
            hyp.append(tok)
            dec = decoder(np.array([hyp[-context:]], dtype=np.int64))[0]
    return hyp


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
        if args.streaming:
            return decode_streaming(args, d, suffix, tokens)
        return decode_dynamic(args, d, suffix, tokens)
    if args.streaming:
        return decode_streaming(args, d, suffix, tokens)
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
            ids = transducer_greedy(out[0, :n], decoder, joiner, context, blank, unk_id(tokens))[context:]
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
            ids = transducer_greedy(outs["encoder_out"][0, :n], decoder, joiner, context, blank, unk_id(tokens))[context:]
        print(f"{f}\t{to_text(ids, tokens)}")
        print(f"{f}: exit {exit_layer}", file=sys.stderr)
    return 0


class StreamingRunner:
    """The streaming stem.onnx and block<i>.onnx: one chunk at a time, a state per block, a depth per chunk."""

    def __init__(self, d: Path, suffix: str) -> None:
        self.stem = Session(d / f"stem{suffix}")
        meta = self.stem.meta
        self.T, self.shift = int(meta["T"]), int(meta["decode_chunk_len"])
        self.out_frames = int(meta["out_frames"])
        self.blocks = [Session(d / f"block{i}{suffix}") for i in range(int(meta["num_blocks"]))]
        self.exits = [int(b.meta["exit_layer"]) for b in self.blocks]
        self.outputs = [o.name for o in self.blocks[0].sess.get_outputs()]

    def init_states(self) -> List[List[np.ndarray]]:
        """Zeros (and every cache slot absent) for a stream that has heard nothing, per block."""
        states = []
        for block in self.blocks:
            st = []
            for i in block.sess.get_inputs()[1:]:
                shape = [1 if isinstance(d, str) else d for d in i.shape]
                st.append(np.zeros(shape, dtype=bool if i.name == "valid" else np.float32))
            states.append(st)
        return states

    def skip(self, state: List[np.ndarray]) -> List[np.ndarray]:
        """A block the chunk did not reach: every cache moves on by the chunk, which enters it as absent (the
        branch's caches, at half the rate, by half as many frames)."""
        valid, caches = state[0], state[1:]
        n = self.out_frames
        out = [np.concatenate([valid[:, n:], np.zeros_like(valid[:, :n])], axis=1)]
        for i in range(0, len(caches), 6):
            layer = caches[i:i + 6]
            f = n * layer[0].shape[0] // valid.shape[1]  # frames of this chunk at this layer's rate
            for c in layer[:4]:  # (L, N, D): keys and values
                out.append(np.concatenate([c[f:], np.zeros_like(c[:f])], axis=0))
            for c in layer[4:]:  # (N, D, kernel // 2): the convolution's last inputs
                z = np.zeros(c.shape[:2] + (f,), dtype=c.dtype)
                out.append(np.concatenate([c, z], axis=2)[:, :, f:])
        return out

    def climb(self, window: np.ndarray, embed: np.ndarray, states: List[List[np.ndarray]], stop_at: Optional[int],
              strategy: str, threshold: Optional[float]):
        """One chunk: the stem, then block after block until ``stop_at`` or the first exit that passes; the blocks
        above are skipped. Returns (exit layer, its outputs by name, the next embed state)."""
        h, embed = self.stem(window[None], embed)
        chosen = None
        for b, block in enumerate(self.blocks):
            if chosen is not None:
                states[b] = self.skip(states[b])
                continue
            outs = dict(zip(self.outputs, block(h, *states[b])))
            states[b] = [outs["new_valid"]] + [outs["new_" + i.name] for i in block.sess.get_inputs()[2:]]
            h = outs["next"]
            last = b == len(self.blocks) - 1 or self.exits[b] == stop_at
            if last or (stop_at is None and passes(strategy, frame_scores(outs["log_probs"][0])[strategy], threshold)):
                chosen = (self.exits[b], outs)
        return chosen[0], chosen[1], embed


def decode_streaming(args, d: Path, suffix: str, tokens: Dict[int, str]) -> int:
    sd = d / "streaming"
    if not (sd / f"stem{suffix}").is_file():
        have = sorted(p.name for p in sd.glob("encoder-exit*.onnx")) if sd.is_dir() else []
        why = (f"the per-block streaming files are written for encoders with exits only; {sd} holds "
               f"{', '.join(have)}, which sherpa-onnx's OnlineRecognizer runs" if have else
               "export with --streaming true")
        raise SystemExit(f"onnx_decode.py: {sd / ('stem' + suffix)} does not exist: {why}")
    runner = StreamingRunner(sd, suffix)
    if args.exit_strategy != "fixed" and "log_probs" not in runner.outputs:
        raise SystemExit("onnx_decode.py: dynamic exits read the CTC posteriors, but these blocks have no CTC head")
    if args.exit_layer is not None and args.exit_layer not in runner.exits:
        raise SystemExit(f"onnx_decode.py: no exit after layer {args.exit_layer}; exits: {runner.exits}")
    stop_at = (args.exit_layer or runner.exits[-1]) if args.exit_strategy == "fixed" else None
    if args.method == "transducer":
        decoder, joiner = Session(sd / f"decoder{suffix}"), Session(sd / f"joiner{suffix}")
        context = int(decoder.meta.get("context_size", 2))
    blank = int(runner.blocks[0].meta.get("blank_id", 0))
    for f in args.sound_files:
        feats = stream_features(audio(f), runner.T, runner.shift)
        states = runner.init_states()
        embed = np.zeros((1, 128, 3, 19), dtype=np.float32)
        hyp, prev, exits = None, blank, []
        ids: List[int] = []
        for k in range(chunks_in(feats.shape[0], runner.T, runner.shift)):
            window = feats[k * runner.shift: k * runner.shift + runner.T]
            e, outs, embed = runner.climb(window, embed, states, stop_at, args.exit_strategy, args.exit_threshold)
            exits.append(e)
            if args.method == "ctc":
                for t in outs["log_probs"][0].argmax(-1).tolist():
                    if t != blank and t != prev:
                        ids.append(t)
                    prev = t
            else:
                hyp = transducer_greedy(outs["encoder_out"][0], decoder, joiner, context, blank, unk_id(tokens), hyp)
        if args.method == "transducer":
            ids = (hyp or [0] * context)[context:]
        print(f"{f}\t{to_text(ids, tokens)}")
        print(f"{f}: chunk exits {' '.join(map(str, exits))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
