"""`minigpt train-classifier`: `minigpt train --stage classify`, under its own name.

Every flag of `minigpt train` works (--config, --resume, --set, --dry-run, ...). With no
--config the run starts from the classify stage's CPU recipe (minigpt/stages/classify.py): a
small model trained from scratch in a few minutes, or fine-tuned from --init-from at a lower
learning rate.
"""

from __future__ import annotations

import sys

from minigpt.cli.common import dash_spellings, run_command
from minigpt.cli.train import train_command
from minigpt.errors import UserInputError

STAGE = "classify"


def stage_given(argv: list[str]) -> str | None:
    """The value of a --stage flag in argv, if there is one."""
    arguments = dash_spellings(argv)
    for position, argument in enumerate(arguments):
        if argument.startswith("--stage="):
            return argument.partition("=")[2]
        if argument == "--stage" and position + 1 < len(arguments):
            return arguments[position + 1]
    return None


@run_command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = stage_given(argv)
    if stage not in (None, STAGE):
        raise UserInputError(f"train-classifier trains --stage {STAGE}; for --stage {stage} use minigpt train.")
    return train_command(["--stage", STAGE, *argv], command="train-classifier")
