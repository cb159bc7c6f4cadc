"""Network-in-Network (Lin et al., 2013) for CIFAR-10 and its root, tree and column variants
(Deep Roots, Table 1, Section 4.2, Table 8).

Layout (Caffe's NiN for CIFAR-10, with the paper's batch norm and no dropout):

    conv1a 5x5 192 -> conv1b 1x1 160 -> conv1c 1x1 96  -> max pool 3/2
    conv2a 5x5 192 -> conv2b 1x1 192 -> conv2c 1x1 192 -> avg pool 3/2
    conv3a 3x3 192 -> conv3b 1x1 192 -> conv3c 1x1 classes -> global avg pool

Pooling uses Caffe's ceil mode (32 -> 16 -> 8), convs have biases, and each conv but the last
is followed by batch norm and ReLU. The last conv gives the class scores directly.
With ``num_classes=0`` there is no conv3c: the network returns the 192 pooled features of
conv3b (timm's convention; ``forward_head(x, pre_logits=True)`` returns the same from a
network that has its classifier: conv3c is linear, so pooling before it changes nothing).
Global pooling lets the network take any input of at least ``min_input_size`` pixels: 28x28
one-channel Fashion-MNIST runs as it is with ``in_channels=1``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ..checks import check_positive, check_whole
from .head import ClassifierHead
from .layers import ConvBNAct, InputCheck, apply_groups, init_weights
from .registration import register_variants
from .schedules import merge, resolve, variants

__all__ = ["NiN", "nin"]


class NiN(ClassifierHead, InputCheck, nn.Module):
    """Network-in-Network with optional filter groups.

    Args:
        num_classes: number of output classes (0: none, the pooled features of conv3b).
        in_channels: image channels (3 for CIFAR-10, 1 for Fashion-MNIST).
        groups: ``{layer: groups}``, e.g. ``{"conv2a": 8, "conv3a": 4}`` (root-8).
    """

    min_input_size = 4  # pool2 needs a 2x2 map; smaller inputs leave it none
    classifier_name = "conv3c"
    num_features = 192
    stage_info = ((96, 1, "conv1c"), (192, 2, "conv2c"), (192, 4, "conv3b"))
    stage_modules = (("conv1a", "conv1b", "conv1c"), ("pool1", "conv2a", "conv2b", "conv2c"),
                     ("pool2", "conv3a", "conv3b"))
    default_input_size = (3, 32, 32)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        groups: Optional[Mapping[str, int]] = None,
    ) -> None:
        super().__init__()
        check_whole("num_classes", num_classes, 0)
        check_positive("in_channels", in_channels)
        self.in_channels = in_channels
        self.default_input_size = (in_channels, 32, 32)
        self.num_classes = num_classes
        block = lambda cin, cout, k: ConvBNAct(cin, cout, k, bias=True)  # noqa: E731
        self.conv1a = block(in_channels, 192, 5)
        self.conv1b = block(192, 160, 1)
        self.conv1c = block(160, 96, 1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2a = block(96, 192, 5)
        self.conv2b = block(192, 192, 1)
        self.conv2c = block(192, 192, 1)
        self.pool2 = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.conv3a = block(192, 192, 3)
        self.conv3b = block(192, 192, 1)
        self.conv3c = self.classifier_for(num_classes)
        self.pool3 = nn.AdaptiveAvgPool2d(1)
        init_weights(self.modules())
        self.groups = apply_groups(self, groups)

    def new_classifier(self, num_classes: int) -> nn.Module:
        return ConvBNAct(self.num_features, num_classes, 1, bias=True, bn=False, act=False)

    def stages(self):
        """conv1a-c (32x32 for a 32x32 input), pool1 and conv2a-c (16x16), pool2 and conv3a-b
        (8x8): ``forward_features`` returns the last, conv3b's 192 channels."""
        return [lambda x: self.conv1c(self.conv1b(self.conv1a(x))),
                lambda x: self.conv2c(self.conv2b(self.conv2a(self.pool1(x)))),
                lambda x: self.conv3b(self.conv3a(self.pool2(x)))]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class scores: conv3c at every position, then the global average (as the paper
        counts it); ``pre_logits``: the pooled features conv3c would take."""
        if not pre_logits:
            x = self.conv3c(x)
        return torch.flatten(self.pool3(x), 1)


def nin(
    *, variant: str = "orig", groups: Optional[Mapping[str, int]] = None, **kwargs
) -> NiN:
    """Network-in-Network (Deep Roots, Section 4.1). ``variant`` is a row of Table 1 / Table 8
    (``"orig"``, ``"root-8"``, ``"tree-4"``, ``"col-2"``, ...); ``groups`` overrides layers."""
    return NiN(groups=merge(resolve("nin", variant), groups), **kwargs)


register_variants("nin", nin, "nin", variants("nin"))
