"""`minigpt monitor [RUN ...]`: watch runs live, or compare them."""

from __future__ import annotations

import argparse
import sys
import time

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.monitor import compare_runs, find_latest_run, read_run, render_report

CLEAR_SCREEN = "\033[2J\033[H"
LIVE_STATES = ("running", "starting", "stalled")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("monitor"), description="Watch training runs as they go, or compare finished ones.")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run directories (default: the most recent run under --output-dir)")
    add_shared_arguments(parser, "output_dir")
    parser.add_argument("--checkpoints-dir", dest="output_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--once", action="store_true", help="print one report and exit")
    parser.add_argument("--compare", action="store_true", help="print the runs side by side: differing settings, best validation loss")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    parser.add_argument("--width", type=int, default=60, help="width of the loss chart in characters")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.interval <= 0 or arguments.width < 1:
        raise UserInputError("--interval and --width must be positive.")
    runs = arguments.runs or [find_latest_run(arguments.output_dir)]
    if arguments.compare:
        print(compare_runs([read_run(run) for run in runs]))
        return 0
    while True:
        reports = [read_run(run) for run in runs]
        screen = "\n\n".join(render_report(report, arguments.width) for report in reports)
        live = any(report.state in LIVE_STATES for report in reports)
        if arguments.once or not live:
            print(screen)
            return 0
        if sys.stdout.isatty():
            sys.stdout.write(CLEAR_SCREEN)
        print(f"{screen}\n\n(refreshing every {arguments.interval:g} s; Ctrl-C to stop watching, the run goes on)", flush=True)
        time.sleep(arguments.interval)
