"""Reusable training logic behind ``splitformer/train.py``.

The executable stays thin; everything it does lives here so that tests and other
recipes can drive a training run from Python (``run_training(argv)``).
"""
from splitformer.trainer.arguments import build_parser, parse_args
from splitformer.trainer.launch import main, run_training

__all__ = ["build_parser", "parse_args", "main", "run_training"]
