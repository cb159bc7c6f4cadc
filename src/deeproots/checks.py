"""One validator per kind of value, each raising a one-line DeeprootsError (a ValueError)
that names the setting, the value given and what is accepted. Torch-free, so the command
line can use them before torch is imported."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from .errors import DeeprootsError, GroupsError

__all__ = ["GroupsError", "check_whole", "check_positive", "check_optional_positive",
           "check_number", "check_range", "check_choice", "check_device", "check_groups_mapping",
           "check_seed", "listed"]

SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def listed(values: Sequence[Any]) -> str:
    """'a, b or c': a list of accepted values for a message."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" or {values[-1]}"


def check_whole(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` if it is a whole number >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeeprootsError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    return value


def check_positive(name: str, value: Any) -> int:
    """``value`` if it is a whole number >= 1, else a ValueError naming ``name``."""
    return check_whole(name, value, 1)


def check_optional_positive(name: str, value: Any) -> Optional[int]:
    """``None``, or a whole number >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeeprootsError(f"{name} must be a whole number >= 1 or None; got {value!r}")
    return value


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` if it is a finite number >= ``minimum`` (> when ``strict``); NaN and infinity
    are refused."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise DeeprootsError(f"{name} must be a finite number {bound}; got {value!r}")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float) -> float:
    """``value`` if it is a finite number from ``low`` to ``high``: for quantities a result is
    computed from (a peak rate, a bandwidth), where 1e308 or 1e-320 would give inf or nan."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and low <= value <= high)
    if not ok:
        raise DeeprootsError(f"{name} must be a finite number from {low:g} to {high:g}; got "
                             f"{value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise DeeprootsError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_seed(value: Any) -> int:
    """A random seed: a whole number from 0 to 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise DeeprootsError(f"seed must be a whole number from 0 to {SEED_MAX}; got {value!r}")
    return value


def check_device(name: Any, accepted: Sequence[str] = ("auto", "cpu", "cuda")) -> str:
    """``name`` if it is one of ``accepted`` (or ``cuda:N`` when cuda is)."""
    if isinstance(name, str) and (name in accepted or (
            "cuda" in accepted and name.startswith("cuda:") and name[5:].isdigit())):
        return name
    shown = [*accepted, "cuda:N"] if "cuda" in accepted else list(accepted)
    raise DeeprootsError(f"device must be {listed(shown)}; got {name!r}")


def check_groups_mapping(groups: Any) -> Mapping[str, int]:
    """``groups`` if it maps layer names (or patterns) to whole numbers >= 1; else a
    :class:`GroupsError`."""
    if not isinstance(groups, Mapping):
        raise GroupsError(
            f"groups must be a mapping of layer name (or wildcard pattern) to a whole number "
            f"of groups, e.g. {{'conv2a': 8}}; got {type(groups).__name__} {groups!r}"
        )
    for key, value in groups.items():
        if not isinstance(key, str) or not key:
            raise GroupsError(f"groups mapping keys must be layer names (strings); got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GroupsError(f"groups for {key!r} must be a whole number >= 1; got {value!r}")
    return groups
