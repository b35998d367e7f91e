"""The error a Tune search raises for bad input or a failed search."""

from __future__ import annotations

__all__ = ["TuneError"]


class TuneError(ValueError):
    """A search problem; ``str(err)`` is one line.

    ``exit_code`` is what the CLI exits with: 2 for bad input (the default), 1 for a search that
    failed or stopped.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
