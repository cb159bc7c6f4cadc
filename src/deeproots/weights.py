"""Weights from a file: read safely, found in the forms people save them in, and loaded into a
model with a one-line error when they do not fit.

* :func:`load_weights_only`: whatever a file holds, read with ``torch.load(weights_only=True)``
  (tensors and plain values only: a file from outside cannot run code).
* :func:`state_dict_of`: the ``state_dict`` a file's content is or holds: a plain one
  (``torch.save(model.state_dict(), F)``), one under ``"state_dict"`` or ``"model"`` (Lightning,
  timm's training scripts, a deeproots checkpoint), with the ``module.`` prefix of
  DistributedDataParallel and the ``_orig_mod.`` of ``torch.compile`` taken off when every
  key carries it.
* :func:`load_weights`: both, into a model (timm's ``load_checkpoint(model, path)``), as
  ``create_model(name, checkpoint_path=F)`` does; missing, unexpected and misshapen tensors are
  named, never loaded in part.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Union

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["load_weights_only", "state_dict_of", "fit_weights", "load_weights"]

WRAPPERS = ("state_dict", "model")  # the keys a state_dict is saved under, in this order
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's, torch.compile's


def load_weights_only(path: Union[str, Path], map_location="cpu"):
    """Whatever ``path`` holds, read with ``torch.load(weights_only=True)`` (tensors and
    plain values only: a file from outside cannot run code). CheckpointError if it is
    missing, empty, a folder, corrupt or unsafe."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file (e.g. "
                              f"{path}/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never written "
                              f"completely")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several kinds on truncated or foreign files
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        if lines[0].startswith("Weights only load failed"):
            reason = next((line for line in lines[1:] if not line.startswith(
                ("Please file", "Check the documentation"))), "")
            # keep torch's warning, never only its advice to turn weights_only off
            raise CheckpointError(
                f"checkpoint {path} is corrupt, not a PyTorch file, or unsafe: torch's safe "
                f"loader (weights_only=True) refused it ({reason}). Loading it with "
                f"weights_only=False can result in arbitrary code execution; do that only for "
                f"a file from a trusted source") from err
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({type(err).__name__}: {lines[0][:300]})") from err


def _is_state_dict(d) -> bool:
    return isinstance(d, Mapping) and bool(d) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def state_dict_of(raw) -> Optional[dict]:
    """The state_dict ``raw`` (a file's content) is or holds, its keys without a prefix that
    every one of them carries (``module.``, ``_orig_mod.``); None if it holds none."""
    found = raw if _is_state_dict(raw) else next(
        (raw[k] for k in WRAPPERS if isinstance(raw, Mapping) and _is_state_dict(raw.get(k))),
        None)
    if found is None:
        return None
    found = dict(found)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in found):
            found = {k[len(prefix):]: v for k, v in found.items()}
    return found


def _first(keys: List[str], what: str) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{what} {', '.join(keys[:3])}{more}"


def fit_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], where: str,
                name: Optional[str] = None) -> nn.Module:
    """Load ``weights`` into ``model`` (in place; returned), all or nothing: CheckpointError
    naming the missing, unexpected or misshapen tensors (``where``: the file, for the
    message; ``name``: the model's)."""
    name = name or getattr(model, "name", None) or type(model).__name__
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{where}: its weights do not fit {name}: "
                              f"{_first(missing, 'missing')}"
                              f"{'; ' if missing and unexpected else ''}"
                              f"{_first(unexpected, 'unexpected')}")
    shapes = [f"{k} is {tuple(weights[k].shape)} there, {tuple(v.shape)} here"
              for k, v in own.items() if tuple(weights[k].shape) != tuple(v.shape)]
    if shapes:
        more = f" (and {len(shapes) - 2} more)" if len(shapes) > 2 else ""
        raise CheckpointError(f"{where}: its weights do not fit {name}: "
                              f"{'; '.join(shapes[:2])}{more}")
    model.load_state_dict(weights)
    return model


def load_weights(model: nn.Module, path: Union[str, Path], what: str = "checkpoint_path"
                 ) -> nn.Module:
    """The weights of the file ``path`` loaded into ``model`` (in place; returned): a
    state_dict in any of the forms :func:`state_dict_of` finds, read safely."""
    raw = load_weights_only(path)
    weights = state_dict_of(raw)
    if weights is None:
        raise CheckpointError(f"{what} {path} holds no state_dict (a mapping of parameter "
                              f"names to tensors, or one under 'state_dict' or 'model')")
    try:
        return fit_weights(model, weights, str(path))
    except CheckpointError as err:
        recorded = raw.get("model_cfg") if isinstance(raw, Mapping) else None
        if not isinstance(recorded, Mapping):
            raise
        # a deeproots checkpoint says what it was built as: say it too
        args = ", ".join(f"{k}={v!r}" for k, v in dict(recorded.get("kwargs") or {}).items())
        groups = recorded.get("groups")
        raise CheckpointError(f"{err} (the checkpoint was trained as {recorded.get('name')}"
                              f"({args}){f' with groups {dict(groups)}' if groups else ''})"
                              ) from None
