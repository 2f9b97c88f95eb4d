#!/usr/bin/env python3
"""Export a trained model to ONNX (one encoder per exit, shared decoder/joiner; per-block and streaming forms) and/or
pretrained.pt. ``--help`` lists the flags; splitformer/export/ holds the code."""
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as ./splitformer/export.py

from splitformer.export.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
