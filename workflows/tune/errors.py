"""The error a Tune search raises for bad input or a failed search."""

from __future__ import annotations

from pipeline.errors import UserError

__all__ = ["TuneError"]


class TuneError(UserError, ValueError):
    """A search problem; ``str(err)`` is one line.

    ``exit_code`` is what the CLI exits with: 2 for bad input (the default), 1 for a search that
    failed or stopped.
    """
