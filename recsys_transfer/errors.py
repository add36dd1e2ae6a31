"""User-facing errors.

Every mistake a user can make with their input (a missing file, a malformed row, an unknown layout, a bad
config key) raises :class:`UserError`. The CLI prints ``str(err)`` on one line and exits with status 2, with
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input or configuration; the message is one line."""


class DataError(UserError):
    """Malformed input data, located as ``path:line: message`` (line is 1-based, optional)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def read_json(path: str | Path, missing: str):
    """Parse a JSON file the project wrote; a missing file or bad JSON is a one-line :class:`UserError`."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
