"""One error type for everything a user can fix, so the CLI can print it without a traceback."""

from __future__ import annotations

from pathlib import Path


class KstoryError(Exception):
    """A problem the user can act on: what went wrong, where, and how to fix it."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.message if self.path is None else f"{self.path}: {self.message}"]
        if self.fix:
            lines.append(f"fix: {self.fix}")
        return "\n".join(lines)
