"""The paper's model families, one file each (:mod:`.nin`, :mod:`.resnet`, :mod:`.googlenet`),
their filter-group tables (:mod:`.schedules`), the layers they share (:mod:`.layers`), and
the model names: each family registers its variants next to its definition
(:mod:`.registration`), and :mod:`.registry` looks them up (``create_model``,
``list_models``). Importing this package loads no torch: the family files load on the first
lookup of a name, or when one of their names below is used."""
from importlib import import_module

# public name -> the family module that defines it
_FAMILY_NAMES = {
    "GoogLeNet": "googlenet", "GoogLeNetOutputs": "googlenet", "googlenet": "googlenet",
    "NiN": "nin", "nin": "nin", "ResNet": "resnet", "resnet50": "resnet",
    "resnet101": "resnet", "resnet152": "resnet", "resnet200": "resnet"}
__all__ = list(_FAMILY_NAMES)


def __getattr__(name: str):
    if name in _FAMILY_NAMES:
        value = getattr(import_module(f".{_FAMILY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deeproots.models' has no attribute {name!r}")
