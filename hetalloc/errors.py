"""Errors a user can act on: each names where the problem is and how to fix it."""

from __future__ import annotations


class HetallocError(Exception):
    """Base class for errors that the CLI prints as one line (no traceback)."""


class SpecError(HetallocError, ValueError):
    """A bad input file or argument.

    The message reads ``<source>: <field path>: <what is wrong> — <fix>`` so that the
    user knows which file, which field and what to do.
    """

    def __init__(self, source: str, path: str, problem: str, fix: str = ""):
        self.source, self.path, self.problem, self.fix = source, path, problem, fix
        where = f"{source}: {path}" if path else source
        msg = f"{where}: {problem}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


class InfeasibleError(HetallocError):
    """The request cannot be satisfied (e.g. the model does not fit in memory)."""
