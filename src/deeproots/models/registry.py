"""The model registry, timm-style: ``create_model("nin-root-8")`` and ``list_models("nin*")``.

Looking models up by name: a registered name or ``FILE.py:FUNCTION`` (a user's own function)
to a built model. The names are the table the model families write themselves into
(:mod:`deeproots.models.registration`); the model files, which import torch, are loaded on
the first lookup, so ``import deeproots`` and ``deeproots --help`` stay light.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import os
import re
import typing
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from ..errors import DeeprootsError, first_line
from ..runtime import file_digest
from .registration import (FAMILY_MODULES, TABLE, ModelEntry, model_name, normalise,
                           register_model, register_variants)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["register_model", "register_variants", "model_name", "create_model", "list_models",
           "is_model", "model_entry", "ModelEntry", "build_model", "is_user_model",
           "check_model_spec", "load_builder", "resolve_model_spec", "model_source_digest",
           "model_slug"]


_FAMILIES_LOADED = False


def _registry() -> Dict[str, ModelEntry]:
    # The model files register themselves when imported; they import torch, so they are
    # loaded here, on the first lookup, and `import deeproots` and `deeproots --help` stay light.
    global _FAMILIES_LOADED
    if not _FAMILIES_LOADED:
        _FAMILIES_LOADED = True
        for family in FAMILY_MODULES:
            importlib.import_module(f"deeproots.models.{family}")
    return TABLE


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _patterns(value, what: str) -> List[str]:
    """A shell-style pattern or a list of them, normalised; a one-line error otherwise."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise DeeprootsError(f"{what} must be a string such as 'nin*' or a list of them; got "
                             f"{value!r}")
    return [normalise(p) for p in items]


def list_models(pattern: Union[str, Sequence[str]] = "*", *,
                exclude_filters: Union[str, Sequence[str]] = (),
                pretrained: bool = False) -> List[str]:
    """Registered model names matching a shell-style ``pattern`` (or any of a list of them),
    less those matching ``exclude_filters``, in natural order (``root-8`` before
    ``root-16``), with timm's arguments: ``pretrained=True`` asks for the models that have
    pretrained weights, and deeproots ships none (an empty list)."""
    patterns, excluded = _patterns(pattern, "pattern"), _patterns(exclude_filters,
                                                                  "exclude_filters")
    if pretrained:
        return []
    return sorted((n for n in _registry()
                   if any(fnmatch.fnmatchcase(n, p) for p in patterns)
                   and not any(fnmatch.fnmatchcase(n, p) for p in excluded)),
                  key=_natural_key)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return isinstance(name, str) and normalise(name) in _registry()


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a ValueError naming the closest names if unknown."""
    registry = _registry()
    key = normalise(name) if isinstance(name, str) else name
    if key not in registry:
        close = difflib.get_close_matches(str(key), list(registry), n=5, cutoff=0.5)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise DeeprootsError(
            f"unknown model {name!r}.{hint} `deeproots list` (or deeproots.list_models()) "
            f"shows all {len(registry)} names."
        )
    return registry[key]


def _accepted_kwargs(entry: ModelEntry) -> Dict[str, Any]:
    # The builder's own keywords, and (through **kwargs) those of the class it returns,
    # each with its type hint (or None)
    names: Dict[str, Any] = {}
    for fn in (entry.builder, typing.get_type_hints(entry.builder).get("return")):
        if fn is None:
            continue
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names[p.name] = hints.get(p.name)
    return {n: h for n, h in names.items()
            if n not in ("self", "layers") and n not in entry.kwargs}


_SIMPLE = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}


def _fits(value: Any, hint: Any) -> Optional[bool]:
    """Whether ``value`` fits a simple type hint (bool, int, float, str, Optional of one);
    None when the hint is not one of those (not checked here)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args and len(args) == 2:
        inner = next(a for a in args if a is not type(None))
        return True if value is None else _fits(value, inner)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


def _check_kwargs(entry: ModelEntry, kwargs: Dict[str, Any]) -> None:
    accepted = _accepted_kwargs(entry)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise DeeprootsError(
            f"bad arguments for {entry.name}: {', '.join(map(repr, unknown))}. Accepted "
            f"keyword arguments: {', '.join(accepted)}"
        )
    for name, value in kwargs.items():
        hint = accepted[name]
        if _fits(value, hint) is False:
            inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            wanted = _SIMPLE.get(inner, getattr(inner, "__name__", str(inner)))
            raise DeeprootsError(f"{entry.name}: {name} must be {wanted}"
                                 f"{' or None' if typing.get_args(hint) else ''}; got "
                                 f"{value!r}")


# timm's names for the same arguments (drop_rate: the dropout before the classifier)
TIMM_NAMES = {"in_chans": "in_channels", "drop_rate": "dropout"}


def create_model(name: str, pretrained: bool = False,
                 checkpoint_path: Union[None, str, "os.PathLike[str]"] = None,
                 features_only: bool = False,
                 out_indices: Union[None, int, Sequence[int]] = None,
                 **kwargs: Any) -> "nn.Module":
    """Build a registered model by name, e.g. ``create_model("nin-root-8", num_classes=10)``.

    Keyword arguments go to the family's constructor (``num_classes``, ``in_channels``,
    ``groups`` for per-layer overrides, ...); timm's ``in_chans`` is taken for
    ``in_channels`` and its ``drop_rate`` for ``dropout`` (GoogLeNet's), and
    ``pretrained=False`` as timm's default (deeproots ships no weights:
    ``pretrained=True`` is a one-line error that says how to get them). ``checkpoint_path``,
    as in timm: weights loaded from that file once the model is built (a state_dict, also
    under ``"state_dict"`` or ``"model"``, as a deeproots checkpoint holds it; read with
    ``weights_only=True``; :mod:`deeproots.weights`). ``num_classes=0`` builds the network
    without its classifier (:mod:`deeproots.models.head`); ``features_only=True`` a backbone
    whose forward pass returns the feature maps of the stages ``out_indices`` (default all;
    ``model.feature_info`` says their channels and strides), the weights of
    ``checkpoint_path`` loaded first. The model carries ``model.name`` and
    ``model.deeproots_cfg`` (name and arguments), which checkpoints use to rebuild it.
    """
    entry = model_entry(name)
    if pretrained:
        raise DeeprootsError(
            f"deeproots ships no pretrained weights ({entry.name}: pretrained={pretrained!r}); "
            f"train them (deeproots train {entry.name}) and load the run's checkpoint: "
            f"deeproots.training.checkpoint.model_from_checkpoint(load_checkpoint(RUN/best.pt)); "
            f"weights of your own: checkpoint_path=FILE")
    for timm_name, own in TIMM_NAMES.items():
        if timm_name in kwargs:
            if own in kwargs:
                raise DeeprootsError(f"{entry.name}: give {own} or timm's {timm_name}, not both")
            if own not in _accepted_kwargs(entry):
                raise DeeprootsError(f"{entry.name} has no {own} for timm's {timm_name} "
                                     f"(got {timm_name}={kwargs[timm_name]!r}); accepted "
                                     f"keyword arguments: {', '.join(_accepted_kwargs(entry))}")
            kwargs[own] = kwargs.pop(timm_name)
    if not isinstance(features_only, bool):
        raise DeeprootsError(f"{entry.name}: features_only must be True or False; got "
                             f"{features_only!r}")
    if out_indices is not None and not features_only:
        raise DeeprootsError(f"{entry.name}: out_indices={out_indices!r} picks the maps of a "
                             f"backbone; add features_only=True")
    _check_kwargs(entry, kwargs)
    model = entry.builder(**{**entry.kwargs, **kwargs})
    model.name = entry.name
    model.deeproots_cfg = {"name": entry.name, "kwargs": dict(kwargs)}
    if checkpoint_path is not None:
        from ..weights import load_weights  # torch: once a model is built

        load_weights(model, checkpoint_path)
    if features_only:
        model.set_features_only(out_indices)
    return model


def is_user_model(spec: str) -> bool:
    """Whether ``spec`` names a model built by a user's function, ``FILE.py:FUNCTION``."""
    return isinstance(spec, str) and ":" in spec and spec.rsplit(":", 1)[0].endswith(".py")


def resolve_model_spec(spec: str) -> str:
    """``spec`` as a run records it: a registered name as it is; ``FILE.py:FUNCTION`` with
    the file's absolute path, so that the run can be resumed, evaluated or exported from
    any folder."""
    if not is_user_model(spec):
        return spec
    path, _, function = spec.rpartition(":")
    return f"{os.path.abspath(path)}:{function}"


def model_source_digest(spec: str) -> Optional[str]:
    """The SHA-256 of the file a ``FILE.py:FUNCTION`` model is built by (None for a
    registered name or a file that cannot be read): a resumed run warns when it changed."""
    if not is_user_model(spec):
        return None
    return file_digest(spec.rpartition(":")[0])


def model_slug(spec: str) -> str:
    """A file-name-safe name for a model: the registered name, or ``FILE-FUNCTION`` (the
    file's stem) for ``FILE.py:FUNCTION``."""
    if not is_user_model(spec):
        return spec
    path, _, function = spec.rpartition(":")
    return f"{os.path.splitext(os.path.basename(path))[0]}-{function}"


def load_builder(spec: str) -> Callable[..., "nn.Module"]:
    """The function ``FUNCTION`` of the Python file ``FILE.py`` (``spec = "FILE.py:FUNCTION"``).
    This runs that file: it is the user's own code, named by the user; deeproots never runs
    a file named inside a checkpoint or a dataset."""
    path, _, function = spec.rpartition(":")
    if not os.path.isfile(path):
        raise DeeprootsError(f"model {spec!r}: no file {path}; give FILE.py:FUNCTION, a Python "
                             f"file and the function in it that returns the model")
    module_spec = importlib.util.spec_from_file_location(
        f"deeproots_user_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as stop:  # the file called sys.exit() or exit() when imported
        raise DeeprootsError(f"model {spec!r}: running {path} called sys.exit({stop.code!r}); "
                             f"a model file must define its function without exiting (guard "
                             f"its script part with if __name__ == '__main__':)") from None
    except Exception as err:
        raise DeeprootsError(f"model {spec!r}: running {path} failed ({type(err).__name__}: "
                             f"{first_line(err, 200)})") from err
    builder = getattr(module, function, None)
    if not callable(builder):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(function, names, n=4, cutoff=0.4)
        raise DeeprootsError(f"model {spec!r}: {path} has no function {function!r}"
                             f"{'; closest: ' + ', '.join(close) if close else ''}")
    return builder


def check_model_spec(spec: str) -> None:
    """A ValueError unless ``spec`` is a registered name or an existing ``FILE.py:FUNCTION``
    (the file is not run)."""
    if is_user_model(spec):
        path = spec.rsplit(":", 1)[0]
        if not os.path.isfile(path):
            raise DeeprootsError(f"model {spec!r}: no file {path}; give FILE.py:FUNCTION, a Python "
                                 f"file and the function in it that returns the model")
    else:
        model_entry(spec)


def build_model(spec: str, **kwargs: Any) -> "nn.Module":
    """A model by registered name (:func:`create_model`) or from ``FILE.py:FUNCTION``, a
    user's function returning an ``nn.Module``; keyword arguments the function does not take
    (``num_classes``, ``in_channels``) are not passed to it. The model carries ``name`` and
    ``deeproots_cfg`` as registered models do."""
    if not is_user_model(spec):
        return create_model(spec, **kwargs)
    from torch import nn  # torch: only once a model is built

    builder = load_builder(spec)
    params = inspect.signature(builder).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    used = {k: v for k, v in kwargs.items() if takes_all or k in params}
    try:
        model = builder(**used)
    except SystemExit as stop:
        raise DeeprootsError(f"model {spec!r}: calling it called sys.exit({stop.code!r}); it "
                             f"must return an nn.Module") from None
    except Exception as err:
        raise DeeprootsError(f"model {spec!r}: calling it failed ({type(err).__name__}: "
                             f"{first_line(err, 200)})") from err
    if not isinstance(model, nn.Module):
        raise DeeprootsError(f"model {spec!r} returned {type(model).__name__}, not an nn.Module")
    model.name = spec
    model.deeproots_cfg = {"name": spec, "kwargs": used}
    return model
