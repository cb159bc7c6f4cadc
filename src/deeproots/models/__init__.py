"""The paper's model families, one file each; importing this registers every model name."""
from .googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from .nin import NiN, nin
from .resnet import ResNet, resnet50, resnet101, resnet152, resnet200

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "NiN", "ResNet", "googlenet", "nin", "resnet50",
           "resnet101", "resnet152", "resnet200"]
