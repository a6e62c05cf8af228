"""User-facing errors.

Anything the user can fix (a recipe field, a missing file, a value out of range) is raised as a
`UserError`; the CLI prints its one-line message and exits with code 2. Programming errors stay ordinary
exceptions so they are not mistaken for bad input.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or [message]


class RecipeError(UserError):
    """One or more problems in a recipe, each already formatted as `FILE:LINE: field.path: message`."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines[0] if lines else "invalid recipe", lines=lines)


class StageError(UserError):
    """A stage failed for a reason the user can act on (NaN loss, empty dataset, failed reload check)."""
