"""Filter-group schedules: which layers are grouped, and how many groups, for each variant.

Every schedule is data, copied from the paper's tables. A family's table has one row per
variant (``"orig"``, ``"root-8"``, ...) and one column per paper column; the family's
``COLUMNS`` mapping says which conv layers (by module path, shell-style wildcards allowed) a
column stands for. Columns the paper prints as all ones (the 7x7 conv1, the 1x1 convs) are
left out: ungrouped is the default.

``resolve(family, variant)`` turns a row into the ``{layer pattern: groups}`` mapping that the
model builders take (see :func:`deeproots.models.layers.apply_groups`). Pure data: no torch.
"""
from __future__ import annotations

import difflib
from typing import Dict, Mapping

from ..errors import DeeprootsError
from ..checks import check_groups_mapping

__all__ = ["SCHEDULES", "COLUMNS", "PAPER_TABLE", "resolve", "variants", "merge"]

# Network-in-Network, Table 1 (root rows) and Section 4.2 / Table 8 (tree, column rows).
# The paper prints no table for tree and column; root-N is (N, N/2), tree-N is (N, 2N) and
# col-N is (N, N) for (conv2a, conv3a): the only assignment that reproduces Table 8.
NIN_COLUMNS = {"conv2a": "conv2a", "conv3a": "conv3a"}
NIN = {
    # variant:   (conv2a 5x5, conv3a 3x3)
    "orig": (1, 1),
    "root-2": (2, 1),
    "root-4": (4, 2),
    "root-8": (8, 4),
    "root-16": (16, 8),
    "tree-2": (2, 4),
    "tree-4": (4, 8),
    "tree-8": (8, 16),
    "tree-16": (16, 32),
    "col-2": (2, 2),
    "col-4": (4, 4),
    "col-8": (8, 8),
    "col-16": (16, 16),
}

# ResNet, Table 3: groups of the 3x3 conv of every bottleneck in res2..res5 (torchvision's
# layer1..layer4). The same rule is used for ResNet-101/152/200 (Table 5).
RESNET_COLUMNS = {
    "res2 3x3": "layer1.*.conv2",
    "res3 3x3": "layer2.*.conv2",
    "res4 3x3": "layer3.*.conv2",
    "res5 3x3": "layer4.*.conv2",
}
RESNET = {
    # variant:   (res2, res3, res4, res5) 3x3
    "orig": (1, 1, 1, 1),
    "root-2": (2, 1, 1, 1),
    "root-4": (4, 2, 1, 1),
    "root-8": (8, 4, 2, 1),
    "root-16": (16, 8, 4, 2),
    "root-32": (32, 16, 8, 4),
    "root-64": (64, 32, 16, 8),
}

# GoogLeNet, Table 7: conv2's 3x3 (here ``conv3``, torchvision's name) and the 3x3 and 5x5
# convs of each inception module (branch2.1 and branch3.1). The text of Table 7 is cut off
# after inception 4; inception 5 continues the halving (N/8), which Table 6 confirms.
GOOGLENET_COLUMNS = {
    "conv2 3x3": "conv3",
    "incp3 3x3": "inception3?.branch2.1",
    "incp3 5x5": "inception3?.branch3.1",
    "incp4 3x3": "inception4?.branch2.1",
    "incp4 5x5": "inception4?.branch3.1",
    "incp5 3x3": "inception5?.branch2.1",
    "incp5 5x5": "inception5?.branch3.1",
}
GOOGLENET = {
    # variant:   (conv2, incp3 3x3, 5x5, incp4 3x3, 5x5, incp5 3x3, 5x5)
    "orig": (1, 1, 1, 1, 1, 1, 1),
    "root-2": (2, 1, 1, 1, 1, 1, 1),
    "root-4": (4, 2, 2, 1, 1, 1, 1),
    "root-8": (8, 4, 4, 2, 2, 1, 1),
    "root-16": (16, 8, 8, 4, 4, 2, 2),
}

SCHEDULES: Dict[str, Dict[str, tuple]] = {
    "nin": NIN,
    "resnet": RESNET,
    "googlenet": GOOGLENET,
}
COLUMNS: Dict[str, Dict[str, str]] = {
    "nin": NIN_COLUMNS,
    "resnet": RESNET_COLUMNS,
    "googlenet": GOOGLENET_COLUMNS,
}
PAPER_TABLE = {"nin": "Table 1 and Section 4.2", "resnet": "Table 3", "googlenet": "Table 7"}


def variants(family: str) -> list[str]:
    """The variant names of a family, in the paper's row order."""
    _check_family(family)
    return list(SCHEDULES[family])


def resolve(family: str, variant: str) -> Dict[str, int]:
    """Return ``{layer pattern: groups}`` for one row of a family's table.

    Only grouped layers (groups > 1) appear; an empty dict is the ungrouped "orig" network.
    """
    _check_family(family)
    table = SCHEDULES[family]
    if variant not in table:
        close = difflib.get_close_matches(variant, list(table), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise DeeprootsError(
            f"unknown {family} variant {variant!r}; {PAPER_TABLE[family]} lists "
            f"{', '.join(table)}.{hint}"
        )
    columns = COLUMNS[family].values()
    return {pattern: g for pattern, g in zip(columns, table[variant]) if g > 1}


def merge(schedule: Mapping[str, int], overrides: Mapping[str, int] | None) -> Dict[str, int]:
    """A schedule with a user's per-layer overrides on top (later keys win in apply_groups):
    an override of a key the schedule already has replaces it and moves it last."""
    if overrides is not None:
        check_groups_mapping(overrides)
    merged = dict(schedule)
    for key, value in (overrides or {}).items():
        merged.pop(key, None)
        merged[key] = value
    return merged


def _check_family(family: str) -> None:
    if family not in SCHEDULES:
        raise DeeprootsError(f"unknown model family {family!r}; known: {', '.join(SCHEDULES)}")
