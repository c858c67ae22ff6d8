#!/usr/bin/env python3
"""Front door for minigpt.cli.report; see --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minigpt.cli.common import run_subcommand  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_subcommand("report", sys.argv[1:], launcher=None))
