"""deeproots: Deep Roots (Ioannou et al., CVPR 2017), hierarchical filter groups for CNNs.

    >>> import deeproots
    >>> deeproots.list_models("nin-root*")
    ['nin-root-2', 'nin-root-4', 'nin-root-8', 'nin-root-16']
    >>> model = deeproots.create_model("nin-root-8", num_classes=10)
    >>> deeproots.profile(model).macs
    103342080

The public names below are loaded on first use (PEP 562), so ``import deeproots`` and the
command line's ``--help`` do not pay for importing torch.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "create_model": "registry", "list_models": "registry", "is_model": "registry",
    "register_model": "registry", "register_variants": "registry", "model_name": "registry",
    "profile": "costs", "Profile": "costs",
    "convert": "layers", "apply_groups": "layers", "conv_layers": "layers",
    "optimize_for_inference": "deploy", "export": "deploy",
    "TrainConfig": "config", "rootify": "conversion", "build_model": "registry",
    "TrainStep": "step",
}
_MODULES = ("analysis", "bench", "checks", "config", "conversion", "data", "deploy", "layers",
            "models",
            "costs", "paper", "plots", "registry", "reproduce", "runtime", "schedules",
            "step", "study", "roofline", "text", "timing", "train")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'deeproots' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_MODULES])
