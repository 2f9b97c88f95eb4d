"""Entry points: parse flags, start one or several processes, set up logging, train."""
import argparse
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from splitformer.trainer.arguments import parse_args
from splitformer.trainer.distributed import cleanup, launched_by_torchrun, setup
from splitformer.trainer.guards import TrainingError


def setup_logging(exp_dir: Path, rank: int, world_size: int) -> None:
    """Rank 0 logs to the console and exp-dir/log/log-train-<date>; other ranks only warn."""
    root = logging.getLogger()
    teardown_logging()
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}/{world_size}] %(message)s")
    handlers: list = [logging.StreamHandler()]
    if rank == 0:
        (exp_dir / "log").mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        handlers.append(logging.FileHandler(exp_dir / "log" / f"log-train-{stamp}"))
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        h._splitformer = True  # ours to remove: other handlers (e.g. pytest's) stay
        root.addHandler(h)
    root.setLevel(logging.INFO)


def teardown_logging() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_splitformer", False):
            root.removeHandler(h)
            h.close()


def _worker(rank: int, world_size: int, args: argparse.Namespace, local_rank: Optional[int] = None,
            spawned: bool = False) -> None:
    from splitformer.trainer.loop import Trainer

    ctx = setup(rank, world_size, rank if local_rank is None else local_rank, args.device,
                args.master_port if spawned else None)
    try:
        if getattr(args, "num_threads", 0) > 0:
            torch.set_num_threads(args.num_threads)
        elif ctx.distributed and ctx.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        setup_logging(Path(args.exp_dir), rank, world_size)
        if rank == 0:
            logging.info("command: %s", " ".join(sys.argv))
            logging.info("flags: %s", vars(args))
        Trainer(args, ctx).fit()
    finally:
        cleanup(ctx)
        teardown_logging()


def run_training(argv: Optional[Sequence[str]] = None) -> None:
    """Train as ``train.py`` would with these arguments (raises on errors)."""
    args = parse_args(argv)
    Path(args.exp_dir).mkdir(parents=True, exist_ok=True)
    if launched_by_torchrun():
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, int(os.environ["LOCAL_RANK"]))
    elif args.world_size > 1:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(args.world_size, args, None, True), nprocs=args.world_size, join=True)
    else:
        _worker(0, 1, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI wrapper: known failures become one clear line on stderr and exit status 1."""
    from splitformer.trainer import parts

    try:
        run_training(argv)
    except (TrainingError, parts.checkpoint_error()) as e:
        logging.error("%s", e)
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # mp.spawn wraps worker errors; surface the known ones cleanly
        msg = str(e)
        if type(e).__name__ == "ProcessRaisedException" and ("TrainingError" in msg or "CheckpointError" in msg):
            print(f"train.py: error: {msg.strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        raise
    return 0
