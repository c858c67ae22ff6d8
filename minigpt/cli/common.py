"""What every command shares: one-line errors, logging through the progress bar, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn

from tqdm import tqdm

from minigpt.errors import UserInputError

USAGE_ERROR = 2  # the conventional exit status for a bad command line or bad input


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


class TqdmHandler(logging.Handler):
    """Print log records above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(verbose: bool = False) -> None:
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("minigpt")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def run_command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's main: user mistakes become one line on stderr and exit status 2."""

    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserInputError as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR
        except KeyboardInterrupt:
            print("Interrupted.", file=sys.stderr)
            return 130

    return wrapped
