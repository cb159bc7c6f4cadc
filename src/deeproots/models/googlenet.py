"""GoogLeNet (Szegedy et al., 2014) and its root variants (Deep Roots, Tables 6 and 7).

Module names follow torchvision (``conv1``, ``conv2`` = 1x1, ``conv3`` = the paper's conv2
3x3, ``inception3a.branch2.1`` = a 3x3, ``inception3a.branch3.1`` = a 5x5, ``aux1``,
``fc``). Two layouts:

* ``layout="paper"`` (default): the network whose costs Table 6 prints. pool3 and pool4 are
  padded by 1, so inception 4 runs at 15x15 and inception 5 at 8x8; the final 7x7 stride-1
  average pool leaves 2x2x1024 for the classifier; the two auxiliary classifiers (after
  inception 4a and 4d: 5x5/3 average pool, 1x1 conv 128, FC 1024, FC classes) are part of it,
  as is batch norm without scale and bias (Section 4.4). Convs have biases.
* ``layout="standard"``: torchvision's layout (14x14 and 7x7 maps, global average pool,
  4x4 adaptive pool in the auxiliary heads, affine batch norm), with true 5x5 convs where
  torchvision uses 3x3.

In training mode with ``aux_logits=True`` the forward pass returns
``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``, as torchvision does; in eval mode the
logits alone. ``num_classes=0`` builds no classifier and no auxiliary ones: the network
returns its pooled features (4096 in the paper's layout, the 2x2x1024 its FC takes; 1024 in
the standard one).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Mapping, Optional

import torch
from torch import nn

from ..errors import DeeprootsError
from ..checks import check_positive, check_whole
from .head import ClassifierHead, fresh
from .layers import ConvBNAct, InputCheck, apply_groups, init_weights
from .registration import register_variants
from .schedules import merge, resolve, variants

__all__ = ["GoogLeNet", "Inception", "InceptionAux", "GoogLeNetOutputs", "googlenet"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])

LAYOUTS = ("paper", "standard")

# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): Szegedy et al., Table 1.
INCEPTION = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class Inception(nn.Module):
    """Four parallel branches: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp, conv=ConvBNAct):
        super().__init__()
        self.branch1 = conv(cin, c1, 1)
        self.branch2 = nn.Sequential(conv(cin, c3r, 1), conv(c3r, c3, 3))
        self.branch3 = nn.Sequential(conv(cin, c5r, 1), conv(c5r, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1
        )


class InceptionAux(nn.Module):
    """Auxiliary classifier: average pool, 1x1 conv 128, FC 1024, dropout 0.7, FC classes."""

    def __init__(self, cin: int, num_classes: int, pool: nn.Module, pooled: int, conv=ConvBNAct):
        super().__init__()
        self.pool = pool
        self.conv = conv(cin, 128, 1)
        self.fc1 = nn.Linear(128 * pooled * pooled, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class GoogLeNet(ClassifierHead, InputCheck, nn.Module):
    """GoogLeNet with optional filter groups.

    Args:
        num_classes: classifier outputs (0: none, the pooled features).
        in_channels: image channels.
        groups: ``{layer: groups}``, e.g. ``{"conv3": 8, "inception3?.branch2.1": 4}``.
        layout: ``"paper"`` (the costs of Table 6) or ``"standard"`` (torchvision's).
        aux_logits: build the two auxiliary classifiers (default: when there are classes).
        dropout: dropout before the final classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: Optional[Mapping[str, int]] = None,
        layout: str = "paper",
        aux_logits: Optional[bool] = None,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        check_whole("num_classes", num_classes, 0)
        check_positive("in_channels", in_channels)
        if layout not in LAYOUTS:
            raise DeeprootsError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        if aux_logits is None:
            aux_logits = num_classes > 0
        elif aux_logits and not num_classes:
            raise DeeprootsError("aux_logits=True needs classes to predict, and num_classes=0 "
                                 "builds no classifier: give num_classes >= 1 or "
                                 "aux_logits=False")
        paper = layout == "paper"
        self.layout = layout
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        self.default_input_size = (in_channels, 224, 224)
        self._set_input_sizes()

        def conv(cin, cout, k, stride=1):
            return ConvBNAct(cin, cout, k, stride, bias=paper, bn_affine=not paper)

        self.conv1 = conv(in_channels, 64, 7, 2)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(*INCEPTION["3a"], conv=conv)
        self.inception3b = Inception(*INCEPTION["3b"], conv=conv)
        self.maxpool3 = nn.MaxPool2d(3, 2, 1 if paper else 0, ceil_mode=True)
        for name in ("4a", "4b", "4c", "4d", "4e"):
            setattr(self, f"inception{name}", Inception(*INCEPTION[name], conv=conv))
        self.maxpool4 = nn.MaxPool2d(3, 2, 1, ceil_mode=True) if paper else nn.MaxPool2d(
            2, 2, ceil_mode=True
        )
        self.inception5a = Inception(*INCEPTION["5a"], conv=conv)
        self.inception5b = Inception(*INCEPTION["5b"], conv=conv)
        if paper:
            self.avgpool = nn.AvgPool2d(7, 1)
            self.num_features = 1024 * 2 * 2
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.num_features = 1024
        if aux_logits:
            def aux(cin):
                if paper:
                    return InceptionAux(cin, num_classes, nn.AvgPool2d(5, 3, ceil_mode=True),
                                        5, conv)
                return InceptionAux(cin, num_classes, nn.AdaptiveAvgPool2d(4), 4, conv)

            self.aux1 = aux(512)
            self.aux2 = aux(528)
        else:
            self.aux1 = self.aux2 = None
        self.dropout = nn.Dropout(dropout)
        self.fc = self.classifier_for(num_classes)
        init_weights(self.modules())
        self.groups = apply_groups(self, groups)

    def _set_input_sizes(self) -> None:
        if self.layout == "paper":
            # Fixed-size classifiers: the final FC wants the 2x2 left by the 7x7 pool of an 8x8
            # map (inputs 207..238) and the auxiliary FCs a 5x5 pool of a 15..17 map (223..).
            self.min_input_size, self.max_input_size = (223 if self.aux_logits else 207), 238
            self.input_size_hint = "layout='standard' takes any size from 15 pixels"
        else:
            self.min_input_size = 15

    def new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new ``fc`` (see :class:`~deeproots.models.head.ClassifierHead`) and new last
        layers of the auxiliary classifiers, for the same classes; with 0 classes the
        auxiliary classifiers are removed (``aux_logits`` becomes False)."""
        super().reset_classifier(num_classes, global_pool)
        if not self.aux_logits:
            return
        if num_classes:
            for aux in (self.aux1, self.aux2):
                aux.fc2 = fresh(nn.Linear(aux.fc2.in_features, num_classes), aux.fc2)
            return
        self.aux1 = self.aux2 = None
        self.aux_logits = False
        self._set_input_sizes()
        self.record_kwargs(aux_logits=False)

    stage_info = ((64, 2, "conv1"), (192, 4, "conv3"), (480, 8, "inception3b"),
                  (832, 16, "inception4e"), (1024, 32, "inception5b"))
    stage_modules = (("conv1",), ("maxpool1", "conv2", "conv3"),
                     ("maxpool2", "inception3a", "inception3b"),
                     ("maxpool3", *(f"inception4{c}" for c in "abcde")),
                     ("maxpool4", "inception5a", "inception5b"))

    def stages(self, aux: Optional[list] = None):
        """conv1, then conv2-3, inception 3, 4 and 5, each after the pool before it (112,
        56, 28, 15 or 14, 8 or 7 pixels for a 224x224 input, the paper's layout or the
        standard one). With ``aux`` (a list), the auxiliary classifiers' outputs are
        appended to it as inception 4 runs, in training mode."""
        def four(x):
            x = self.inception4a(self.maxpool3(x))
            with_aux = aux is not None and self.training and self.aux_logits
            if with_aux:
                aux.append(self.aux1(x))
            x = self.inception4d(self.inception4c(self.inception4b(x)))
            if with_aux:
                aux.append(self.aux2(x))
            return self.inception4e(x)

        return [self.conv1, lambda x: self.conv3(self.conv2(self.maxpool1(x))),
                lambda x: self.inception3b(self.inception3a(self.maxpool2(x))), four,
                lambda x: self.inception5b(self.inception5a(self.maxpool4(x)))]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pool, flatten, dropout, then ``fc`` (skipped for ``pre_logits``)."""
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor):
        if self.out_indices is not None:  # a backbone: the maps (no classifier, no aux)
            return super().forward(x)
        self.check_input(x)
        aux: list = []
        for stage in self.stages(aux):
            x = stage(x)
        x = self.forward_head(x)
        return GoogLeNetOutputs(x, aux[1], aux[0]) if aux else x


def googlenet(*, variant: str = "orig", groups: Optional[Mapping[str, int]] = None,
              **kwargs) -> GoogLeNet:
    """GoogLeNet (Deep Roots, Section 4.4); ``variant`` is a row of Table 7."""
    return GoogLeNet(groups=merge(resolve("googlenet", variant), groups), **kwargs)


register_variants("googlenet", googlenet, "googlenet", variants("googlenet"))
