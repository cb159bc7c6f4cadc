"""Moved in deeproots 0.2: ``deeproots.registry`` is now :mod:`deeproots.models.registry`, :mod:`deeproots.models.registration`.
This name forwards there for one release, with a DeprecationWarning (CHANGELOG.md)."""
from ._moved import moved

__getattr__, __all__ = moved(__name__, 'models.registry', 'models.registration')
