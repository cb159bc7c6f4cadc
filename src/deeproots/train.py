"""Moved in deeproots 0.2: ``deeproots.train`` is now :mod:`deeproots.training.loop`, :mod:`deeproots.training.checkpoint`.
This name forwards there for one release, with a DeprecationWarning (CHANGELOG.md)."""
from ._moved import moved

__getattr__, __all__ = moved(__name__, 'training.loop', 'training.checkpoint')
