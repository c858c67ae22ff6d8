"""`minigpt COMMAND ...`: the one entry point; each command is a module listed in `minigpt.cli.COMMANDS`."""

from __future__ import annotations

import sys
from typing import Sequence

from minigpt.version import __version__
from minigpt.cli import ALIASES, COMMANDS
from minigpt.cli.common import ArgumentParser, run_subcommand


def build_parser(prog: str) -> ArgumentParser:
    width = max(map(len, COMMANDS))
    also = {command: alias for alias, command in ALIASES.items()}
    listing = "\n".join(f"  {name:<{width}}  {command.summary}" + (f" (alias: {also[name]})" if name in also else "")
                        for name, command in COMMANDS.items())
    parser = ArgumentParser(
        prog=prog, description="MiniGPT: train, watch, evaluate and sample from small GPT models.",
        epilog=f"commands:\n{listing}\n\n'{prog} COMMAND --help' shows a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"minigpt {__version__}")
    parser.add_argument("command", choices=[*COMMANDS, *ALIASES], metavar="COMMAND", help="one of the commands below")
    return parser


def main(argv: Sequence[str] | None = None, launcher: str = "minigpt") -> int:
    """Parse `minigpt`'s own flags (those before the command), then hand the rest to the command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    split = next((index for index, argument in enumerate(argv) if not argument.startswith("-")), len(argv))
    arguments = build_parser(launcher).parse_args(argv[: split + 1])
    return run_subcommand(arguments.command, argv[split + 1:], launcher)
