"""Moved in deeproots 0.2: ``deeproots.costs`` is now :mod:`deeproots.inspection.costs`.
This name forwards there for one release, with a DeprecationWarning (CHANGELOG.md)."""
from ._moved import moved

__getattr__, __all__ = moved(__name__, 'inspection.costs')
