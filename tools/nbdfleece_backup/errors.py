"""The one exception the command line turns into a message and an exit status."""

from __future__ import annotations


class BackupError(Exception):
    """A failure the operator can act on; ``str()`` says what happened and why.

    ``status`` is the exit status: 1 for a failed operation, 2 for bad usage
    or a folder that is not what the command expects.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
