"""The best per-layer schedule a budget allows: a multiple-choice knapsack over each layer's
price (:mod:`.sensitivity`): every layer takes one group count (or stays dense), the
budget's saving must be met (multiply-adds, parameters, or measured time as a fraction of
the dense model's), and the predicted accuracy cost, the sum of each layer's alone, is the
least. Uniform root-N schedules are points of the same space; the search is free to group
one layer harder and keep another dense.

A layer's accuracy cost is the KL divergence its grouping alone moves the model's softmax
by on the selection images, not its top-1 drop: on 1,000 images a top-1 drop is a point of
noise either way, and a knapsack over noisy drops picks exactly the options whose noise
was lucky (on resnet50 the schedule of 16 "free" layers lost 7 points). The predicted
top-1 is the dense one less the summed divergence times the top-1 lost per nat, fitted
over every option (:meth:`Sensitivity.top1_per_kl`). A schedule is then converted and
measured, not taken on trust (:mod:`.checkpoint`).

    plan = choose(prices, latency=0.7)
    plan.groups          # {layer: groups}: the schedule, as create_model and rootify take it
    plan.predicted       # its multiply-adds, params, ms and top-1, predicted
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import DeeprootsError
from .sensitivity import LayerPrice, Sensitivity

__all__ = ["Plan", "choose", "predict", "cheapest", "latency_scale", "check_fraction",
           "check_reachable", "BUDGETS", "STEPS"]

BUDGETS = ("latency", "macs", "params")
STEPS = 400  # the knapsack's resolution: the saving asked for, in this many steps


@dataclass
class Plan:
    """A schedule (``groups``: layer -> count, the dense layers left out) and what it is
    predicted to cost and keep: ``macs``, ``params``, ``ms`` and ``top1``, and each as a
    fraction of the dense model's (``fractions``)."""

    budget: str
    fraction: float
    groups: Dict[str, int] = field(default_factory=dict)
    predicted: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def check_fraction(budget: str, fraction) -> float:
    """``fraction`` if it is a budget: a number above 0 and below 1 (a fraction of the dense
    model's cost); else a one-line error."""
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not 0 < fraction < 1):
        raise DeeprootsError(f"{budget} is a fraction of the dense model's, above 0 and below "
                             f"1 (e.g. 0.7); got {fraction!r}")
    return float(fraction)


def _cost_saved(layer: LayerPrice, option, budget: str, scale: float = 1.0) -> float:
    if budget == "latency":  # a count that measured slower saves nothing
        return scale * max(layer.ms - option.ms, 0.0)
    if budget == "macs":
        return layer.macs - option.macs
    return layer.params - option.params


def _total(prices: Sensitivity, budget: str) -> float:
    return {"latency": prices.ms, "macs": prices.macs, "params": prices.params}[budget]


def predict(prices: Sensitivity, groups: Dict[str, int], scale: float = 1.0
            ) -> Dict[str, float]:
    """What ``groups`` is predicted to cost and keep: the model's costs less each grouped
    layer's saving (its time saved times ``scale``, what the whole model's measurement says
    the layers alone under- or overstate), and its top-1 less the top-1 its layers' summed
    divergence is worth (each layer's own top-1 drop, summed, where the table has no
    divergences)."""
    macs, params, ms, top1 = prices.macs, prices.params, prices.ms, prices.top1
    slope = prices.top1_per_kl()
    for layer in prices.layers:
        g = groups.get(layer.layer, 1)
        option = next((o for o in layer.options if o.groups == g), None)
        if option is None:
            continue
        macs -= layer.macs - option.macs
        params -= layer.params - option.params
        ms -= scale * (layer.ms - option.ms)
        kl = prices.kl_of(layer, option)
        top1 -= prices.top1 - option.top1 if slope is None or kl is None else slope * kl
    return {"macs": macs, "params": params, "ms": ms, "top1": top1,
            "macs_fraction": macs / prices.macs, "params_fraction": params / prices.params,
            "latency_fraction": ms / prices.ms}


def _loss(prices: Sensitivity, layer, option) -> float:
    """A layer's accuracy cost, what the knapsack sums: the divergence its grouping alone
    causes (:meth:`Sensitivity.kl_of`: as checked, where it was; a table without divergences:
    its top-1 drop, none counted when it measured higher), the refit's unexplained energy
    breaking ties."""
    kl = prices.kl_of(layer, option)
    if kl is not None:
        return max(kl, 0.0) + 1e-6 * option.unexplained
    return max(prices.top1 - option.top1, 0.0) + 1e-3 * option.unexplained


def choose(prices: Sensitivity, *, latency: Optional[float] = None,
           macs: Optional[float] = None, params: Optional[float] = None,
           saving: Optional[float] = None, scale: float = 1.0) -> Plan:
    """The schedule of least predicted accuracy cost whose predicted cost is at most the
    budget's fraction of the dense model's (one of ``latency``, ``macs``, ``params``);
    ``saving`` overrides the absolute saving asked for; ``scale`` multiplies each layer's
    time saved (a refinement after a measurement of the whole model: see
    :func:`latency_scale`).
    A one-line error when no schedule reaches the budget: the cheapest reachable, and why."""
    given = [(k, v) for k, v in (("latency", latency), ("macs", macs), ("params", params))
             if v is not None]
    if len(given) != 1:
        raise DeeprootsError("give one budget: latency, macs or params (a fraction of the "
                             "dense model's)")
    budget, fraction = given[0]
    check_fraction(budget, fraction)
    total = _total(prices, budget)
    need = saving if saving is not None else total * (1 - fraction)
    best_saving = sum(max((_cost_saved(layer, o, budget, scale) for o in layer.options),
                          default=0) for layer in prices.layers)
    check_reachable(budget, fraction, total, best_saving, need)
    groups = _knapsack(prices, budget, need, scale)
    return Plan(budget, fraction, groups, predict(prices, groups, scale))


def check_reachable(budget: str, fraction: float, total: float, best_saving: float,
                    need: Optional[float] = None) -> None:
    """A one-line error unless saving ``best_saving`` of ``total`` (the most every groupable
    layer at its largest count saves) meets ``need`` (default: ``total`` less ``fraction``
    of it): the cheapest reachable, and why."""
    need = total * (1 - fraction) if need is None else need
    if best_saving < need:
        least = (total - best_saving) / total
        raise DeeprootsError(
            f"no schedule brings {budget} to {fraction:g} of the dense model's: the cheapest "
            f"reachable is {least:.3f} (every groupable layer at its largest count"
            + ("; the 1x1 convs, the stem and what is left dense keep the rest)" if budget !=
               "latency" else "; a grouped conv is not much faster than a dense one here)")
            + f". Accepted: {least:.3f} or more")


def cheapest(prices: Sensitivity, budget: str = "latency") -> Dict[str, int]:
    """Every layer at the count that saves the most of ``budget``: the cheapest schedule."""
    return {layer.layer: max(layer.options, key=lambda o: _cost_saved(layer, o, budget)).groups
            for layer in prices.layers if layer.options}


def latency_scale(prices: Sensitivity, groups: Dict[str, int], fraction: float) -> float:
    """How much more (above 1) or less time the whole model saved, measured at ``fraction``
    of the dense model's, than the sum of its grouped layers' savings timed alone: the
    factor :func:`choose` applies to them after that measurement (kept within 0.5 .. 2)."""
    alone = prices.ms - predict(prices, groups)["ms"]
    if alone <= 0:
        return 1.0
    return min(2.0, max(0.5, (1 - fraction) * prices.ms / alone))


def _knapsack(prices: Sensitivity, budget: str, need: float, scale: float = 1.0
              ) -> Dict[str, int]:
    """Each layer's count (1: dense) meeting ``need`` at least, least total loss: dynamic
    programming over the saving in :data:`STEPS` steps (each option's saving rounded down,
    so the schedule found meets the saving asked for)."""
    unit = need / STEPS if need > 0 else 1.0
    inf = float("inf")
    best: List[Tuple[float, Tuple[int, ...]]] = [(0.0, ())] + [(inf, ())] * STEPS
    for layer in prices.layers:
        choices = [(1, 0, 0.0)] + [
            (o.groups, int(_cost_saved(layer, o, budget, scale) // unit), _loss(prices, layer, o))
            for o in layer.options]
        new: List[Tuple[float, Tuple[int, ...]]] = [(inf, ())] * (STEPS + 1)
        for reached, (loss, picks) in enumerate(best):
            if loss == inf:
                continue
            for g, steps, cost in choices:
                j = min(STEPS, reached + steps)
                if loss + cost < new[j][0]:
                    new[j] = (loss + cost, picks + (g,))
        best = new
    loss, picks = best[STEPS]
    if loss == inf:  # the rounding lost what the exact sum reaches: the largest counts
        return {k: g for k, g in cheapest(prices, budget).items() if g > 1}
    return {layer.layer: g for layer, g in zip(prices.layers, picks) if g > 1}
