"""train.log: what the console showed during a run, with timestamps, kept in the run directory.

The terminal's scrollback is gone once it closes; a run's log file is not. Every line MiniGPT
logs while a run is prepared and trained (progress, evaluations, findings, warnings, errors), and
warnings other libraries log through Python's logging, are appended to `<run>/train.log`, one
line each, prefixed with the local time. A resumed run appends to the same file, so it reads as
one history with the resume in it. Under torchrun only the first process writes it.

The run directory is made only once every input has been checked (a refused run writes
nothing), so the lines logged before that (the tokenizer, the validation split) are held in
memory and written first when the file opens.
"""

from __future__ import annotations

import logging
import sys
from logging.handlers import MemoryHandler
from pathlib import Path

LOG_FILE_NAME = "train.log"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
HELD_LINES = 10_000  # lines held before the file opens; setting a run up logs a few dozen


class RunLog:
    """A handler on the root logger for the lifetime of one run. MiniGPT's own lines reach the
    root logger through propagation, and the root logger passes other libraries' warnings.

        log = RunLog()          hold the lines logged from now on
        log.open(run_dir)       write them to run_dir/train.log, and every later line
        log.close()             stop (an error propagating at that moment is written first)
    """

    def __init__(self) -> None:
        self.held = MemoryHandler(HELD_LINES, flushLevel=logging.CRITICAL + 1)  # never flushes on its own: there is no file yet
        self.held.setLevel(logging.INFO)
        self.file: logging.FileHandler | None = None
        logging.getLogger().addHandler(self.held)

    @property
    def path(self) -> Path | None:
        return Path(self.file.baseFilename) if self.file is not None else None

    def open(self, run_dir: Path) -> None:
        self.file = logging.FileHandler(Path(run_dir) / LOG_FILE_NAME, mode="a", encoding="utf-8")
        self.file.setLevel(logging.INFO)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt=TIME_FORMAT))
        self.held.setTarget(self.file)
        self.held.flush()
        root = logging.getLogger()
        root.removeHandler(self.held)
        root.addHandler(self.file)

    def close(self, last_line: str = "") -> None:
        """Stop writing (or holding), after `last_line` if given (how the run ended, which the
        command prints after training returns). Called while an exception propagates (the run
        ends in an error), the error is written instead: it is the last thing the console showed."""
        root = logging.getLogger()
        root.removeHandler(self.held)
        self.held.close()
        if self.file is None:
            return
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
            self.file.handle(logging.LogRecord("minigpt", logging.ERROR, __file__, 0, "error: %s", (error,), None))
        elif last_line:
            self.file.handle(logging.LogRecord("minigpt", logging.INFO, __file__, 0, "%s", (last_line,), None))
        root.removeHandler(self.file)
        self.file.close()
