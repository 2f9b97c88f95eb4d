"""Command-line flags that decode.py and streaming_decode.py share (icefall's names), and the checks on them
that do not need the model."""
import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from splitformer.decoding.exits import SCORERS, STRATEGIES
from splitformer.decoding.search import METHODS
from splitformer.utils import str2bool


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exp-dir", type=Path, required=True, help="where epoch-N.pt are; results go under it")
    p.add_argument("--epoch", type=int, default=0, help="decode with epoch-<epoch>.pt (the last averaged epoch)")
    p.add_argument("--iter", type=int, default=0, help="decode with checkpoint-<iter>.pt instead (and the avg-1 before it)")
    p.add_argument("--avg", type=int, default=1, help="average epochs epoch-avg+1..epoch")
    p.add_argument("--use-averaged-model", action="store_true",
                   help="use the running average model_avg between the ends of epochs epoch-avg and epoch (icefall's method)")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exit-layer", type=str, default=None,
                   help="layer whose exit decodes; 'all' decodes every exit in one encoder pass; default: the last exit")
    p.add_argument("--decoding-method", type=str, default="greedy_search", choices=METHODS)
    p.add_argument("--beam-size", type=int, default=4)


def add_exit_arguments(p: argparse.ArgumentParser, per: str = "utterance") -> None:
    """Dynamic exits; ``per`` says what each decision is made for (an utterance, or a chunk of a stream)."""
    p.add_argument("--exit-strategy", type=str, default="fixed", choices=STRATEGIES,
                   help=f"entropy/confidence/posterior: climb the exits and stop at the first confident one (per {per})")
    p.add_argument("--exit-threshold", type=str, default=None,
                   help="entropy: exit when mean frame entropy (nats) < T; confidence: exit when mean max posterior > T; "
                        "posterior: exit when the best of the N-best has posterior > T (paper 1's)"
                        + ("; 'sweep': simulate many thresholds for every criterion from one pass over all exits"
                           if per == "utterance" else ""))
    p.add_argument("--exit-nbest", type=int, default=4,
                   help="N of the beam (CTC prefix beam, or the transducer's modified beam) whose scores the "
                        "posterior criterion normalises over")
    p.add_argument("--exit-scorer", type=str, default=None, choices=list(SCORERS),
                   help="what the criteria read at each exit: its CTC head (default when the model has one) or its "
                        "transducer (greedy-path posteriors, blank included; modified-beam N-best for posterior)")
    if per == "utterance":
        p.add_argument("--exit-count-blank", type=str2bool, default=True,
                       help="entropy/confidence: average over every frame (true) or only over the frames whose best "
                            "symbol is a token (false). Either way an exit whose best path holds no token climbs on")
    p.add_argument("--exit-budget-macs", type=float, default=None,
                   help="mean MACs per second of audio the dynamic exits may spend (the encoder up to each exit and "
                        "the criterion at every exit scored); the --exit-strategy threshold is chosen on --budget-set to "
                        "meet it with the lowest WER")
    if per == "utterance":
        p.add_argument("--exit-budget-rtf", type=float, default=None,
                       help="the same for the decoding real-time factor on this machine (encoder, criterion and "
                            "search): simulated from a pass over --budget-set, then checked by decoding --budget-set "
                            "with the chosen threshold as the test sets are decoded")
    p.add_argument("--budget-set", type=str, default="dev", help="the set on which a budget's threshold is chosen")


def add_chunk_arguments(p: argparse.ArgumentParser, streaming: bool) -> None:
    """--chunk-size and --left-context-frames: what streaming runs with (``streaming``), or the chunk mask
    that a whole-utterance decode simulates it with."""
    what = ("the chunk each step decodes" if streaming else
            "decode the whole utterance with the chunk mask of a stream with this chunk (the simulated streaming "
            "result, equal to streaming_decode.py's); -1: full context")
    p.add_argument("--chunk-size", type=int, default=16 if streaming else -1,
                   help=f"{what}; frames after the front end: 20 ms each with a conv2d front end, 40 ms with conv1d")
    p.add_argument("--left-context-frames", type=int, default=64 if streaming else -1,
                   help="frames of left context every layer keeps (same unit); a multiple of --chunk-size"
                        + ("" if streaming else "; -1: all"))


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=str, default="an4", help="recipe name in splitformer.data.recipes.DATASETS")
    p.add_argument("--test-sets", type=str, default=None, help="comma list; default: the recipe's test sets")
    p.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--bpe-model", type=Path, default=None, help="default: data/lang_bpe_<vocab size>/bpe.model")
    p.add_argument("--max-duration", type=float, default=200.0, help="seconds of audio per batch")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's default)")


def run_main(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
             argv: Optional[Sequence[str]] = None) -> int:
    """Parse, set up logging and threads, run ``body``; a ``DecodeSetupError`` (something the user must fix) is
    printed as ``<prog>: error: ...`` with exit status 2."""
    import torch

    from splitformer.decoding.loading import DecodeSetupError

    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        return body(args)
    except DecodeSetupError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
