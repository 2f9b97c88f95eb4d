#!/usr/bin/env python3
"""Serve a causal model for live recognition: a websocket server with per-chunk exits, and a page that shows the
exit every chunk took as it is taken.

    ./splitformer/serve.py --exp-dir exp/streaming/splitformer-cpu-causal --epoch 12 --avg 4 \\
        --use-averaged-model --chunk-size 8 --left-context-frames 64
    # then open the address it prints: speak, or drop an audio file on the page

Each connection chooses a fixed exit, or a criterion (``--strategies``) with a compute budget (a fraction of the
last exit's MACs per second of audio) that the page's slider changes from the next chunk on. A budget becomes a
threshold through the criterion's budget curve, measured at start-up on ``--calibration-utts`` utterances of
``--calibration-set`` by decoding each candidate threshold exactly as the streams are decoded. The protocol is
in ``splitformer/serving/protocol.py``; ``bench/serve_load.py`` measures how many streams the server holds.

The model must be causal (``train.py --causal true``; ``./run.sh --streaming true`` trains one).
"""
import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitformer.decoding.cli import add_checkpoint_arguments, add_chunk_arguments, add_data_arguments, run_main
from splitformer.decoding.exits import SCORED, SCORERS
from splitformer.decoding.loading import DecodeSetupError, apply_chunking, load_model, load_tokenizer, test_cuts
from splitformer.decoding.search import METHODS


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    add_chunk_arguments(p, streaming=True)
    add_data_arguments(p)
    p.add_argument("--decoding-method", type=str, default="greedy_search", choices=METHODS)
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--exit-scorer", type=str, default=None, choices=list(SCORERS),
                   help="what the criteria read at each exit (default: the CTC head when the model has one)")
    p.add_argument("--exit-nbest", type=int, default=4, help="N-best size of the posterior criterion")
    p.add_argument("--strategies", type=str, default="confidence",
                   help=f"comma list of the criteria ({'|'.join(SCORED)}) whose budget curves are measured at "
                        "start-up (clients may still give any criterion a threshold); '' for none")
    p.add_argument("--calibration-set", type=str, default="dev", help="the set the budget curves are measured on")
    p.add_argument("--calibration-utts", type=int, default=40, help="utterances of it used (the first N)")
    p.add_argument("--budget-points", type=int, default=8, help="thresholds tried per budget curve")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--max-streams", type=int, default=64, help="concurrent streams; more are refused")
    p.add_argument("--max-batch", type=int, default=64, help="chunks decoded side by side in one step")
    p.add_argument("--batch-wait-ms", type=float, default=100.0,
                   help="how long a ready chunk waits for other streams' chunks to batch with (adds at most this "
                        "to the delay of a partial result; batches cost far less per chunk)")
    p.add_argument("--endpoint-seconds", type=float, default=1.2,
                   help="a pause (chunks that add no token) after some words that ends an utterance")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("serve.py", get_parser(), _run, argv)


def build_engine(args: argparse.Namespace):
    """The engine (model, decoders, budget curves) that ``args`` describe; also used by bench/serve_load.py."""
    from splitformer.decoding.runner import default_scorer
    from splitformer.decoding.streaming import cut_utterances
    from splitformer.serving.engine import Engine, SettingsError

    model, margs = load_model(args)
    if args.device != "cpu":
        raise DecodeSetupError(f"the server decodes on the CPU; got --device {args.device}")
    chunks = getattr(model.encoder, "chunks", None)
    if chunks is None or not chunks.causal:
        raise DecodeSetupError(f"{args.exp_dir} holds a model that attends to whole utterances; the server streams, "
                               "so it needs a causal one (train.py --causal true; ./run.sh --streaming true --models "
                               "splitformer-cpu-causal trains one)")
    apply_chunking(model, margs, args, streaming=True)
    bpe = args.bpe_model or Path(f"data/lang_bpe_{margs.vocab_size}/bpe.model")
    try:
        engine = Engine(model, load_tokenizer(bpe), args.chunk_size, args.left_context_frames, args.decoding_method,
                        args.beam_size, args.exit_scorer or default_scorer(model), args.exit_nbest, args.max_batch,
                        args.endpoint_seconds, batch_wait=args.batch_wait_ms / 1000)
    except ValueError as e:
        raise DecodeSetupError(str(e)) from None
    strategies = [s for s in args.strategies.split(",") if s]
    if strategies and engine.early_exit:
        cuts = test_cuts(args.manifest_dir, args.dataset, args.calibration_set).subset(first=args.calibration_utts)
        utts = list(cut_utterances(cuts))
        for s in strategies:
            t0 = time.perf_counter()
            try:
                rows = engine.calibrate(s, utts, args.budget_points)
            except SettingsError as e:
                raise DecodeSetupError(f"--strategies: {e}") from None
            logging.info(f"budget curve of {s} on {len(utts)} {args.calibration_set} utterances in "
                         f"{time.perf_counter() - t0:.1f} s: " + ", ".join(
                             f"{r['cost'] / engine.full_cost:.2f} of the compute -> {r['wer']:.1f}%" for r in rows))
    return engine, margs


def _run(args: argparse.Namespace) -> int:
    from splitformer.serving.server import RecognitionServer

    engine, margs = build_engine(args)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per connection
    info = dict(model=str(args.exp_dir), preset=getattr(margs, "preset", None), epoch=args.epoch, avg=args.avg,
                decoding_method=args.decoding_method, scorer=engine.scorer)
    server = RecognitionServer(engine, args.host, args.port, args.max_streams, info=info)

    class Announce:  # told once the server listens
        @staticmethod
        def set() -> None:
            print(f"serving {args.exp_dir} on {server.url}  (open it in a browser; Ctrl-C stops)", flush=True)

    try:
        asyncio.run(server.serve(Announce()))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise DecodeSetupError(f"cannot listen on {args.host}:{args.port}: {e} (choose another --port)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
