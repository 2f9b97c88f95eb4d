"""``python -m splitformer.export``: the same as ``./splitformer/export.py``."""
from splitformer.export.cli import main

main()
