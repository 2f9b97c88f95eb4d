"""Small helpers shared by the command-line tools."""
import argparse
from typing import Any


def str2bool(v: Any) -> bool:
    """argparse type for icefall-style boolean flags (``--use-ctc true``)."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "yes", "y", "t"):
        return True
    if s in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")
