"""Splitformer: dynamic (early-exit) speech recognition in plain PyTorch."""

__version__ = "0.1.0"
