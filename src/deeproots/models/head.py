"""The classifier and the feature maps of a deeproots network, as timm exposes them.

Every family (NiN, ResNet, GoogLeNet) splits its forward pass in two, with timm's names:
``forward_features(x)`` (the last feature map, before pooling) and ``forward_head(x,
pre_logits=False)`` (pooling and the classifier; ``pre_logits=True`` stops before the
classifier and returns the ``num_features`` pooled features). ``get_classifier()`` returns
the classifier, ``reset_classifier(num_classes)`` puts a new one in its place (He-initialised,
on the old one's device and dtype), and ``num_classes=0`` (when building or resetting) leaves
no classifier: the network returns its pooled features.

A reset is recorded in ``model.deeproots_cfg`` (the arguments a checkpoint rebuilds the model
with), so a model trained after a reset saves and loads as what it now is.

The feature maps: a family's forward pass is a list of stages (:meth:`ClassifierHead.stages`),
each ending where the map is about to be downsampled; ``model.feature_info`` says each one's
channels, reduction (its stride from the input, nominal) and module, and
``forward_intermediates(x, indices)`` returns their outputs. ``create_model(name,
features_only=True, out_indices=(...))`` builds a backbone whose forward pass returns those
maps (a list; no classifier), for detection and segmentation heads. Plain Python over the
stages, no hooks: it traces, compiles and exports as the network does.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import check_whole
from ..errors import DeeprootsError
from .layers import init_weights

__all__ = ["ClassifierHead", "FeatureInfo", "fresh"]


class FeatureInfo(list):
    """Each feature map's ``num_chs``, ``reduction`` and ``module`` (a list of dicts, as
    timm's ``feature_info``), with timm's accessors."""

    def channels(self) -> List[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> List[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> List[str]:
        return [f["module"] for f in self]


def fresh(new: nn.Module, like: Optional[nn.Module]) -> nn.Module:
    """``new`` He-initialised, on the device and dtype of ``like``'s first parameter."""
    init_weights(new.modules())
    param = next(iter(like.parameters()), None) if like is not None else None
    if param is not None:
        new.to(device=param.device, dtype=param.dtype)
    return new


class ClassifierHead:
    """Mixin: timm's classifier and feature API over a family's stages and head.

    Subclasses set ``classifier_name`` (the attribute holding the classifier),
    ``num_features``, ``num_classes``, ``stage_info`` and ``stage_modules``, and define
    ``stages()``, ``forward_head`` and ``new_classifier(num_classes)`` (a classifier of
    ``num_classes >= 1`` outputs); the forward pass, the features, the intermediates, the
    resets and the backbones come from here.
    """

    classifier_name: str = "fc"
    num_features: int
    num_classes: int
    stage_info: Tuple[Tuple[int, int, str], ...] = ()  # (channels, reduction, module) a stage
    stage_modules: Tuple[Tuple[str, ...], ...] = ()  # the modules each stage alone runs
    out_indices: Optional[Tuple[int, ...]] = None  # set: a backbone returning these maps

    def stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:  # pragma: no cover
        """The forward pass up to the classifier, as functions run one after the other."""
        raise NotImplementedError

    @property
    def feature_info(self) -> FeatureInfo:
        """Every stage's map (a backbone's: the maps it returns)."""
        picked = range(len(self.stage_info)) if self.out_indices is None else self.out_indices
        return FeatureInfo({"num_chs": self.stage_info[i][0], "reduction": self.stage_info[i][1],
                            "module": self.stage_info[i][2], "index": i} for i in picked)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map, before the pooling and the classifier (a backbone's: its last
        stage's)."""
        self.check_input(x)
        for stage in self.stages()[:len(self.stage_info)]:
            x = stage(x)
        return x

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Union[None, int, Sequence[int]] = None,
                              stop_early: bool = False, intermediates_only: bool = False):
        """The maps of the stages ``indices`` (default all; an int ``n``: the last ``n``;
        negative indices count from the end), as timm's: ``(last map, [maps])``, or the maps
        alone with ``intermediates_only``; ``stop_early`` runs no stage after the last one
        asked for (then the first item is that stage's map)."""
        picked = self._indices(indices)
        self.check_input(x)
        maps = []
        last = max(picked) if (stop_early or intermediates_only) else len(self.stage_info) - 1
        for i, stage in enumerate(self.stages()[:last + 1]):
            x = stage(x)
            if i in picked:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def _indices(self, indices) -> List[int]:
        n = len(self.stage_info)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 1 <= indices <= n:
                raise DeeprootsError(f"indices={indices} asks for the last {indices} of "
                                     f"{n} feature maps; accepted: 1 to {n}, or a list of "
                                     f"stage numbers 0 to {n - 1}")
            return list(range(n - indices, n))
        picked = list(indices) if isinstance(indices, (list, tuple)) else [indices]
        bad = [i for i in picked if isinstance(i, bool) or not isinstance(i, int)
               or not -n <= i < n]
        if bad or not picked:
            raise DeeprootsError(f"feature map indices must be stage numbers 0 to {n - 1} (or "
                                 f"-{n} to -1); got {indices!r}")
        return sorted({i % n for i in picked})

    @property
    def pretrained_cfg(self) -> dict:
        """What timm's ``resolve_data_config(model=...)`` reads to prepare images for this
        network: ``input_size``, ``num_classes``, ``first_conv``, ``classifier``, and, for a
        model loaded from a deeproots checkpoint (``trained_on``: the data of its run), the
        ``mean`` and ``std`` its inputs were normalised with (on timm's 0..1 scale), the
        interpolation and the centre crop of its evaluation. A model not trained here says
        nothing of them (timm then takes ImageNet's). A value set (as timm's builders set
        it) is kept and returned instead."""
        if getattr(self, "_pretrained_cfg", None) is not None:
            return self._pretrained_cfg
        cfg = {"architecture": getattr(self, "name", type(self).__name__),
               "num_classes": self.num_classes, "input_size": tuple(self.default_input_size),
               "first_conv": next((n for n, m in self.named_modules()
                                   if isinstance(m, nn.Conv2d)), None),
               "classifier": self.classifier_name}
        data = getattr(self, "trained_on", None)
        if isinstance(data, dict) and data.get("mean") and data.get("std"):
            folder = str(data.get("name", "")).startswith("imagefolder:")
            cfg.update(mean=tuple(m / 255 for m in data["mean"]),
                       std=tuple(v / 255 for v in data["std"]), interpolation="bilinear",
                       crop_pct=data.get("crop_fraction", 0.875 if folder else 1.0),
                       trained_on=data.get("name"))
            if data.get("image_size"):
                size = int(data["image_size"])
                cfg["input_size"] = (int(data.get("in_channels", self.in_channels)), size, size)
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict) -> None:
        self._pretrained_cfg = value

    default_cfg = pretrained_cfg  # timm's older name

    def set_features_only(self, out_indices: Union[None, int, Sequence[int]] = None) -> None:
        """Make this network a backbone: its forward pass returns the maps of the stages
        ``out_indices`` (default all) as a list, and it has no classifier; the stages after
        the last one asked for are dropped (their modules become ``nn.Identity``), as timm
        drops them."""
        picked = self._indices(out_indices)
        if self.num_classes:
            self.reset_classifier(0)
        kept = max(picked) + 1
        for names in self.stage_modules[kept:]:
            for name in names:
                setattr(self, name, nn.Identity())
        self.stage_info = self.stage_info[:kept]
        self.out_indices = tuple(picked)
        self.record_kwargs(features_only=True, out_indices=list(picked))

    def forward(self, x: torch.Tensor):
        if self.out_indices is not None:
            return self.forward_intermediates(x, list(self.out_indices), intermediates_only=True)
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
        if self.out_indices is not None and num_classes:
            raise DeeprootsError(f"a backbone (features_only) returns feature maps and has no "
                                 f"classifier to reset to {num_classes} classes; build the "
                                 f"network without features_only for one")
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
