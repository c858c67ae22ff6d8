#!/usr/bin/env python3
"""Plot training curves: `python scripts/plot_training_curves.py --checkpoint-dir RUN [RUN ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minigpt.cli.plot_curves import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
