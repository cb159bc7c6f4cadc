"""deeproots' own errors: one family, so that a caller (and the command line) can tell bad
input from a defect. Torch-free.

Every error deeproots raises on purpose, for input it cannot take, is a
:class:`DeeprootsError` of one line: what was wrong, the value given and what is accepted.
It subclasses ``ValueError``, so ``except ValueError`` keeps working. The command line
prints a ``DeeprootsError`` as ``deeproots CMD: error: ...`` (exit status 2); anything else
that escapes is a bug, printed with its traceback and a request to report it.
"""
from __future__ import annotations

__all__ = ["DeeprootsError", "GroupsError", "CheckpointError", "DataError", "RunFolderError",
           "first_line"]


class DeeprootsError(ValueError):
    """Input deeproots cannot take (settings, files, models, data), said in one line."""


class GroupsError(DeeprootsError):
    """A groups mapping that cannot be applied to a model."""


class CheckpointError(DeeprootsError):
    """A checkpoint that cannot be read or does not fit."""


class DataError(DeeprootsError):
    """Data that is missing, corrupt or not in the expected format."""


class RunFolderError(DeeprootsError):
    """A run folder (or a file in it) that cannot be used as asked: in use by another
    process, holding a run that was not named, or a run's own file as an output."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``err``'s message (at most ``limit`` characters), or its
    type's name: how a wrapped error from torch or a user's code is quoted in one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__
