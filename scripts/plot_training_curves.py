#!/usr/bin/env python3
"""Plot training curves: `python scripts/plot_training_curves.py RUN [RUN ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minigpt.cli.common import run_subcommand  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_subcommand("plot", sys.argv[1:], launcher=None))
