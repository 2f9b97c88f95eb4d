#!/usr/bin/env python3
"""Train a Splitformer / Zipformer transducer (+CTC) on data/ as ./prepare.sh left it.

  ./splitformer/train.py --preset NAME --exp-dir exp/NAME --num-epochs 30 --max-duration 200
  ./splitformer/train.py ... --world-size 2              # DDP, processes spawned here
  torchrun --nproc-per-node 2 ./splitformer/train.py ... # DDP under torchrun
  ./splitformer/train.py ... --start-batch 8000           # resume from exp-dir/checkpoint-8000.pt

The logic lives in splitformer.trainer; see --help for every flag.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitformer.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
