"""Bottleneck ResNets (He et al., 2015; 2016) and their root variants (Deep Roots, Tables 3-5).

Two layouts, both with torchvision's module names (``conv1``, ``layer1.0.conv2``, ``fc``) so
the paper's res2..res5 are ``layer1``..``layer4``:

* ``preact=False`` (ResNet-50/101/152): the original post-activation network as in the
  paper's Caffe model, with a downsampling block's stride on its first 1x1 conv
  (``stride_in_1x1=True``). torchvision puts the stride on the 3x3 ("ResNet v1.5"), which
  costs 6-11% more multiply-adds; pass ``stride_in_1x1=False`` for that.
* ``preact=True`` (ResNet-200): the pre-activation network of fb.resnet.torch, which the
  paper used for Table 5 (stride on the 3x3).

Convs have no bias; every conv is followed (or, pre-activation, preceded) by batch norm.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Type, Union

import torch
from torch import nn

from ..checks import check_positive, check_whole
from .head import ClassifierHead
from .layers import InputCheck, apply_groups, init_weights
from .registration import register_variants
from .schedules import merge, resolve, variants

__all__ = ["ResNet", "Bottleneck", "PreActBottleneck", "resnet50", "resnet101", "resnet152",
           "resnet200"]


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels), batch norm and ReLU after each conv, ReLU after the sum.
    With groups on ``conv2`` it is a root module: grouped 3x3, then the ungrouped 1x1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, stride_in_1x1: bool = True):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        out = planes * self.expansion
        self.conv1 = _conv(inplanes, planes, 1, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out, 1)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(_conv(inplanes, out, 1, stride), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al., 2016; fb.resnet.torch): BN-ReLU before each conv,
    stride on the 3x3, projection shortcut from the pre-activated input."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, stride_in_1x1: bool = False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv(inplanes, planes, 1, s1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, s3)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = _conv(inplanes, out, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(pre)
        y = self.conv1(pre)
        y = self.conv2(self.relu(self.bn2(y)))
        y = self.conv3(self.relu(self.bn3(y)))
        return y + identity


class ResNet(ClassifierHead, InputCheck, nn.Module):
    """A bottleneck ResNet with optional filter groups.

    Args:
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-50.
        num_classes: classifier outputs (0: none, the 2048 pooled features).
        in_channels: image channels.
        groups: ``{layer: groups}``, e.g. ``{"layer1.*.conv2": 8}``.
        preact: pre-activation blocks (ResNet-200 of Table 5) instead of the original ones.
        stride_in_1x1: put a downsampling block's stride on its first 1x1 conv (the paper's
            Caffe layout) rather than on the 3x3 (torchvision). Default: True unless preact.
    """

    default_input_size = (3, 224, 224)

    def __init__(
        self,
        layers: List[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: Optional[Mapping[str, int]] = None,
        preact: bool = False,
        stride_in_1x1: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_whole("num_classes", num_classes, 0)
        check_positive("in_channels", in_channels)
        self.in_channels = in_channels
        self.default_input_size = (in_channels, 224, 224)
        self.num_classes = num_classes
        self.preact = preact
        block: Type[Union[Bottleneck, PreActBottleneck]] = (
            PreActBottleneck if preact else Bottleneck
        )
        if stride_in_1x1 is None:
            stride_in_1x1 = not preact
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(inplanes, planes, stride, stride_in_1x1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        # Pre-activation nets end with the BN-ReLU their last block left out.
        self.final_bn = nn.BatchNorm2d(inplanes) if preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        self.fc = self.classifier_for(num_classes)
        init_weights(self.modules())
        self.groups = apply_groups(self, groups)

    def new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes)

    stage_info = ((64, 2, "relu"), (256, 4, "layer1"), (512, 8, "layer2"),
                  (1024, 16, "layer3"), (2048, 32, "layer4"))
    # (the stem's ReLU module also ends a pre-activation net: it is kept)
    stage_modules = (("conv1", "bn1"), ("maxpool", "layer1"), ("layer2",), ("layer3",),
                     ("layer4", "final_bn"))

    def stages(self):
        """The stem (112x112 for a 224x224 input), then each stage of blocks (56, 28, 14 and
        7): ``forward_features`` returns the last, 2048 channels (pre-activation nets: after
        their final batch norm and ReLU)."""
        def last(x):
            x = self.layer4(x)
            return self.relu(self.final_bn(x)) if self.preact else x

        return [lambda x: self.relu(self.bn1(self.conv1(x))),
                lambda x: self.layer1(self.maxpool(x)), self.layer2, self.layer3, last]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then ``fc`` (skipped for ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


_DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3], 200: [3, 24, 36, 3]}


def _resnet(depth: int, variant: str, groups, preact: bool, **kwargs) -> ResNet:
    return ResNet(
        _DEPTHS[depth], groups=merge(resolve("resnet", variant), groups), preact=preact, **kwargs
    )


def resnet50(*, variant: str = "orig", groups: Optional[Mapping[str, int]] = None,
             preact: bool = False, **kwargs) -> ResNet:
    """ResNet-50 (Deep Roots, Section 4.3.1); ``variant`` is a row of Table 3."""
    return _resnet(50, variant, groups, preact, **kwargs)


def resnet101(*, variant: str = "orig", groups: Optional[Mapping[str, int]] = None,
              preact: bool = False, **kwargs) -> ResNet:
    """ResNet-101 with Table 3's schedule rule."""
    return _resnet(101, variant, groups, preact, **kwargs)


def resnet152(*, variant: str = "orig", groups: Optional[Mapping[str, int]] = None,
              preact: bool = False, **kwargs) -> ResNet:
    """ResNet-152 with Table 3's schedule rule."""
    return _resnet(152, variant, groups, preact, **kwargs)


def resnet200(*, variant: str = "orig", groups: Optional[Mapping[str, int]] = None,
              preact: bool = True, **kwargs) -> ResNet:
    """Pre-activation ResNet-200 (Deep Roots, Section 4.3.2, Table 5)."""
    return _resnet(200, variant, groups, preact, **kwargs)


for _builder in (resnet50, resnet101, resnet152, resnet200):
    register_variants(_builder.__name__, _builder, "resnet", variants("resnet"))
