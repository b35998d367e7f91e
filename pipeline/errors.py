"""The base of every error meant for the user rather than for a traceback.

Each subclass (``ConfigError``, ``DataError``, the workflow errors...) says what went wrong in one
line naming the culprit; the ``contrastive`` command line catches :class:`UserError` alone and
prints ``error: <first line>`` with :attr:`UserError.exit_code`. Subclasses keep their builtin
base as well (``ValueError``, ``RuntimeError``), so code catching those still catches them.
"""

from __future__ import annotations

__all__ = ["EXIT_USAGE", "UserError", "first_line"]

#: The exit code of bad input (a wrong value, an unknown run): the default of every user error.
EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can act on; ``str(err)`` is one line. ``exit_code``: what the command
    line exits with (:data:`EXIT_USAGE` unless given)."""

    exit_code: int = EXIT_USAGE

    def __init__(self, *args: object, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """The first line of ``str(err)`` (stripped), else the error's type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
