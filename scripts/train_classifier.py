#!/usr/bin/env python3
"""Train classification heads: `python scripts/train_classifier.py --data-files train.jsonl`. See --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minigpt.cli.common import run_subcommand  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_subcommand("train-classifier", sys.argv[1:], launcher=None))
