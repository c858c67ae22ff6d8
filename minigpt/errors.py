"""The one exception type for mistakes a user can fix.

Library code raises `UserInputError` with one plain sentence that says what is wrong and how to
fix it; the scripts print that sentence (no traceback) and exit with status 2.
"""


class UserInputError(Exception):
    """A bad flag, file, data line or configuration: the message is shown to the user as is."""

    exit_status = 2  # what the command exits with; a full disk (minigpt.files.DiskFullError) says 1
