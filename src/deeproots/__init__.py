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

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "create_model": "models.registry", "list_models": "models.registry",
    "is_model": "models.registry", "build_model": "models.registry",
    "register_model": "models.registration", "register_variants": "models.registration",
    "model_name": "models.registration",
    "profile": "inspection.costs", "Profile": "inspection.costs",
    "convert": "models.layers", "apply_groups": "models.layers", "conv_layers": "models.layers",
    "optimize_for_inference": "speed.deploy", "export": "speed.export",
    "TrainConfig": "config", "rootify": "conversion.rule",
    "convert_model": "conversion.checkpoint",
    "TrainStep": "training.step", "load_weights": "weights",
}
# the packages, by concern (docs/architecture.md), and the modules every part shares
_MODULES = ("models", "conversion", "training", "speed", "inspection", "reproduction", "kernels",
            "checks", "config", "errors", "layout", "numerics", "plots", "runtime", "text",
            "weights")
# deeproots 0.1's module names: they forward to the new places, with a DeprecationWarning
_MOVED = ("analysis", "bench", "calibration", "checkpoint", "costs", "data",
          "deploy", "finetune", "layers", "paper", "registry", "reproduce", "roofline",
          "rundir", "schedules", "step", "study", "timing", "train")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES or name in _MOVED:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'deeproots' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_MODULES])  # the moved names left out
