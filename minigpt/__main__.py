"""`python -m minigpt COMMAND ...`: the same as the `minigpt` command, without relying on PATH."""

import sys

from minigpt.cli.main import main

if __name__ == "__main__":
    sys.exit(main(launcher="python -m minigpt"))
