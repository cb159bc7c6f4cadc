"""Moved in deeproots 0.2: ``deeproots.finetune`` is now :mod:`deeproots.conversion.checkpoint`.
This name forwards there for one release, with a DeprecationWarning (CHANGELOG.md)."""
from ._moved import moved

__getattr__, __all__ = moved(__name__, 'conversion.checkpoint', 'conversion.calibrate.pipeline')
