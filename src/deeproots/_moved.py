"""The old module names of deeproots 0.1 (``deeproots.train``, ``deeproots.calibration``,
...), kept for one release: each forwards to where its contents now live, with a
DeprecationWarning naming the new place (CHANGELOG.md lists every move)."""
from __future__ import annotations

import warnings
from importlib import import_module
from typing import Callable, List, Tuple

__all__ = ["moved"]


def moved(old: str, *new: str) -> Tuple[Callable[[str], object], List[str]]:
    """For the module ``old`` (its ``__name__``), now split over the modules ``new``
    (dotted, under ``deeproots``): warns once, and returns the module's ``__getattr__``
    and ``__all__``, which forward to the new modules."""
    places = ", ".join(f"deeproots.{n}" for n in new)
    warnings.warn(f"{old} moved to {places}; import from there (the old name goes in the "
                  f"next release)", DeprecationWarning, stacklevel=3)
    modules = [import_module(f"deeproots.{n}") for n in new]

    def forward(name: str) -> object:
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to "
                             f"{places})")

    names = list(dict.fromkeys(n for m in modules for n in getattr(m, "__all__", ())))
    return forward, names
