"""Stage 1 of a calibrated conversion: which filters and input channels go to which group.
Each conv's filters (rows) and input channels (columns) are assigned to groups of equal size
so as to keep as much of a score (the weight's energy times each input channel's activation
energy on the calibration images) on the diagonal blocks as possible: alternating optimal
assignments (each side's is exact given the other's), from the components of the weight's
support and from other starts."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["assign_groups", "kept_fraction", "order_of"]


def _kept(score: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    return float(score[rows[:, None] == cols[None, :]].sum())


def _assign(cost: np.ndarray, groups: int) -> np.ndarray:
    """The group of each row, ``groups`` groups of equal size, maximising ``cost[row, g]``
    summed: an optimal assignment of the rows to the groups' slots."""
    from scipy.optimize import linear_sum_assignment

    n = cost.shape[0]
    slots = np.repeat(np.arange(groups), n // groups)
    rows, cols = linear_sum_assignment(-cost[:, slots])
    out = np.empty(n, dtype=int)
    out[rows] = slots[cols]
    return out


def _group_sums(score: np.ndarray, labels: np.ndarray, groups: int, axis: int) -> np.ndarray:
    """For each row (axis 0) or column (axis 1) of ``score``: its sum over each group of the
    other axis's entries."""
    onehot = np.eye(groups)[labels]
    return score @ onehot if axis == 0 else score.T @ onehot


def _components(score: np.ndarray, groups: int) -> Optional[np.ndarray]:
    """Column (input) groups from the connected components of the score's support (an exactly
    block-diagonal weight, permuted, is recovered whole), packed into equal groups; None
    when they cannot be packed."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = score.shape
    support = score > 1e-12 * max(float(score.max()), 1e-30)
    graph = np.zeros((rows + cols, rows + cols), dtype=bool)
    graph[:rows, rows:] = support
    graph[rows:, :rows] = support.T
    n, label = connected_components(csr_matrix(graph), directed=False)
    if n < groups:
        return None
    size = cols // groups
    fill, out = np.zeros(groups, dtype=int), np.empty(cols, dtype=int)
    comps = sorted(range(n), key=lambda c: -int((label[rows:] == c).sum()))
    for c in comps:
        members = np.flatnonzero(label[rows:] == c)
        if not len(members):
            continue
        g = int(np.argmin(fill))
        if fill[g] + len(members) > size:
            return None
        out[members], fill[g] = g, fill[g] + len(members)
    return out


def assign_groups(score: np.ndarray, groups: int, fix_rows: bool = False,
                  fix_cols: bool = False, starts: int = 4, seed: int = 0
                  ) -> Tuple[np.ndarray, np.ndarray, float]:
    """Filters (rows) and input channels (columns) of a conv assigned to ``groups`` groups of
    equal size, maximising the ``score`` (e.g. each weight's energy times its input channel's
    activation energy) kept on the diagonal blocks. ``fix_rows`` / ``fix_cols``: that side
    keeps its order (consecutive groups). Returns the rows' groups, the columns' groups and
    the fraction of the score kept. Alternating optimal assignments (each side's is exact
    given the other's), from the score's components, from the identity and from random
    starts; the best kept."""
    rows, cols = score.shape
    fixed_r = np.arange(rows) // (rows // groups)
    fixed_c = np.arange(cols) // (cols // groups)
    if fix_rows and fix_cols:
        return fixed_r, fixed_c, _kept(score, fixed_r, fixed_c) / max(score.sum(), 1e-30)
    rng = np.random.default_rng(seed)
    inits = [fixed_c]
    found = None if fix_cols else _components(score, groups)
    if found is not None:
        inits.insert(0, found)
    inits += [rng.permutation(fixed_c) for _ in range(0 if fix_cols else starts)]
    best = None
    for col_groups in inits:
        col_groups = fixed_c if fix_cols else col_groups
        row_groups = fixed_r
        last = -1.0
        for _ in range(20):
            if not fix_rows:
                row_groups = _assign(_group_sums(score, col_groups, groups, 0), groups)
            if not fix_cols:
                col_groups = _assign(_group_sums(score, row_groups, groups, 1), groups)
            kept = _kept(score, row_groups, col_groups)
            if kept <= last + 1e-12 * abs(last):
                break
            last = kept
        if best is None or last > best[2]:
            best = (row_groups.copy(), col_groups.copy(), last)
    return best[0], best[1], best[2] / max(float(score.sum()), 1e-30)


def order_of(labels: np.ndarray) -> torch.Tensor:
    """The permutation that puts group 0's members first, then group 1's, ... (stable)."""
    return torch.from_numpy(np.argsort(labels, kind="stable"))


def kept_fraction(score: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """The fraction of ``score`` on the diagonal blocks of an assignment."""
    return _kept(score, rows, cols) / max(float(score.sum()), 1e-30)
