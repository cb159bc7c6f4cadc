"""deeproots: Deep Roots (Ioannou et al., CVPR 2017), hierarchical filter groups for CNNs.

    >>> import deeproots
    >>> deeproots.list_models("nin-root*")
    ['nin-root-2', 'nin-root-4', 'nin-root-8', 'nin-root-16']
    >>> model = deeproots.create_model("nin-root-8", num_classes=10)
    >>> deeproots.profile(model).macs
    103342080
"""
from . import data, models  # noqa: F401  (models: registers every model)
from .deploy import export, optimize_for_inference
from .layers import apply_groups, conv_layers, convert
from .profile import Profile, profile
from .registry import create_model, is_model, list_models, register_model

__version__ = "0.1.0"
__all__ = [
    "create_model",
    "list_models",
    "is_model",
    "register_model",
    "profile",
    "Profile",
    "convert",
    "apply_groups",
    "conv_layers",
    "optimize_for_inference",
    "export",
]
