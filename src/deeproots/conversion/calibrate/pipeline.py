"""Converting a *trained* CNN into a root network that keeps its accuracy, with no gradient
step: the grouped convs keep the weight that matters (channels assigned to groups, the
permutations folded into the neighbouring layers), and the 1x1 conv after each of them is
refit so that the root module computes what the dense layers computed, on a few thousand
calibration images.

    new, report = deeproots.rootify(trained, "root-8", calibration=images)  # model's inputs
    print(report.calibration.table())

The conversion is a list of stages (:data:`PIPELINE`), each a small module of this package,
that one loop (:func:`calibrate`) runs in order, timing them and, when asked, evaluating the
model after each; to add a stage, write its function on :class:`Conversion` and list it.
The stages, each measured by the benchmark (``benchmarks/calibrated_rootify.py``):

1. **Channel-to-group assignment.** For each conv to group, its input channels and its filters
   are assigned to groups of equal size so as to keep as much weight on the diagonal blocks
   as possible, each input channel weighted by its activation energy on the calibration
   images (:func:`assign_groups`: alternating optimal assignments, from the components of
   the weight's support and from other starts). The input permutation is folded into the
   layer that produces those channels (its filters and bias, the batch norm between), the
   output permutation into the conv that reads them: the dense model computes exactly what
   it computed before (:func:`fold_permutations`), and the grouped model has the cost of the
   registered root variant. Where a channel order is fixed (the channels also reach a
   residual add, a concatenation, or a layer that is not a conv), that side keeps its order
   and the assignment is optimised over the other; the report says so.
2. **The cut.** Each grouped conv keeps its diagonal blocks.
3. **Batch norms** (``batchnorm``): ``"keep"`` (the default) keeps the trained running
   statistics, as the refit makes each layer's output what the dense one was: the model
   computes what it did wherever the conversion changed nothing, and what each layer's
   price (:mod:`deeproots.conversion.sensitivity`) measured. ``"reestimate"`` recomputes
   them on the calibration images in train mode (the batch statistics the network trained
   with). Measured (``benchmarks/batchnorm_drift.py``, docs/conversion.md): on a well-trained
   nin the two agree within 0.2 points; on a resnet50 trained one epoch, whose running
   statistics lag its batch statistics, re-estimating cost root-16 six points.
4. **Reconstruction.** In the order the forward pass reaches them, each on the converted
   model before it (``"reestimate"``: its batch norms re-estimated up to it): each grouped
   conv is refit
   within its groups (:func:`refit_grouped`: each group's filters, from the group's own
   input channels, fit to the dense filters' outputs, taking over what they can of the
   off-diagonal blocks' part), and each ungrouped 1x1 conv from the first grouped conv on
   (:func:`refit_pointwise`; ``refit="root"``: only the one right after each grouped conv),
   both in closed form (ridge least squares over the calibration pixels), so that their
   outputs match the dense model's.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ...checks import check_choice
from ...config import BATCHNORMS
from ...errors import DeeprootsError
from ...layout import channels_last
from ...models.layers import block_diagonal_weight, conv_layers, regroup
from .assignment import assign_groups, kept_fraction, order_of
from .batchnorm import reestimate_batchnorm
from .passes import (DensePasses, activation_energy, dense_outputs, first_reached,
                     norms_before, output_pixels, prefixed, reached_convs, sampled_inputs)
from .refit import MIN_PIXELS_PER_WEIGHT, refit_grouped, refit_pointwise
from .report import CalibrationReport, LayerCalibration
from .sites import RootSite, fold_permutations, root_sites

__all__ = ["calibrate", "check_trained", "Conversion", "Stage", "PIPELINE", "STAGES", "REFITS"]

REFITS = ("root", "all")  # which 1x1 convs are refit: each root module's, or every one after


@dataclass
class Conversion:
    """What the stages of one calibrated conversion share: the trained model (``dense``,
    never changed) and the one being converted (``new``), in channels-last; the groups each
    conv gets (``changes``) and those convs in model order; the calibration batches; what
    the passes found (each conv's input energy, its neighbours, a batch of its inputs); the
    channel orders the permutations left; and the report the stages fill."""

    dense: nn.Module
    new: nn.Module
    changes: Dict[str, int]
    batches: list
    report: CalibrationReport
    ridge: float
    refit: str
    grouped: bool
    batchnorm: str
    order: List[str] = field(default_factory=list)
    sites: Dict[str, RootSite] = field(default_factory=dict)
    energy: Dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    out_orders: Dict[str, torch.Tensor] = field(default_factory=dict)  # where permuted
    in_orders: Dict[str, torch.Tensor] = field(default_factory=dict)
    keep: List[nn.Module] = field(default_factory=list)  # batch norms before the first
    passes: Optional[DensePasses] = None  # the dense side kept across conversions, if given


@dataclass(frozen=True)
class Stage:
    """One stage: ``run(conversion)`` changes it and returns the model to evaluate after it
    (None: nothing to show yet); a ``reference`` stage only shows a model (runs only when
    the stages are evaluated)."""

    name: str
    run: Callable[[Conversion], Optional[nn.Module]]
    reference: bool = False


def _cut(conv: nn.Conv2d, groups: int) -> None:
    """``conv`` keeps the diagonal blocks of its weight, regrouped in place."""
    kept = block_diagonal_weight(conv.weight.detach(), groups)
    regroup(conv, groups, reinit=False)
    with torch.no_grad():
        conv.weight.copy_(kept)


def diagonal_blocks(c: Conversion) -> nn.Module:
    """The reference: the trained model's diagonal blocks alone, in the trained order."""
    plain = copy.deepcopy(c.dense)
    for name in c.order:
        _cut(conv_layers(plain)[name], c.changes[name])
    return plain


def assign(c: Conversion) -> None:
    """Stage 1 (:mod:`.assignment`, :mod:`.sites`): each conv's channels assigned to groups,
    the permutations folded into its neighbours; the dense model computes what it did."""
    for name in c.order:
        g, site = c.changes[name], c.sites[name]
        if site.producer in c.changes:  # another conv being grouped makes these channels
            site.producer, site.fixed_in = None, f"they come from {site.producer}, grouped too"
        if site.consumer in c.changes:
            site.consumer, site.fixed_out = None, f"they go to {site.consumer}, grouped too"
        conv = conv_layers(c.new)[name]
        w = conv.weight.detach().double()
        score = (w.pow(2).sum((2, 3)) * c.energy[name].double()[None, :]).numpy()
        plain_rows = np.arange(conv.out_channels) // (conv.out_channels // g)
        plain_cols = np.arange(conv.in_channels) // (conv.in_channels // g)
        row_g, col_g, kept = assign_groups(score, g, fix_rows=site.consumer is None,
                                           fix_cols=site.producer is None)
        perm_out = order_of(row_g) if site.consumer is not None else None
        perm_in = order_of(col_g) if site.producer is not None else None
        fold_permutations(c.new, site, perm_in, perm_out)
        for conv_name, perm in ((site.producer, perm_in), (name, perm_out)):
            if perm is not None:
                before = c.out_orders.get(conv_name)
                c.out_orders[conv_name] = perm if before is None else before[perm]
        if perm_in is not None:
            c.in_orders[name] = perm_in
        fixed = "; ".join(f"{side} order kept: {why}" for side, why in (
            ("input", site.fixed_in), ("output", site.fixed_out)) if why)
        c.report.layers.append(LayerCalibration(
            name, g, kept_fraction(score, plain_rows, plain_cols), float(kept),
            permuted_in=perm_in is not None, permuted_out=perm_out is not None, fixed=fixed))


def cut(c: Conversion) -> nn.Module:
    """Stage 2: each grouped conv keeps its diagonal blocks (the output energy each cut keeps
    in the report); from here on the passes start at the first grouped conv, the trained
    layers before it computed once."""
    first = first_reached(c.new, c.order, c.batches[0])
    fast = (c.passes.prefixed(c.new, first) if c.passes is not None
            else prefixed([c.dense, c.new], first, c.batches))
    c.keep = norms_before(c.new, first, c.batches[0])
    if fast is not None:
        c.batches = fast
    for name, row in zip(c.order, c.report.layers):
        conv = conv_layers(c.new)[name]
        dense_permuted = copy.deepcopy(conv)
        _cut(conv, c.changes[name])
        x = c.inputs[name] if name not in c.in_orders else c.inputs[name][:, c.in_orders[name]]
        row.output_kept = _output_kept(dense_permuted, conv, x)
    return copy.deepcopy(c.new)


def batch_norm(c: Conversion) -> Optional[nn.Module]:
    """Stage 3 (:mod:`.batchnorm`): with ``"reestimate"``, the batch norms re-estimated on the
    calibration images; with ``"keep"``, nothing (no stage to show)."""
    if c.batchnorm == "keep":
        return None
    c.report.batchnorms = reestimate_batchnorm(c.new, c.batches, keep=c.keep)
    return copy.deepcopy(c.new)


def refit(c: Conversion) -> nn.Module:
    """Stage 4 (:mod:`.refit`): in the order the forward pass reaches them, the grouped convs
    within their groups and the 1x1 convs (each root module's, ``refit="root"``, or every
    ungrouped one from the first grouped conv on, ``"all"``), each on the model as it is then
    (``"reestimate"``: its batch norms up to it re-estimated first), so that every fit sees
    the statistics it will run with; a fit's constant for a conv without a bias goes into
    the running mean of the batch norm after it."""
    targets = _refit_targets(c)
    for row in c.report.layers:
        if c.sites[row.layer].consumer not in targets:
            row.refit = "no 1x1 conv reads it: not refit"
    if c.grouped:  # the grouped convs too, each where the forward pass reaches it
        reached = reached_convs(c.new, c.batches[0])
        targets = sorted(set(targets) | {n for n in c.order if n in reached}, key=reached.index)
    rows = {row.layer: row for row in c.report.layers}
    roots = {c.sites[row.layer].consumer for row in c.report.layers}
    _underdetermined(c, [n for n in targets if n in rows or n in roots])
    cached = (c.passes.outputs(targets, c.batches) if c.passes is not None  # the targets,
              else dense_outputs(c.dense, targets, c.batches)) or {}  # in one pass
    reestimate = c.batchnorm == "reestimate"
    for name in targets:
        if reestimate:
            reestimate_batchnorm(c.new, c.batches, until=conv_layers(c.new)[name], keep=c.keep)
        if name in rows:  # a grouped conv, refit within its groups
            rows[name].grouped_unexplained = refit_grouped(
                c.dense, c.new, name, c.batches, c.ridge, c.out_orders.get(name),
                cached.get(name))
            if rows[name].grouped_unexplained is None:
                c.report.not_refit.append(name)
            continue
        unexplained = refit_pointwise(c.dense, c.new, name, c.batches, c.ridge,
                                      c.out_orders.get(name), cached.get(name),
                                      0 if name in roots else MIN_PIXELS_PER_WEIGHT)
        if unexplained is None:  # too few calibration pixels for its weights: kept
            c.report.kept.append(name)
            continue
        c.report.refits[name] = unexplained
        for row in c.report.layers:
            if c.sites[row.layer].consumer == name:
                row.refit, row.refit_unexplained = name, unexplained
    if targets and reestimate:
        reestimate_batchnorm(c.new, c.batches, keep=c.keep)  # those after the last refit
    return copy.deepcopy(c.new)


def _underdetermined(c: Conversion, refit: List[str]) -> None:
    """The report's ``underdetermined``: each of the convs refit whatever the count (the
    grouped ones and the 1x1 each root module mixes them with) whose calibration pixels are
    fewer than the weights each of its filters is fit with (and a constant): the fit then
    memorises the calibration images, and the energy it leaves unexplained is measured on
    them alone (3 images of 28x28 px leave nin's conv3a, 4 groups at 7x7, 147 pixels for
    433 weights: 0.00% unexplained, 0.60 top-1 from 0.89)."""
    if not refit:
        return
    convs = conv_layers(c.new)
    for name, pixels in output_pixels(c.new, refit, c.batches[0]).items():
        conv = convs[name]
        weights = (conv.in_channels // conv.groups * conv.kernel_size[0]
                   * conv.kernel_size[1] + 1)
        if pixels * c.report.images < weights:
            c.report.underdetermined[name] = (pixels * c.report.images, weights,
                                              -(-MIN_PIXELS_PER_WEIGHT * weights // pixels))


def _refit_targets(c: Conversion) -> List[str]:
    """The 1x1 convs to refit, in the order a forward pass reaches them."""
    reached = reached_convs(c.new, c.batches[0])
    convs = conv_layers(c.new)
    first = min((reached.index(n) for n in c.order if n in reached), default=len(reached))

    def pointwise(n):
        conv = convs[n]
        return conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)

    if c.refit == "all":
        return [n for n in reached[first + 1:] if pointwise(n) and n not in c.order]
    roots = {c.sites[n].consumer for n in c.order}
    return [n for n in reached if n in roots and pointwise(n)]


# the stages, in order; those that return a model are evaluated when asked (STAGES)
PIPELINE = (Stage("block-diagonal", diagonal_blocks, reference=True),
            Stage("assignment", assign),
            Stage("+ permutation", cut),
            Stage("+ batch norm", batch_norm),
            Stage("+ refit", refit))
STAGES = ("block-diagonal", "+ permutation", "+ batch norm", "+ refit")  # those shown
# ("+ batch norm" only where the batch norms are re-estimated)


def calibrate(model: nn.Module, changes: Dict[str, int], batches, *,
              stages: Optional[Callable[[str, nn.Module], None]] = None, ridge: float = 1e-4,
              refit: str = "all", grouped: bool = True, batchnorm: str = "keep"
              ) -> Tuple[nn.Module, CalibrationReport]:
    """``model`` (trained, dense in the layers ``changes`` names) converted to those groups
    by the stages of :data:`PIPELINE`, on the calibration ``batches`` (a list, or the
    :class:`~.passes.DensePasses` of ``model`` kept from earlier conversions of it: what the
    trained model computes on them then comes from there); ``model`` itself is not
    changed. ``stages``, if given, is called with each shown stage's name and model (a
    copy of the conversion so far, to evaluate; its time is not the conversion's).
    ``refit``: ``"all"`` (every ungrouped 1x1 conv from the first grouped conv on) or
    ``"root"`` (the one right after each grouped conv); ``grouped``: refit the grouped convs
    too; ``batchnorm``: ``"keep"`` the trained running statistics or ``"reestimate"`` them
    (stage 3). Returns the converted model and its report."""
    check_choice("refit", refit, REFITS)
    check_choice("batchnorm", batchnorm, BATCHNORMS)
    check_trained(model)
    started, evaluating = time.perf_counter(), 0.0
    c = _conversion(model, changes, batches, ridge, refit, grouped, batchnorm)
    for stage in PIPELINE:
        if stage.reference and stages is None:
            continue
        shown = stage.run(c)
        if stages is not None and shown is not None:
            t0 = time.perf_counter()
            stages(stage.name, shown)
            evaluating += time.perf_counter() - t0
    c.report.seconds = time.perf_counter() - started - evaluating
    return c.new, c.report


def _conversion(model, changes, batches, ridge, refit, grouped, batchnorm) -> Conversion:
    """The conversion's start: both models and the batches channels-last (the calibration
    passes run twice as fast so on a CPU), the convs to group, their neighbours (one
    trace), their inputs' energy and a batch of their inputs. ``batches`` a
    :class:`DensePasses`: the trained model's copy and batches kept there."""
    new = channels_last(copy.deepcopy(model).eval())
    passes = batches if isinstance(batches, DensePasses) else None
    if passes is not None:
        passes.check(model)
        dense, batches = passes.dense, passes.batches()
    else:
        dense = channels_last(copy.deepcopy(model).eval())
        batches = [channels_last(b) for b in batches]
    c = Conversion(dense, new, dict(changes), batches,
                   CalibrationReport(images=sum(len(b) for b in batches), batchnorm=batchnorm),
                   ridge, refit, grouped, batchnorm, passes=passes)
    c.order = [n for n in conv_layers(new) if n in changes]
    for name in c.order:
        if conv_layers(new)[name].groups != 1:
            raise DeeprootsError(f"{name} is already in {conv_layers(new)[name].groups} groups: "
                                 f"calibrated conversion groups dense convs (regroup=False)")
    c.energy = (passes.energy(c.order) if passes is not None
                else activation_energy(dense, c.order, batches))
    c.sites = root_sites(new, c.order)
    c.inputs = sampled_inputs(dense, c.order, batches[0])
    return c


def _output_kept(dense_conv: nn.Conv2d, cut: nn.Conv2d, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = dense_conv(x)
        got = cut(x)
        bias = dense_conv.bias.view(1, -1, 1, 1) if dense_conv.bias is not None else 0
        energy = float((want - bias).pow(2).sum())
        return 1.0 - float((got - want).pow(2).sum()) / max(energy, 1e-30)


def check_trained(model: nn.Module, what: str = "the model") -> None:
    """A one-line :class:`DeeprootsError` for a model no conversion can start from: a
    weight or buffer that holds NaN or infinity (a run that diverged), a batch norm whose
    running variance is negative (an edited or broken file)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = "NaN" if torch.isnan(t).any() else "infinity"
            raise DeeprootsError(f"{what}: {name} holds {bad}; a model whose weights are not "
                                 f"finite (a run that diverged) cannot be converted: take an "
                                 f"earlier checkpoint (best.pt)")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None \
                and (m.running_var < 0).any():
            raise DeeprootsError(f"{what}: batch norm {name} has a negative running variance "
                                 f"({float(m.running_var.min()):.3g}); a variance is >= 0, so "
                                 f"the file was edited or broken")
