"""Moved in deeproots 0.2: ``deeproots.calibration`` is now :mod:`deeproots.conversion.calibrate`.
This name forwards there for one release, with a DeprecationWarning (CHANGELOG.md)."""
from ._moved import moved

__getattr__, __all__ = moved(__name__, 'conversion.calibrate')
