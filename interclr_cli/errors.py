"""Exceptions that the CLI turns into one-line messages and exit codes.

``UserError`` (exit code 2) is bad input: usage, config, data or checkpoint. ``WorkError``
(exit code 1) is a failure during work, such as a non-finite loss. Messages are one line that
names the problem and the fix.
"""


class InterclrError(Exception):
    exit_code = 1


class UserError(InterclrError):
    """Bad input: usage, config, data or checkpoint (exit code 2)."""

    exit_code = 2


class WorkError(InterclrError):
    """A failure during work, such as a non-finite loss (exit code 1)."""

    exit_code = 1
