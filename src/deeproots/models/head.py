"""The classifier of a deeproots network, as timm exposes it.

Every family (NiN, ResNet, GoogLeNet) splits its forward pass in two, with timm's names:
``forward_features(x)`` (the last feature map, before pooling) and ``forward_head(x,
pre_logits=False)`` (pooling and the classifier; ``pre_logits=True`` stops before the
classifier and returns the ``num_features`` pooled features). ``get_classifier()`` returns
the classifier, ``reset_classifier(num_classes)`` puts a new one in its place (He-initialised,
on the old one's device and dtype), and ``num_classes=0`` (when building or resetting) leaves
no classifier: the network returns its pooled features.

A reset is recorded in ``model.deeproots_cfg`` (the arguments a checkpoint rebuilds the model
with), so a model trained after a reset saves and loads as what it now is.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..checks import check_whole
from ..errors import DeeprootsError
from .layers import init_weights

__all__ = ["ClassifierHead", "fresh"]


def fresh(new: nn.Module, like: Optional[nn.Module]) -> nn.Module:
    """``new`` He-initialised, on the device and dtype of ``like``'s first parameter."""
    init_weights(new.modules())
    param = next(iter(like.parameters()), None) if like is not None else None
    if param is not None:
        new.to(device=param.device, dtype=param.dtype)
    return new


class ClassifierHead:
    """Mixin: timm's classifier API over a family's ``forward_features``/``forward_head``.

    Subclasses set ``classifier_name`` (the attribute holding the classifier),
    ``num_features`` and ``num_classes``, and define ``forward_features``, ``forward_head``
    and ``new_classifier(num_classes)`` (a classifier of ``num_classes >= 1`` outputs).
    """

    classifier_name: str = "fc"
    num_features: int
    num_classes: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def new_classifier(self, num_classes: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def classifier_for(self, num_classes: int) -> nn.Module:
        """A classifier of ``num_classes`` outputs, or ``nn.Identity()`` for 0 (no classifier)."""
        return self.new_classifier(num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The classifier module (``nn.Identity()`` when the network has none)."""
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a new one of ``num_classes`` outputs (0: none, the
        network returns its pooled features). ``global_pool``: None or ``"avg"``, the one
        pooling deeproots' networks have."""
        check_whole("num_classes", num_classes, 0)
        if global_pool not in (None, "avg"):
            raise DeeprootsError(f"global_pool must be None or 'avg' (deeproots' networks pool "
                                 f"by the average); got {global_pool!r}")
        old = self.get_classifier()
        if next(iter(old.parameters()), None) is None:  # none now: like the rest of the model
            old = self
        setattr(self, self.classifier_name, fresh(self.classifier_for(num_classes), old))
        self.num_classes = num_classes
        self.record_kwargs(num_classes=num_classes)

    def record_kwargs(self, **kwargs) -> None:
        """Note ``kwargs`` in the arguments a checkpoint rebuilds this model with."""
        cfg = getattr(self, "deeproots_cfg", None)
        if isinstance(cfg, dict) and isinstance(cfg.get("kwargs"), dict):
            cfg["kwargs"].update(kwargs)
