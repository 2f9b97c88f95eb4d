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

Needs numpy, soundfile, kaldi-native-fbank and onnxruntime, and the reader of splitformer.decoding.audio, which
imports no torch and resamples audio that is not 16 kHz itself (numpy: lhotse's windowed-sinc resampler). A model
exported from a pretrained backbone (``--encoder hf``; metadata ``input=waveform``) is fed the 16 kHz samples
instead of fbank.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitformer.decoding import decision  # noqa: E402  (torch-free: the decision PyTorch decodes with)
from splitformer.decoding.audio import (  # noqa: E402  (torch-free; AudioError: what model_input raises)
    AudioError, chunks_in, file_samples, read_model_input, stream_features)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="export.py's output directory")
    p.add_argument("--exit-layer", type=int, default=None, help="the exit to decode at (encoder-exit<N>.onnx)")
    p.add_argument("--exit-strategy", choices=["fixed", "entropy", "confidence"], default="fixed",
                   help="entropy/confidence: run block after block and stop at the first confident exit (the "
                        "posterior criterion needs a beam search, which this example does not have)")
    p.add_argument("--exit-threshold", type=float, default=None)
    p.add_argument("--exit-scorer", choices=["ctc", "transducer"], default=None,
                   help="what the criterion reads: the CTC heads (default when the blocks have them) or the "
                        "transducer's posteriors along its greedy path")
    p.add_argument("--exit-count-blank", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="entropy/confidence over every frame (true) or the frames whose best symbol is a token")
    p.add_argument("--batch-size", type=int, default=16,
                   help="files climbed together (dynamic exits), made of files of similar length among the next "
                        "4 x batch-size")
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
    """What the exported model reads (its metadata's ``input``): (T, 80) fbank, or (S,) 16 kHz samples, from the
    reader pretrained.py uses (splitformer.decoding.audio.read_model_input: soxr resampling, short files padded to
    0.5 s). Empty ((0, 80) or (0,)) for empty or silent audio, which has nothing to transcribe; raises
    ``AudioError`` naming the file when it is missing, unreadable or holds NaN samples."""
    return read_model_input(path, meta.get("input", "fbank")).x


def audio(path: Path) -> np.ndarray:
    """(S,) float32 samples of a file, mixed to mono and resampled to 16 kHz (the same reader; a stream is padded
    to whole chunks by ``stream_features``, not to 0.5 s)."""
    return file_samples(path)[0]


class Session:
    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SystemExit(f"onnx_decode.py: {path} does not exist (did export.py write this exit?)")
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.meta = self.sess.get_modelmeta().custom_metadata_map
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def __call__(self, *inputs: np.ndarray) -> List[np.ndarray]:
        return self.sess.run(None, dict(zip(self.inputs, inputs)))

    def named(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Outputs by name, for inputs by name."""
        return dict(zip(self.outputs, self.sess.run(None, {n: feeds[n] for n in self.inputs})))


def check_length(path: Path, x: np.ndarray, meta: Dict[str, str]) -> None:
    """Refuse an input longer than the export's ``max_frames`` (its position tables end there), naming the fix."""
    limit = int(meta.get("max_frames", 0))
    frames = x.shape[0] if meta.get("input", "fbank") != "waveform" else x.shape[0] // 160
    if limit and frames > limit:
        raise AudioError(f"{path} is {frames / 100:.1f} s long ({frames} frames); these files take at most "
                         f"{limit} frames ({limit / 100:.0f} s): split the audio, or export again with "
                         f"--max-frames {frames}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ctc_greedy(log_probs: np.ndarray, blank: int) -> List[int]:
    out, prev = [], blank
    for t in log_probs.argmax(-1).tolist():
        if t != blank and t != prev:
            out.append(t)
        prev = t
    return out


def transducer_greedy(enc: np.ndarray, decoder: Session, joiner: Session, context: int, blank: int,
                      unk: int = -1, hyp: Optional[List[int]] = None, path: Optional[List[np.ndarray]] = None
                      ) -> List[int]:
    """Greedy search over projected encoder frames (T, J), at most one symbol per frame; <unk> is not emitted.
    ``hyp``: where a stream's search stands (its initial context and tokens so far); returned extended.
    ``path``: gets the joiner's (V,) log-posteriors at each frame of the greedy path (the transducer scorer)."""
    hyp = list(hyp) if hyp is not None else [blank] * context
    dec = decoder(np.array([hyp[-context:]], dtype=np.int64))[0]
    for t in range(enc.shape[0]):
        logits = joiner(enc[t:t + 1], dec)[0]
        tok = int(logits.argmax(-1)[0])
        if path is not None:
            path.append(log_softmax(logits[0]))
        if tok not in (blank, unk):
            hyp.append(tok)
            dec = decoder(np.array([hyp[-context:]], dtype=np.int64))[0]
    return hyp


class Transducer:
    """decoder.onnx + joiner.onnx: the greedy search, and the transducer exit scorer (its path's posteriors)."""

    def __init__(self, d: Path, suffix: str, tokens: Dict[int, str], blank: int) -> None:
        self.decoder, self.joiner = Session(d / f"decoder{suffix}"), Session(d / f"joiner{suffix}")
        self.context = int(self.decoder.meta.get("context_size", 2))
        self.blank, self.unk = blank, unk_id(tokens)
        self.vocab = int(self.joiner.meta.get("vocab_size", len(tokens)))

    def greedy(self, enc: np.ndarray, hyp: Optional[List[int]] = None, path: Optional[list] = None) -> List[int]:
        return transducer_greedy(enc, self.decoder, self.joiner, self.context, self.blank, self.unk, hyp, path)

    def greedy_with_posteriors(self, enc: np.ndarray) -> Tuple[List[int], np.ndarray]:
        """(tokens, (T, V) log-posteriors along the greedy path) of one utterance's (T, J) frames."""
        path: List[np.ndarray] = []
        hyp = self.greedy(enc, path=path)
        return hyp[self.context:], (np.stack(path) if path else np.zeros((0, self.vocab)))


class Climber:
    """The per-block files (stem.onnx, block<i>.onnx) run as a batched climb: a batch of files goes through the
    stem, then block after block; after each exit the files whose criterion passes stop there and leave the batch
    (trimmed to the longest that stays), and the rest climb on. The blocks above a file's exit never run for it.
    The decision is splitformer.decoding.decision's, the one PyTorch decodes with."""

    def __init__(self, d: Path, suffix: str, strategy: str, threshold: float, scorer: str, count_blank: bool,
                 method: str, transducer: Optional[Transducer]) -> None:
        self.stem = Session(d / f"stem{suffix}")
        self.blocks = [Session(d / f"block{i}{suffix}") for i in range(int(self.stem.meta["num_blocks"]))]
        self.exits = [int(b.meta["exit_layer"]) for b in self.blocks]
        self.blank = int(self.blocks[0].meta.get("blank_id", 0))
        have = set(self.blocks[0].outputs)
        need = {"ctc": "log_probs", "transducer": "encoder_out"}
        for what, why in ((scorer, "--exit-scorer"), (method, "--method")):
            if need[what] not in have:
                raise SystemExit(f"onnx_decode.py: {why} {what} reads {need[what]}, which these blocks do not have")
        self.strategy, self.threshold, self.scorer, self.count_blank = strategy, threshold, scorer, count_blank
        self.method, self.transducer = method, transducer

    def score(self, outs: Dict[str, np.ndarray], lens: np.ndarray) -> Tuple[np.ndarray, Optional[List[List[int]]]]:
        """(B,) scores at this exit, and the greedy tokens when the transducer scorer's pass found them."""
        if self.scorer == "ctc":
            lp = outs["log_probs"]
            return decision.frame_scores(lp, lens, self.blank, self.count_blank)[self.strategy], None
        hyps, paths = zip(*(self.transducer.greedy_with_posteriors(outs["encoder_out"][i, :n])
                            for i, n in enumerate(lens.tolist())))
        T = max(p.shape[0] for p in paths)
        lp = np.zeros((len(paths), T, self.transducer.vocab))
        for i, p in enumerate(paths):
            lp[i, : p.shape[0]] = p
        scores = decision.frame_scores(lp, lens, self.blank, self.count_blank)[self.strategy]
        return scores, (list(hyps) if self.method == "transducer" else None)

    def decode_rows(self, outs: Dict[str, np.ndarray], lens: np.ndarray, rows: np.ndarray) -> List[List[int]]:
        if self.method == "ctc":
            return [ctc_greedy(outs["log_probs"][r, :lens[r]], self.blank) for r in rows.tolist()]
        return [self.transducer.greedy(outs["encoder_out"][r, :lens[r]])[self.transducer.context:] for r in rows.tolist()]

    def run(self, xs: Sequence[np.ndarray]) -> List[Tuple[int, List[int]]]:
        """(exit layer, token ids) of each input (fbank (T, 80) or samples), climbed as one batch."""
        lens = np.array([x.shape[0] for x in xs], dtype=np.int64)
        batch = np.zeros((len(xs), int(lens.max())) + xs[0].shape[1:], dtype=np.float32)
        for i, x in enumerate(xs):
            batch[i, : x.shape[0]] = x
        stem = self.stem.named({"x": batch, "x_lens": lens})
        h, h_lens = stem["h"], stem["h_lens"]
        active = np.arange(len(xs))
        out: List[Optional[Tuple[int, List[int]]]] = [None] * len(xs)
        for b, block in enumerate(self.blocks):
            outs = block.named({**stem, "h": h, "h_lens": h_lens})  # the stem hands on h_lens and the position table
            if b == len(self.blocks) - 1:
                stop, hyps = np.ones(len(active), dtype=bool), None
            else:
                scores, hyps = self.score(outs, h_lens)
                stop = decision.stops(self.strategy, scores, self.threshold)
            rows = np.flatnonzero(stop)
            found = [hyps[r] for r in rows] if hyps is not None else self.decode_rows(outs, h_lens, rows)
            for r, ids in zip(rows.tolist(), found):
                out[active[r]] = (self.exits[b], ids)
            keep = np.flatnonzero(~stop)
            if len(keep) == 0:
                break
            active, h_lens = active[keep], h_lens[keep]
            h = outs["next"][keep, : int(h_lens.max())]
        return out


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
        transducer = Transducer(d, suffix, tokens, int(model.meta.get("blank_id", 0)))
    blank = int(model.meta.get("blank_id", 0))

    def decode(x: np.ndarray) -> str:
        out, out_lens = model(x[None], np.array([x.shape[0]], dtype=np.int64))
        n = int(out_lens[0])
        ids = ctc_greedy(out[0, :n], blank) if args.method == "ctc" else transducer.greedy(out[0, :n])[transducer.context:]
        return to_text(ids, tokens)

    failed = 0
    for f in args.sound_files:
        try:
            x = model_input(f, model.meta)
            check_length(f, x, model.meta)
        except AudioError as e:
            failed += report_failure(f, e)
            continue
        print(f"{f}\t{decode(x) if x.shape[0] else ''}")
    return finish(failed, len(args.sound_files))


def report_failure(path: Path, error: Exception) -> int:
    print(f"onnx_decode.py: skipped {path}: {error}", file=sys.stderr)
    return 1


def finish(failed: int, total: int) -> int:
    """Exit status 1 when some files could not be decoded (each was named), as pretrained.py does."""
    if failed:
        print(f"onnx_decode.py: {failed} of {total} file(s) could not be decoded (named above)", file=sys.stderr)
    return 1 if failed else 0


def decode_dynamic(args, d: Path, suffix: str, tokens: Dict[int, str]) -> int:
    probe = Session(d / f"block0{suffix}")
    scorer = args.exit_scorer or ("ctc" if "log_probs" in probe.outputs else "transducer")
    blank = int(probe.meta.get("blank_id", 0))
    transducer = Transducer(d, suffix, tokens, blank) if "transducer" in (scorer, args.method) else None
    climber = Climber(d, suffix, args.exit_strategy, args.exit_threshold, scorer, args.exit_count_blank, args.method,
                      transducer)
    failed = 0
    pending: List[Tuple[Path, np.ndarray]] = []

    def flush() -> None:
        """Climbs what is pending in batches of files of similar length (little padding), printed in order."""
        order = sorted(range(len(pending)), key=lambda i: -pending[i][1].shape[0])
        done: Dict[int, Tuple[int, List[int]]] = {}
        for k in range(0, len(order), args.batch_size):
            rows = order[k:k + args.batch_size]
            done.update(zip(rows, climber.run([pending[i][1] for i in rows])))
        for i, (f, _) in enumerate(pending):
            print(f"{f}\t{to_text(done[i][1], tokens)}")
            print(f"{f}: exit {done[i][0]}", file=sys.stderr)
        pending.clear()

    for f in args.sound_files:  # batches of --batch-size files, printed in the order given
        try:
            x = model_input(f, climber.stem.meta)
            check_length(f, x, climber.stem.meta)
        except AudioError as e:
            flush()
            failed += report_failure(f, e)
            continue
        if x.shape[0] == 0:  # empty or silent: nothing to transcribe, no block runs
            flush()
            print(f"{f}\t")
            print(f"{f}: exit -", file=sys.stderr)
            continue
        pending.append((f, x))
        if len(pending) >= 4 * args.batch_size:  # read ahead, so that batches can be made of similar lengths
            flush()
    flush()
    return finish(failed, len(args.sound_files))


class StreamingRunner:
    """The streaming stem.onnx and block<i>.onnx: one chunk at a time, a state per block, a depth per chunk."""

    def __init__(self, d: Path, suffix: str) -> None:
        self.stem = Session(d / f"stem{suffix}")
        meta = self.stem.meta
        self.T, self.shift = int(meta["T"]), int(meta["decode_chunk_len"])
        self.out_frames = int(meta["out_frames"])
        self.blocks = [Session(d / f"block{i}{suffix}") for i in range(int(meta["num_blocks"]))]
        self.exits = [int(b.meta["exit_layer"]) for b in self.blocks]
        self.outputs = self.blocks[0].outputs
        # a block's state: its inputs after h, but those the stem hands on (the position table)
        self.state_names = [n for n in self.blocks[0].inputs[1:] if n not in self.stem.outputs]

    def init_states(self) -> List[List[np.ndarray]]:
        """Zeros (and every cache slot absent) for a stream that has heard nothing, per block."""
        states = []
        for block in self.blocks:
            st = []
            for i in block.sess.get_inputs():
                if i.name in self.state_names:
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
        stem = self.stem.named({"x": window[None], "embed_state": embed})
        h = stem["h"]
        chosen = None
        for b, block in enumerate(self.blocks):
            if chosen is not None:
                states[b] = self.skip(states[b])
                continue
            outs = block.named({**stem, **dict(zip(self.state_names, states[b])), "h": h})
            states[b] = [outs["new_" + n] for n in self.state_names]
            h = outs["next"]
            last = b == len(self.blocks) - 1 or self.exits[b] == stop_at
            if last or (stop_at is None and decision.stops(
                    strategy, decision.frame_scores(outs["log_probs"], [outs["log_probs"].shape[1]],
                                                    int(block.meta.get("blank_id", 0)),
                                                    tokenless="confident")[strategy][0], threshold)):
                chosen = (self.exits[b], outs)
        return chosen[0], chosen[1], stem["new_embed_state"]


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
        raise SystemExit("onnx_decode.py: per-chunk exits read the CTC posteriors, but these blocks have no CTC head")
    if args.exit_scorer == "transducer":
        raise SystemExit("onnx_decode.py: --streaming reads the CTC heads per chunk; --exit-scorer transducer is "
                         "offline only here (streaming_decode.py and serve.py have it)")
    if args.exit_layer is not None and args.exit_layer not in runner.exits:
        raise SystemExit(f"onnx_decode.py: no exit after layer {args.exit_layer}; exits: {runner.exits}")
    stop_at = (args.exit_layer or runner.exits[-1]) if args.exit_strategy == "fixed" else None
    blank = int(runner.blocks[0].meta.get("blank_id", 0))
    if args.method == "transducer":
        transducer = Transducer(sd, suffix, tokens, blank)
    embed_input = next(i for i in runner.stem.sess.get_inputs() if i.name == "embed_state")
    failed = 0
    for f in args.sound_files:
        try:
            samples = audio(f)
        except AudioError as e:
            failed += report_failure(f, e)
            continue
        feats = stream_features(samples, runner.T, runner.shift)
        states = runner.init_states()
        embed = np.zeros([1 if isinstance(n, str) else n for n in embed_input.shape], dtype=np.float32)
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
                hyp = transducer.greedy(outs["encoder_out"][0], hyp)
        if args.method == "transducer":
            ids = (hyp or [0] * transducer.context)[transducer.context:]
        print(f"{f}\t{to_text(ids, tokens)}")
        print(f"{f}: chunk exits {' '.join(map(str, exits))}", file=sys.stderr)
    return finish(failed, len(args.sound_files))


if __name__ == "__main__":
    sys.exit(main())
