"""`minigpt plot RUN [RUN ...]`: draw runs' metrics to PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from minigpt.cli.common import ArgumentParser, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.metrics import read_metrics
from minigpt.plots import save_training_curves


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("plot"), description="Plot loss, learning rate, gradient norm and throughput of runs.")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="one or more run directories")
    parser.add_argument("--checkpoint-dir", nargs="+", dest="old_runs", default=[], help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--output", help="the PNG to write (default: <run>/plots/training_curves.png, or ./training_curves.png for several runs)")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    directories = [Path(run) for run in arguments.runs + arguments.old_runs]
    if not directories:
        parser.error("give one or more run directories")
    runs = {}
    for directory in directories:
        rows = read_metrics(directory / "metrics.jsonl")
        if not rows:
            raise UserInputError(f"{directory} has no metrics.jsonl rows to plot; is it a run directory?")
        runs[directory.name if directory.name not in runs else str(directory)] = rows
    if arguments.output:
        output = Path(arguments.output)
    elif len(runs) == 1:
        output = directories[0] / "plots" / "training_curves.png"
    else:
        output = Path("training_curves.png")
    try:
        save_training_curves(output, runs)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    print(f"Saved {output}")
    return 0
