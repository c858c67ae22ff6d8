"""The exceptions whose message a user sees as it is: mistakes a user can fix, and failed runs.

Library code raises `UserInputError` with one plain sentence that says what is wrong and how to
fix it; the scripts print that sentence (no traceback) and exit with status 2. `RunFailure` is
the same for a run that failed on good input, with status 1.
"""


class UserInputError(Exception):
    """A bad flag, file, data line or configuration: the message is shown to the user as is."""

    exit_status = 2  # what the command exits with


class RunFailure(UserInputError):
    """The input was fine and the run failed (a full disk, a process out of memory under torchrun):
    exit status 1, like a run stopped by NaN losses. The sentence says how to continue it."""

    exit_status = 1
