"""Our cost counts beside the paper's printed ones: ``compare("nin")`` reproduces Table 8.

"Matches" means: our count, in the table's unit, rounds to the digits the paper prints.
Models are built on the meta device, so no weights are allocated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import List, Optional

import torch

from .tables import PAPER_TABLES, check_table
from ..inspection.costs import profile
from ..models.registry import create_model, model_name
from ..text import format_table

__all__ = ["CostRow", "compare", "format_comparison", "rounds_to"]


@dataclass
class CostRow:
    """One row of a paper table: the printed multiply-adds and parameters (strings, in the
    table's units), ours in the same units, the relative difference ``(ours - paper) /
    paper``, whether ours rounds to the printed digits, and our exact counts."""

    model: str
    paper_macs: str
    macs: float
    macs_rel_diff: float
    macs_match: bool
    paper_params: str
    params: float
    params_rel_diff: float
    params_match: bool
    macs_exact: int
    params_exact: int

    def to_dict(self) -> dict:
        return asdict(self)


def rounds_to(value: float, printed: str) -> bool:
    """Whether ``value`` rounded (half up) to the places of ``printed`` gives ``printed``."""
    places = Decimal(printed).as_tuple().exponent
    return Decimal(repr(value)).quantize(Decimal(1).scaleb(places), ROUND_HALF_UP) == Decimal(
        printed)


def compare(name: str) -> List[CostRow]:
    """Our multiply-adds and params beside the paper's, one :class:`CostRow` per row of
    table ``name`` (``nin``, ``resnet50``, ``resnet200`` or ``googlenet``)."""
    table = check_table(name)
    rows = []
    for variant, printed in table.rows.items():
        name_ = model_name(table.model, variant)
        with torch.device("meta"):
            model = create_model(name_)
        cost = profile(model, training=table.training)
        macs = cost.macs / 10**table.macs_exp
        params = getattr(cost, table.params) / 10**table.params_exp
        paper_macs, paper_params = float(printed[0]), float(printed[1])
        rows.append(CostRow(
            model=name_, paper_macs=printed[0], macs=macs,
            macs_rel_diff=(macs - paper_macs) / paper_macs,
            macs_match=table.macs_reproducible and rounds_to(macs, printed[0]),
            paper_params=printed[1], params=params,
            params_rel_diff=(params - paper_params) / paper_params,
            params_match=rounds_to(params, printed[1]),
            macs_exact=cost.macs, params_exact=getattr(cost, table.params)))
    return rows


def format_comparison(name: str, rows: Optional[List[CostRow]] = None) -> str:
    """``compare(name)`` as a readable table with the table's notes."""
    table = PAPER_TABLES[name]
    rows = compare(name) if rows is None else rows
    mark = {True: "yes", False: "NO"}
    macs_unit, params_unit = f"x10^{table.macs_exp}", f"x10^{table.params_exp}"
    head = ("model", f"MACs {macs_unit} paper", "ours", "diff", "match",
            f"params {params_unit} paper", "ours", "diff", "match")
    body = [(r.model, r.paper_macs, f"{r.macs:.4f}", f"{100 * r.macs_rel_diff:+.2f}%",
             mark[r.macs_match] if table.macs_reproducible else "n/a", r.paper_params,
             f"{r.params:.4f}", f"{100 * r.params_rel_diff:+.2f}%", mark[r.params_match])
            for r in rows]
    lines = [table.title, format_table(head, body, align="lrrrlrrrl")]
    lines += [f"* {note}" for note in table.notes]
    matched = sum(r.macs_match for r in rows) + sum(r.params_match for r in rows)
    total = len(rows) * (2 if table.macs_reproducible else 1)
    lines.append(f"{matched} of {total} reproducible cells round to the paper's printed digits.")
    return "\n".join(lines)
