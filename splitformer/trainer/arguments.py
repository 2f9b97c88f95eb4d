"""Command-line flags of the training executable.

Flags come from four owners: the model (``splitformer.model.config``), the data module,
the optimizer and this trainer.  A flag is added by the first owner that defines it, so
that two parts may both declare e.g. ``--max-duration`` without argparse conflicts.
"""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from splitformer.utils import str2bool

HIDDEN = argparse.SUPPRESS


def has_flag(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions  # argparse keeps no public lookup


def add_flag(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Add ``flag`` unless another part already defined it."""
    if not has_flag(parser, flag):
        parser.add_argument(flag, **kwargs)


def _int_list(text: str) -> List[int]:
    return [int(x) for x in text.replace(",", " ").split()] if text.strip() else []


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser
    add_flag(g, "--exp-dir", type=Path, default=Path("exp"),
             help="Where checkpoints, log/ and tensorboard/ are written.")
    add_flag(g, "--num-epochs", type=int, default=30, help="Train up to and including this epoch.")
    add_flag(g, "--start-epoch", type=int, default=1,
             help="Resume from exp-dir/epoch-(N-1).pt when N > 1.")
    add_flag(g, "--start-batch", type=int, default=0,
             help="Resume mid-epoch from exp-dir/checkpoint-N.pt (takes precedence over --start-epoch).")
    add_flag(g, "--bpe-model", type=Path, default=None,
             help="sentencepiece model (default: <manifest-dir>/../lang_bpe_<N>/bpe.model as ./prepare.sh writes it).")
    add_flag(g, "--seed", type=int, default=42, help="Seed; each epoch reseeds with seed + epoch - 1.")
    # distributed
    add_flag(g, "--world-size", type=int, default=1,
             help="Number of processes train.py spawns (ignored under torchrun, which sets WORLD_SIZE).")
    add_flag(g, "--master-port", type=int, default=12354, help="Rendezvous port for --world-size > 1.")
    add_flag(g, "--find-unused-parameters", type=str2bool, default=True,
             help="DDP's find_unused_parameters: needed when some exits are not trained and by the "
                  "Zipformer's random module skipping (which changes the graph from batch to batch).")
    add_flag(g, "--device", type=str, default="auto",
             help="auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda or cuda:N.")
    add_flag(g, "--num-threads", type=int, default=0,
             help="CPU threads of each process; 0: torch's default (the cores, shared out among DDP ranks). "
                  "1 lets two CPU runs share a 2-core machine without fighting over both cores.")
    # pretrained backbones (--encoder hf)
    add_flag(g, "--backbone-lr-scale", type=float, default=0.1,
             help="--encoder hf: the backbone's learning rate as a fraction of --base-lr (heads, decoder and "
                  "joiner learn at --base-lr)")
    add_flag(g, "--freeze-backbone-steps", type=int, default=0,
             help="--encoder hf: train only the heads, decoder and joiner for the first N updates")
    # speed
    add_flag(g, "--use-fp16", type=str2bool, default=False, help="fp16 autocast + GradScaler (CUDA only).")
    add_flag(g, "--use-bf16", type=str2bool, default=False, help="bf16 autocast (no scaler needed).")
    add_flag(g, "--compile", type=str2bool, default=False, help="Wrap the model in torch.compile.")
    # loss (the loss weights themselves are model flags: splitformer.model.config)
    add_flag(g, "--warm-step", type=int, default=2000,
             help="Batches over which the simple-loss weight goes 1.0 -> --simple-loss-scale "
                  "and the pruned-loss weight 0.1 -> 1.0 (icefall's schedule).")
    add_flag(g, "--schedule-ref-duration", type=float, default=600.0,
             help="Seconds of audio that count as one batch for the Zipformer's dropout/layer-skip schedules "
                  "(icefall: 600). A small corpus with few batches needs less, or its schedules never finish.")
    add_flag(g, "--rnnt-backend", choices=["auto", "torch", "k2", "fast_rnnt"], default="auto",
             help="Where the pruned RNN-T losses run (splitformer.losses.set_backend).")
    # checkpoints and averaging
    add_flag(g, "--save-every-n", type=int, default=4000,
             help="Write exp-dir/checkpoint-B.pt every N batches (0 = never).")
    add_flag(g, "--keep-last-k", type=int, default=30, help="Keep only the newest K checkpoint-B.pt.")
    add_flag(g, "--average-period", type=int, default=200,
             help="Update the running average model every N batches.")
    # guards and diagnostics
    add_flag(g, "--max-bad-batches", type=int, default=20,
             help="Stop after more than N batches with a non-finite loss or gradient (0: stop at the first).")
    add_flag(g, "--print-diagnostics", type=str2bool, default=False,
             help="Train a few batches, report per-module parameter/gradient RMS and abs-max, then exit.")
    add_flag(g, "--diagnostics-batches", type=int, default=4, help="Batches --print-diagnostics looks at.")
    add_flag(g, "--inf-check", type=str2bool, default=False,
             help="Hook every module and raise at the first non-finite activation or gradient.")
    add_flag(g, "--valid-wer", type=str2bool, default=True,
             help="Also decode the dev set greedily at every exit after each epoch and log its WER.")
    add_flag(g, "--log-interval", type=int, default=50, help="Log training loss every N batches.")
    add_flag(g, "--tensorboard", type=str2bool, default=True, help="Write exp-dir/tensorboard.")
    add_flag(g, "--progress-bar", type=str2bool, default=True, help="tqdm bar per epoch (rank 0).")
    # hidden hooks for the tests (crash, NaN and OOM injection)
    add_flag(g, "--debug-kill-after-batch", type=int, default=0, help=HIDDEN)
    add_flag(g, "--debug-nan-batches", type=_int_list, default=[], help=HIDDEN)
    add_flag(g, "--debug-oom-batches", type=_int_list, default=[], help=HIDDEN)
    add_flag(g, "--debug-dump-batches", type=Path, default=None, help=HIDDEN)
    add_flag(g, "--debug-float64", type=str2bool, default=False, help=HIDDEN)
    add_flag(g, "--debug-eval-mode", type=str2bool, default=False, help=HIDDEN)


def build_parser() -> argparse.ArgumentParser:
    """All flags of ``train.py``: model, data, optimizer, then training."""
    from splitformer.model.config import add_model_arguments

    parser = argparse.ArgumentParser(
        description="Train a Splitformer / Zipformer transducer (+CTC) on prepared Lhotse cuts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    _add_part_arguments(parser, "splitformer.data.datamodule", "AsrDataModule")
    _add_part_arguments(parser, "splitformer.optim", None)
    add_training_arguments(parser)
    return parser


def _add_part_arguments(parser: argparse.ArgumentParser, module: str, cls: Optional[str]) -> None:
    """Let another part add its flags, skipping the ones already defined."""
    import importlib

    mod = importlib.import_module(module)
    owner = getattr(mod, cls) if cls else mod
    add = getattr(owner, "add_arguments")
    staging = argparse.ArgumentParser(add_help=False)
    add(staging)
    for action in staging._actions:
        if any(has_flag(parser, s) for s in action.option_strings):
            continue
        parser._add_action(action)


def plain(value: Any) -> Any:
    """Make a flag value loadable with ``torch.load(weights_only=True)``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)  # Path and other objects


def model_args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    """The model flags (``config.MODEL_KEYS``) as plain values; decode rebuilds the model from them."""
    from splitformer.model.config import model_args_dict as from_config

    return {k: plain(v) for k, v in from_config(args).items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from splitformer.model.config import parse_with_preset

    parser = build_parser()
    args = parse_with_preset(parser, list(argv) if argv is not None else None)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.use_fp16 and args.use_bf16:
        parser.error("--use-fp16 and --use-bf16 are exclusive")
    if args.start_epoch < 1:
        parser.error("--start-epoch counts from 1")
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    if args.average_period < 1:
        parser.error("--average-period must be >= 1")
    if args.max_bad_batches < 0:
        parser.error("--max-bad-batches must be >= 0")
