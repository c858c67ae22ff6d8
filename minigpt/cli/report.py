"""`minigpt report RUN [RUN ...]`: the report card of a run, or several runs side by side.

One run: report.md and report.html in its run directory, one section per run of its chain (the
runs it started from with --init-from, back to pretraining). Several: comparison.md and
comparison.html in --output. The page is built by minigpt/report.py.
"""

from __future__ import annotations

from minigpt.cli.common import ArgumentParser, program_name, run_command
from minigpt.report import write_comparison, write_report


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("report"), description=(
        "Write a run's report card (report.md and report.html in its run directory): its chain of stages, command line, "
        "environment, data, tokenizer, model, time, throughput, losses, evaluations, curves and samples. "
        "With several runs, compare them side by side."))
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (under checkpoints/)")
    parser.add_argument("--output", default=".", metavar="DIR", help="where a comparison of several runs goes (default: here)")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if len(arguments.runs) == 1:
        written = write_report(arguments.runs[0])
    else:
        written = write_comparison(arguments.runs, arguments.output)
    for path in written:
        print(f"wrote {path}")
    return 0
