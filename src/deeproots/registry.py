"""The model registry, timm-style: ``create_model("nin-root-8")`` and ``list_models("nin*")``.

A model is registered next to its definition (``models/nin.py`` etc.) with
:func:`register_model`; importing :mod:`deeproots` imports every model file.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows of one name: the builder and the arguments it is called with."""

    name: str
    builder: Callable[..., nn.Module]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    family: str = ""
    variant: str = "orig"
    paper: str = ""


_REGISTRY: Dict[str, ModelEntry] = {}


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _normalise(name: str) -> str:
    # timm users type underscores; our names use the paper's hyphens.
    return name.strip().lower().replace("_", "-")


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    family: str = "",
    paper: str = "",
    **kwargs: Any,
) -> None:
    """Register ``builder(**kwargs)`` under ``name`` (unique). ``family`` and ``paper`` (the
    table that reports it) are for listings; ``kwargs["variant"]`` names the schedule row."""
    name = _normalise(name)
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is already registered")
    variant = kwargs.get("variant", "orig")
    _REGISTRY[name] = ModelEntry(name, builder, dict(kwargs), family, variant, paper)


def list_models(pattern: str = "*") -> List[str]:
    """Registered model names matching a shell-style ``pattern``, in natural order
    (``root-8`` before ``root-16``)."""
    pattern = _normalise(pattern)
    return sorted((n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return _normalise(name) in _REGISTRY


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a ValueError naming the closest names if unknown."""
    key = _normalise(name) if isinstance(name, str) else name
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(key), list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} `deeproots list` (or deeproots.list_models()) "
            f"shows all {len(_REGISTRY)} names."
        )
    return _REGISTRY[key]


def _accepted_kwargs(entry: ModelEntry) -> List[str]:
    # The builder's own keywords, and (through **kwargs) those of the class it returns.
    names = []
    for fn in (entry.builder, typing.get_type_hints(entry.builder).get("return")):
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
    return [n for n in names if n not in ("self", "layers") and n not in entry.kwargs]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name, e.g. ``create_model("nin-root-8", num_classes=10)``.

    Keyword arguments go to the family's constructor (``num_classes``, ``in_channels``,
    ``groups`` for per-layer overrides, ...). The model carries ``model.name`` and
    ``model.deeproots_cfg`` (name and arguments), which checkpoints use to rebuild it.
    """
    entry = model_entry(name)
    accepted = _accepted_kwargs(entry)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"bad arguments for {entry.name}: {', '.join(map(repr, unknown))}. Accepted "
            f"keyword arguments: {', '.join(accepted)}"
        )
    model = entry.builder(**{**entry.kwargs, **kwargs})
    model.name = entry.name
    model.deeproots_cfg = {"name": entry.name, "kwargs": dict(kwargs)}
    return model
