"""What every command shares: the parser, the shared flags, logging through the progress bar,
exit codes, and naming the command the way the user typed it."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from tqdm import tqdm

from minigpt.cli import ALIASES, COMMANDS
from minigpt.config import CHOICES
from minigpt.distributed import is_distributed, lost_another_process, process_place
from minigpt.errors import RunFailure, UserInputError
from minigpt.files import NOT_WRITABLE_ERRNOS

USAGE_ERROR = 2  # the conventional exit status for a bad command line or bad input

# How the user started the program: "minigpt", "python -m minigpt", or None for scripts/*.py.
_launcher: str | None = "minigpt"


def program_name(command: str) -> str:
    """`command` as the user would type it, in the style they used to start this one:
    `minigpt generate`, `python -m minigpt generate` or `python scripts/generate.py`."""
    if _launcher is not None:
        return f"{_launcher} {command}"
    return f"python {Path(sys.argv[0]).parent / COMMANDS[command].script}"


def run_subcommand(command: str, argv: Sequence[str] | None = None, launcher: str | None = "minigpt") -> int:
    """Run one of `COMMANDS` or `ALIASES` (its module is imported only now, so `minigpt --help` stays fast)."""
    global _launcher
    _launcher = launcher
    module = importlib.import_module(COMMANDS[ALIASES.get(command, command)].module)
    return module.main(None if argv is None else list(argv))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with three changes every command wants:

    - a bad flag is reported in one line (no usage dump) with exit status 2;
    - flags are never abbreviated (`--lr` must not silently mean `--lr-scheduler`);
    - `--learning_rate` is read as `--learning-rate`: the underscore spellings people bring from
      Hugging Face and nanoGPT work for every multiword flag, without cluttering --help.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(dash_spellings(args), namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


def dash_spellings(argv: Sequence[str]) -> list[str]:
    """`--max_steps=5` -> `--max-steps=5`: underscores in a flag's name (not in its value) become dashes."""
    converted = []
    for position, argument in enumerate(argv):
        if argument == "--":  # everything after a bare -- is a value
            return converted + list(argv[position:])
        if argument.startswith("--"):
            name, equals, value = argument.partition("=")
            argument = name.replace("_", "-") + equals + value
        converted.append(argument)
    return converted


# The flags several commands share, defined once so that the same thing has the same name, help
# and choices everywhere. Commands pick the ones they need with `add_shared_arguments`.
SHARED_ARGUMENTS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "model": (("model",), dict(help="a final_model/ directory (a LoRA run's adapter included), a checkpoint_step_<N>/ directory, "
                                    "a run directory (its final_model/, else its latest checkpoint), or a Hugging Face Llama, Qwen2, Qwen3 or Gemma 3 folder")),
    "data_files": (("--data-files",), dict(nargs="+", metavar="PATH", help="data: .jsonl/.txt files, directories or globs")),
    "text_field": (("--text-field",), dict(default="text", metavar="NAME", help="the JSONL field holding the text")),
    "output_dir": (("--output-dir",), dict(default="checkpoints", metavar="DIR", help="the folder of runs")),
    "run_name": (("--run-name",), dict(metavar="NAME", help="name of the run's directory under --output-dir")),
    "device": (("--device",), dict(default="auto", choices=CHOICES["train.device"], help="where to compute (auto: cuda, then mps, then cpu)")),
    "dtype": (("--dtype",), dict(default="auto", choices=CHOICES["train.dtype"], help="precision of the computation")),
    "seed": (("--seed",), dict(type=int, help="random seed")),
}


def add_shared_arguments(parser: argparse._ActionsContainer, *names: str, **overrides: dict[str, Any]) -> None:
    """Add the named `SHARED_ARGUMENTS` to a parser or argument group.

    `overrides` change a flag's settings for one command, e.g. `data_files={"required": True}`.
    """
    for name in names:
        flags, settings = SHARED_ARGUMENTS[name]
        parser.add_argument(*flags, **{**settings, **overrides.get(name, {})})


class TqdmHandler(logging.Handler):
    """Print log records above the progress bar instead of through it.

    The bar is drawn on stderr and log lines go to stdout; on a terminal both land on the same
    screen line, so the bar is cleared, the line printed (and flushed, in case stdout is a pipe),
    and the bar redrawn below it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            with tqdm.external_write_mode(file=sys.stdout):
                sys.stdout.write(message + "\n")
                sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never crash the program
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Route every console message through `TqdmHandler`: MiniGPT's log (INFO and up), other
    libraries' warnings, and Python `warnings.warn` calls. Without this, a message logged before
    or outside a command's own setup falls back to Python's bare stderr printer and lands in the
    middle of a progress bar."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors only
    logging.getLogger("minigpt").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def print_error(error: UserInputError) -> None:
    """`error: ...` on stderr, said once where torchrun runs several processes.

    A mistake found before the processes joined (a flag, the configuration, a missing file) is
    found alike by every process of a machine: its first process (LOCAL_RANK 0) says it. One found
    after they joined can be one process's own (its share of the data, its memory): that process
    says it, marked with its rank, and exits; torchrun then stops the others.
    """
    place = process_place()
    if is_distributed() or place.local_rank == 0:
        marker = f"[rank {place.rank}] " if place.rank else ""
        print(f"{marker}error: {error}", file=sys.stderr)


def run_command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's main: logging goes through the progress bar from the first line on, and
    user mistakes become one line on stderr and exit status 2, a path the file system refuses (no
    permission, a read-only mount) among them. Under torchrun, a process that finds another gone
    (it failed, with its own message) says so in one line, not a traceback."""

    def wrapped(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except UserInputError as error:
            print_error(error)
            return error.exit_status
        except OSError as error:
            if error.errno not in NOT_WRITABLE_ERRNOS or not error.filename:
                raise
            refused = UserInputError(f"Cannot use {error.filename}: {error.strerror.lower()}; check its permissions or choose another location.")
            print_error(refused)
            return refused.exit_status
        except KeyboardInterrupt:
            print("Interrupted.", file=sys.stderr)
            return 130
        except RuntimeError as error:
            if not (is_distributed() and lost_another_process(error)):
                raise
            failure = RunFailure("Another process of this run stopped (its message says why), so this one stops too; "
                                 "continue from the last checkpoint with --resume.")
            print_error(failure)
            return failure.exit_status

    return wrapped
