"""One error type for everything a user can fix: it names the file, the row and the fix."""

from __future__ import annotations


class CryoforumError(Exception):
    """A problem with the user's input or parameters, printed as one line by the CLI.

    ``path`` and ``row`` (0-based data row, printed 1-based) locate it; ``fix`` says what to do.
    """

    def __init__(self, message: str, *, path=None, row: int | None = None, fix: str | None = None):
        self.message, self.path, self.row, self.fix = message, path, row, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}"
            if self.row is not None:
                where += f", row {self.row + 1}"
            where += ": "
        text = where + self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text
