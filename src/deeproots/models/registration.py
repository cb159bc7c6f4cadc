"""Registering model names: the table a model family writes itself into, next to its
definition (``register_variants("nin", nin, "nin", variants("nin"))`` at the end of
``models/nin.py``), and :func:`model_name`, the one rule that turns a family and a variant
into a name (``"nin"`` + ``"root-8"`` -> ``"nin-root-8"``; the paper's "orig" is the plain
name). Torch-free. The model files import this module, never the registry that reads the
table (:mod:`deeproots.models.registry`), so the two do not import each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from ..errors import DeeprootsError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelEntry", "register_model", "register_variants", "model_name", "TABLE",
           "normalise", "FAMILY_MODULES"]

TABLE: Dict[str, "ModelEntry"] = {}  # name -> entry, filled as the model files are imported
# the family modules of deeproots.models, imported on the first lookup of a name: a new
# family's file is named here
FAMILY_MODULES = ("nin", "resnet", "googlenet")


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows of one name: the builder and the arguments it is called with."""

    name: str
    builder: Callable[..., "nn.Module"]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    family: str = ""
    variant: str = "orig"

    @property
    def topology(self) -> str:
        """``orig``, ``root``, ``tree`` or ``col``: the variant without its group count."""
        return self.variant.split("-")[0]


def normalise(name: str) -> str:
    # timm users type underscores; our names use the paper's hyphens.
    return name.strip().lower().replace("_", "-")


def model_name(prefix: str, variant: str) -> str:
    """The registered name of a variant: ``model_name("nin", "root-8") == "nin-root-8"``,
    and the paper's ``"orig"`` is the plain ``prefix``."""
    return prefix if variant == "orig" else f"{prefix}-{variant}"


def register_model(name: str, builder: Callable[..., "nn.Module"], *, family: str = "",
                   **kwargs: Any) -> None:
    """Register ``builder(**kwargs)`` under ``name`` (unique). ``family`` is the schedule
    table it reads; ``kwargs["variant"]`` names the row."""
    name = normalise(name)
    if name in TABLE:
        raise DeeprootsError(f"model name {name!r} is already registered")
    variant = kwargs.get("variant", "orig")
    TABLE[name] = ModelEntry(name, builder, dict(kwargs), family, variant)


def register_variants(prefix: str, builder: Callable[..., "nn.Module"], family: str,
                      variants: List[str]) -> None:
    """Register one name per row of a schedule table: ``builder(variant=v)`` as
    :func:`model_name` ``(prefix, v)``."""
    for variant in variants:
        register_model(model_name(prefix, variant), builder, family=family, variant=variant)
