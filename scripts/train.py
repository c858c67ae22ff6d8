#!/usr/bin/env python3
"""Train a MiniGPT model: `python scripts/train.py --config medium --plot-loss`. See --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minigpt.cli.common import run_subcommand  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_subcommand("train", sys.argv[1:], launcher=None))
