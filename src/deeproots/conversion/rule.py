"""Make any CNN a root network: the paper's schedule rule applied to a model deeproots did
not build, or the cheapest schedule that meets a cost budget, with a before/after report.

    new, report = deeproots.rootify(my_cnn, "root-8", example_input=torch.zeros(1, 3, 224, 224))
    print(report.table())

The rule (Tables 1, 3 and 7, Section 4.2): a forward pass of the example input finds the
spatial convolutions (kernel > 1) in the order data reaches them and the resolution each
writes. The stem (convs that read the input image's few channels) is left dense; the first
resolution with spatial convs after it gets N groups, and each smaller resolution the next
level down: N/2, N/4, ... for ``root-N`` (at least 1), 2N, 4N, ... for ``tree-N``, N
throughout for ``col-N``. 1x1 convs stay dense (a root module's 1x1 mixes the groups);
depthwise and already-grouped convs are left as they are unless ``regroup``. A count that
does not divide a layer's channels becomes the largest one below it that does, and the
report says so, as it says why each untouched layer was left.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import glob
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..capture import hooks
from ..errors import DeeprootsError
from ..layout import Placement, float32_cpu_copy
from ..checks import check_choice, check_groups_mapping, check_number
from .calibrate import CalibrationReport, DensePasses, calibrate, calibration_batches
from ..config import BATCHNORMS, STEMS
from ..inspection.costs import parse_input_size, profile
from ..models.layers import (GroupsError, apply_groups, block_diagonal_weight, common_divisors,
                     layer_name, module_paths, regroup_refusal)
from ..text import format_table

__all__ = ["rootify", "RootifyReport", "LayerChange", "parse_schedule", "trace_convs", "groupable",
           "ConvSite", "block_diagonal_weight", "INITS", "STEMS"]

SCHEDULE_FORMS = "root-N, tree-N or col-N (N a whole number >= 1, e.g. root-8)"
INITS = ("reinit", "block-diagonal")
_SCHEDULE = re.compile(r"^(root|tree|col)-([1-9][0-9]*)$")


def parse_schedule(schedule: str) -> Tuple[str, int]:
    """``"root-8"`` -> ``("root", 8)``; a ValueError naming the accepted forms otherwise."""
    match = _SCHEDULE.match(schedule.strip().lower()) if isinstance(schedule, str) else None
    if not match:
        raise DeeprootsError(f"schedule must be {SCHEDULE_FORMS}, or a mapping of layer names or "
                             f"resolutions ('56x56') to groups; got {schedule!r}")
    return match.group(1), int(match.group(2))


@dataclass
class ConvSite:
    """A conv layer as a forward pass reaches it: its order, channels, kernel, groups, and
    the resolution (H, W) it writes; ``calls`` is 0 when the example input never reached it."""

    name: str
    order: int
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    groups: int
    resolution: Optional[Tuple[int, int]]
    calls: int

    @property
    def spatial(self) -> bool:
        return max(self.kernel) > 1


def trace_convs(model: nn.Module, example_input: torch.Tensor) -> List[ConvSite]:
    """Every ``nn.Conv2d`` of ``model`` in the order a forward pass of ``example_input``
    reaches it (unreached ones last), with the resolution it writes. Runs on a copy in eval
    mode, without gradients."""
    runner = copy.deepcopy(model).eval()
    convs = [(layer_name(p), m) for p, m in runner.named_modules() if isinstance(m, nn.Conv2d)]
    seen: Dict[str, Tuple[int, Tuple[int, int], int]] = {}

    def reached(name, module, args, out):
        order, res, calls = seen.get(name, (len(seen), tuple(out.shape[-2:]), 0))
        seen[name] = (order, res, calls + 1)

    try:
        with hooks(convs, after=reached), torch.no_grad():
            runner(example_input)
    except Exception as err:  # a model that cannot run this input: say which and why
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise DeeprootsError(f"could not run {type(model).__name__} on an example input of shape "
                             f"{tuple(example_input.shape)} ({type(err).__name__}: {first}); give "
                             f"an example_input the model takes") from None
    sites = []
    for i, (name, conv) in enumerate(convs):
        order, res, calls = seen.get(name, (len(convs) + i, None, 0))
        sites.append(ConvSite(name, order, conv.in_channels, conv.out_channels,
                              tuple(conv.kernel_size), conv.groups,
                              tuple(int(v) for v in res) if res else None, calls))
    return sorted(sites, key=lambda s: s.order)


@dataclass
class LayerChange:
    """One conv layer before and after: groups, multiply-adds and params per image, and
    why it was left or adjusted (``note``)."""

    layer: str
    resolution: str
    kernel: str
    groups_before: int
    groups_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    note: str = ""


@dataclass
class RootifyReport:
    """What :func:`rootify` did: the schedule, one :class:`LayerChange` per conv layer, and
    the whole model's multiply-adds and params (per image, :func:`deeproots.profile`'s
    convention) before and after."""

    schedule: str
    input_size: Tuple[int, int, int]
    layers: List[LayerChange] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    init: str = "reinit"
    calibration: Optional[CalibrationReport] = None  # a calibrated conversion's report

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before

    @property
    def groups(self) -> Dict[str, int]:
        """``{layer: groups}`` of every layer this rootify changed."""
        return {c.layer: c.groups_after for c in self.layers if c.groups_after != c.groups_before}

    def to_dict(self) -> dict:
        return {**asdict(self), "macs_fraction": self.macs_fraction,
                "params_fraction": self.params_fraction}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """The per-layer table and the totals, for a person to read."""
        head = ("layer", "resolution", "kernel", "groups", "MACs before", "MACs after",
                "params before", "params after", "note")
        rows = [(c.layer, c.resolution, c.kernel,
                 f"{c.groups_before} -> {c.groups_after}" if c.groups_after != c.groups_before
                 else str(c.groups_before), f"{c.macs_before:,}", f"{c.macs_after:,}",
                 f"{c.params_before:,}", f"{c.params_after:,}", c.note) for c in self.layers]
        c, h, w = self.input_size
        return "\n".join([
            f"rootify {self.schedule} on a {c}x{h}x{w} input (grouped layers: {self.init})",
            format_table(head, rows, align="lllrrrrrl"),
            f"multiply-adds {self.macs_before:,} -> {self.macs_after:,} "
            f"({100 * self.macs_fraction:.1f}%)",
            f"params        {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.params_fraction:.1f}%)"]
            + ([self.calibration.table()] if self.calibration is not None else []))

    def __str__(self) -> str:
        return self.table()


def _largest_dividing(wanted: int, cin: int, cout: int, allow_depthwise: bool = True) -> int:
    """The largest count <= ``wanted`` that divides both channel counts; with
    ``allow_depthwise`` off, never one that makes the conv depthwise (in_channels groups)
    unless ``wanted`` itself asks for that."""
    fits = [d for d in common_divisors(cin, cout) if d <= wanted]
    if not allow_depthwise and fits[-1] == cin and wanted != cin and len(fits) > 1:
        return fits[-2]
    return fits[-1]


def _adjusted(wanted: int, s: "ConvSite", allow_depthwise: bool) -> Tuple[int, str]:
    g = _largest_dividing(wanted, s.in_channels, s.out_channels, allow_depthwise)
    if g == wanted:
        return g, ""
    if g != _largest_dividing(wanted, s.in_channels, s.out_channels):
        return g, (f"the rule's {wanted} does not divide {s.in_channels} -> "
                   f"{s.out_channels} channels; {g} does and keeps it from becoming "
                   f"depthwise (allow_depthwise=True to let it)")
    return g, (f"the rule's {wanted} does not divide {s.in_channels} -> {s.out_channels} "
               f"channels; {g} does")


def _resolution_levels(sites: Sequence[ConvSite]) -> Dict[Tuple[int, int], int]:
    """Level 0 for the first resolution with spatial convs after the stem, 1 for the next
    smaller one, and so on (a resolution larger than the first is level 0 too)."""
    first = sites[0].resolution
    area = lambda r: r[0] * r[1]  # noqa: E731
    smaller = sorted({s.resolution for s in sites if area(s.resolution) <= area(first)},
                     key=area, reverse=True)
    levels = {r: i for i, r in enumerate(smaller)}
    return {s.resolution: levels.get(s.resolution, 0) for s in sites}


def _stem(sites: Sequence[ConvSite], in_channels: int, stem: str) -> set:
    """The names of the stem's convs, left dense: those that read the input image
    (``"input"``), or every conv at the resolution the first conv writes
    (``"resolution"``: a deep stem, as ResNet-D's three 3x3 convs, is all stem)."""
    names = {s.name for s in sites if s.in_channels == in_channels and s.calls}
    if stem == "resolution":
        reached = [s for s in sites if s.calls]
        if reached:
            names |= {s.name for s in reached if s.resolution == reached[0].resolution}
    return names


def _rule(kind: str, n: int, level: int) -> int:
    if kind == "root":
        return max(1, n >> level)
    if kind == "tree":
        return n << level
    return n


def _plan(sites: List[ConvSite], schedule, in_channels: int, ignore: Sequence[str],
          regroup: bool, convs: Mapping[str, nn.Conv2d], stem: str = "input",
          allow_depthwise: bool = False) -> Dict[str, Tuple[int, str]]:
    """``{layer: (groups after, note)}`` for every conv layer."""
    plan, candidates = _candidates(sites, in_channels, ignore, regroup, stem)
    stem_names = _stem(sites, in_channels, stem)
    if isinstance(schedule, Mapping):
        plan = _plan_mapping(sites, candidates, schedule, plan, allow_depthwise)
    else:
        kind, n = parse_schedule(schedule)
        if candidates:
            widest = max(max(s.in_channels, s.out_channels) for s in candidates)
            if n > widest:
                raise DeeprootsError(f"schedule {schedule}: {n} groups is more than the "
                                     f"channels of any conv it groups (at most {widest}); "
                                     f"give N from 1 to {widest}")
            # every spatial conv after the stem sets the resolution levels, left ones too
            reached = [s for s in sites if s.calls and s.spatial and s.name not in stem_names]
            levels = _resolution_levels(reached)
            for s in candidates:
                plan[s.name] = _adjusted(_rule(kind, n, levels[s.resolution]), s,
                                         allow_depthwise)
    for s in candidates:  # a conv subclass that would compute something else is left
        g, note = plan[s.name]
        if g != s.groups:
            reason = regroup_refusal(convs[s.name], g)
            if reason:
                plan[s.name] = (s.groups, reason)
    return plan


def _candidates(sites: List[ConvSite], in_channels: int, ignore: Sequence[str],
                regroup: bool, stem: str) -> Tuple[Dict[str, Tuple[int, str]], List[ConvSite]]:
    """The convs the rule may group (spatial, past the stem, reached, not ignored, dense
    unless ``regroup``), and for every other conv why it is left."""
    plan: Dict[str, Tuple[int, str]] = {}
    candidates = []
    stem_names = _stem(sites, in_channels, stem)
    for s in sites:
        if any(fnmatch.fnmatchcase(s.name, pattern) for pattern in ignore):
            plan[s.name] = (s.groups, "ignored")
        elif s.calls == 0:
            plan[s.name] = (s.groups, "not reached by the example input")
        elif not s.spatial:
            plan[s.name] = (s.groups, "1x1: a root module's 1x1 mixes the groups")
        elif s.name in stem_names:
            plan[s.name] = (s.groups, f"stem: reads the {in_channels}-channel input"
                            if s.in_channels == in_channels else
                            f"stem: at the first conv's resolution ({_res(s)}, stem="
                            f"'resolution')")
        elif s.groups > 1 and not regroup:
            kind = "depthwise" if s.groups == s.in_channels else f"already in {s.groups} groups"
            plan[s.name] = (s.groups, f"{kind} (regroup=True to change it)")
        else:
            candidates.append(s)
    return plan, candidates


def groupable(model: nn.Module, example_input: torch.Tensor, *, ignore: Sequence[str] = (),
              stem: str = "input") -> Tuple[List[ConvSite], List[ConvSite]]:
    """Every conv a forward pass of ``example_input`` reaches (:func:`trace_convs`), and of
    them those the rule could group: spatial, past the stem, not ignored, dense, and able
    to be regrouped (a conv subclass that would compute something else regrouped is not).
    The model is not changed."""
    sites = trace_convs(model, example_input)
    convs = {layer_name(p): m for p, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    _, candidates = _candidates(sites, example_input.shape[1], ignore, False, stem)
    return sites, [s for s in candidates if not regroup_refusal(convs[s.name], 2)]


def _res(s: ConvSite) -> str:
    return f"{s.resolution[0]}x{s.resolution[1]}" if s.resolution else "-"


def _plan_mapping(sites, candidates, mapping, plan, allow_depthwise):
    check_groups_mapping(mapping)
    names = [s.name for s in sites]
    resolutions = sorted({f"{s.resolution[0]}x{s.resolution[1]}" for s in sites if s.resolution})
    for key in mapping:
        if not (key in resolutions or any(fnmatch.fnmatchcase(n, key) for n in names)):
            close = difflib.get_close_matches(key, names + resolutions, n=4, cutoff=0.4)
            raise GroupsError(f"schedule key {key!r} matches no conv layer or resolution"
                              f"{'; closest: ' + ', '.join(close) if close else ''}. Layers "
                              f"are named by module path (deeproots.conv_layers(model)), "
                              f"resolutions as HxW: {', '.join(resolutions)}")
    for s in candidates:
        res = f"{s.resolution[0]}x{s.resolution[1]}"
        wanted = None
        for key, value in mapping.items():  # later keys win, as in apply_groups
            if key == res or fnmatch.fnmatchcase(s.name, key):
                wanted = value
        if wanted is None:
            plan[s.name] = (s.groups, "not in the mapping")
            continue
        plan[s.name] = _adjusted(wanted, s, allow_depthwise)
    return plan


def rootify(model: nn.Module, schedule: Union[str, Mapping[str, int], None] = None, *,
            example_input: Optional[torch.Tensor] = None, ignore: Sequence[str] = (),
            macs: Optional[float] = None, params: Optional[float] = None,
            init: str = "reinit", regroup: bool = False, stem: str = "input",
            allow_depthwise: bool = False, calibration=None,
            on_stage: Optional[Callable[[str, nn.Module], None]] = None,
            refit_grouped: bool = True, batchnorm: str = "keep",
            latency: Optional[float] = None) -> Tuple[nn.Module, RootifyReport]:
    """A root network made from ``model``, and the :class:`RootifyReport` of what changed.
    ``model`` itself is not modified.

    Args:
        schedule: ``"root-N"``, ``"tree-N"``, ``"col-N"``, or a mapping of layer names
            (shell patterns) or resolutions (``"56x56"``) to groups.
        example_input: a batch the model takes (default: the first calibration image where
            ``calibration`` is given, else zeros of the model's ``default_input_size``); its
            forward pass finds the convs and their resolutions, and the report counts the
            costs at its size.
        ignore: layer names or patterns to leave as they are.
        macs, params: instead of a schedule, a budget: the smallest ``root-N`` that brings the
            model to at most this fraction of its multiply-adds (or parameters).
        latency: not here: a budget of measured time is searched per layer by
            :func:`deeproots.convert_model` (a one-line error says so).
        init: ``"reinit"`` (He initialisation, to train from scratch as the paper does) or
            ``"block-diagonal"`` (keep the diagonal blocks of the trained dense weights, to
            fine-tune).
        regroup: also regroup convs that are already grouped (depthwise ones included).
        stem: which convs are the stem, left dense: ``"input"`` (those that read the input
            image, the paper's rule) or ``"resolution"`` (every conv at the resolution the
            first conv writes: a deep stem such as ResNet-D's is all stem, and the levels
            count from the first resolution of the network's blocks).
        allow_depthwise: let the divisor adjustment make a conv depthwise (a 16-channel conv
            asked for 32 groups gets 16); off, it gets the largest count below its channels.
            A rule that itself asks for a conv's channel count (ResNet-50 root-64's first
            stage) is followed either way.
        calibration: for a trained model, calibration images (a tensor (N, C, H, W) or
            batches of them, from the training split): the conversion then keeps the
            model's accuracy with no gradient step (:mod:`deeproots.conversion.calibrate`: channels
            assigned to groups and the permutations folded into the neighbouring layers,
            the grouped convs within their groups and the 1x1 convs after them refit by
            least squares); ``init`` is then ``"calibrated"``, and ``report.calibration``
            says per layer how much weight and output energy each cut kept.
            ``on_stage(name, model)`` is called with each stage's model, to evaluate it;
            ``refit_grouped=False`` refits only the 1x1 convs; ``batchnorm``: ``"keep"``
            the trained running statistics (default) or ``"reestimate"`` them on the
            calibration images. Several conversions of one model: give the images as
            ``DensePasses(model, images)`` (:mod:`deeproots.conversion.calibrate`),
            and what the trained model computes on them is computed once for all.

    The model returned holds each tensor as ``model`` does (device, dtype, memory format:
    :class:`deeproots.layout.Placement`); a calibrated conversion computes in float32 on
    the CPU whatever the model's precision and device. Every conv keeps its class: a
    subclass (a conv that pads in ``forward``, one with a gain, ...) is regrouped in place,
    and one that would compute something else regrouped (a weight-standardised conv) is
    left as it was, the reason in the report. A conv the model reaches by several paths
    stays one module, grouped once.
    """
    if latency is not None:  # measured, not counted: the search of convert_model
        raise DeeprootsError(f"rootify's budgets are counted (macs, params); a latency budget "
                             f"({latency!r}) is measured and searched, layer by layer: "
                             f"deeproots.convert_model(model, latency={latency!r}, "
                             f"calibration=images, select=(x, y))")
    _check_options(model, schedule, init, calibration, stem, macs, params)
    check_choice("batchnorm", batchnorm, BATCHNORMS)
    _check_arguments(model, schedule, ignore, macs, params)  # before any forward pass
    batches = None if calibration is None else calibration_batches(calibration)
    placement = Placement(model)  # what is returned is held as the model is
    if calibration is not None and placement.moved:  # calibrated in float32 on the CPU
        model = float32_cpu_copy(model)
        example_input = None if example_input is None else example_input.to("cpu", torch.float32)
        batches = [b.to("cpu", torch.float32) for b in batches]
    if example_input is None and batches is not None:  # counted at the images' size
        example_input = batches[0][:1]
    example_input = _example(model, example_input)
    size = tuple(example_input.shape[1:])
    sites = trace_convs(model, example_input)
    if not any(s.spatial for s in sites):
        raise DeeprootsError(f"{type(model).__name__} has no spatial convolutions (kernel > 1) "
                             f"to group; rootify groups 3x3, 5x5, ... convs")
    convs = {layer_name(p): m for p, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    options = dict(convs=convs, stem=stem, allow_depthwise=allow_depthwise)
    before = profile(model, size)
    if schedule is None:
        schedule = _budget_schedule(sites, before, size[0], ignore, regroup, macs, params,
                                    options)
    plan = _plan(sites, schedule, size[0], ignore, regroup, **options)
    changes = {name: g for name, (g, _) in plan.items() if g != convs[name].groups}
    calibrated = None
    if calibration is not None:
        if not changes:
            raise DeeprootsError(f"schedule {schedule} groups no conv of "
                                 f"{type(model).__name__} here: {_why_nothing(sites, plan)}")
        kept = calibration if isinstance(calibration, DensePasses) else batches
        new, calibrated = calibrate(model, changes, kept, stages=on_stage,
                                    grouped=refit_grouped, batchnorm=batchnorm)
        init = "calibrated"
    else:
        new = _regrouped(model, changes, init, convs)
    shared = {layer_name(ps[0]): [layer_name(q) for q in ps[1:]]
              for ps in module_paths(model).values() if len(ps) > 1}
    report = _report(schedule, size, sites, plan, before, profile(new, size), init, shared)
    report.calibration = calibrated
    return placement.restore(new), report


def _check_options(model, schedule, init, calibration, stem, macs, params) -> None:
    """The options that name one choice among several, each checked first."""
    if not isinstance(model, nn.Module):
        raise DeeprootsError(f"rootify takes an nn.Module; got {type(model).__name__}")
    if init not in INITS:
        raise DeeprootsError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if calibration is not None and init != "reinit":
        raise DeeprootsError(f"calibration converts the trained weights itself; give init or "
                             f"calibration, not both (init={init!r})")
    if stem not in STEMS:
        raise DeeprootsError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
    if (schedule is None) == (macs is None and params is None) or (macs is not None and
                                                                     params is not None):
        raise DeeprootsError("give a schedule (e.g. 'root-8') or one budget (macs=0.5 or "
                             "params=0.5), not both and not neither")


def _regrouped(model: nn.Module, changes: Dict[str, int], init: str, convs) -> nn.Module:
    """A copy of ``model`` with ``changes`` applied: re-initialised (``init="reinit"``) or
    keeping the diagonal blocks of the trained weights (``"block-diagonal"``)."""
    new = copy.deepcopy(model)
    apply_groups(new, {glob.escape(n): g for n, g in changes.items()}, reinit=init == "reinit")
    if init == "block-diagonal":
        grouped = {layer_name(p): m for p, m in new.named_modules() if isinstance(m, nn.Conv2d)}
        with torch.no_grad():
            for name, g in changes.items():
                old = convs[name]
                grouped[name].weight.copy_(block_diagonal_weight(old.weight, g, old.groups))
    return new


def _check_arguments(model: nn.Module, schedule, ignore: Sequence[str],
                     macs: Optional[float], params: Optional[float]) -> None:
    """What can be checked without running the model, checked first (a model whose forward
    pass takes seconds, or hangs, never runs for an argument refused anyway): the schedule's
    form and its N against the widest conv, the budget, the ``ignore`` patterns against the
    conv layers' names."""
    names = [layer_name(p) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if isinstance(schedule, str):
        _, n = parse_schedule(schedule)
        widest = max((max(m.in_channels, m.out_channels) for m in model.modules()
                      if isinstance(m, nn.Conv2d)), default=0)
        if widest and n > widest:
            raise DeeprootsError(f"schedule {schedule}: {n} groups is more than the channels "
                                 f"of any conv it groups (at most {widest}); give N from 1 to "
                                 f"{widest}")
    elif isinstance(schedule, Mapping):
        check_groups_mapping(schedule)
    elif schedule is not None:
        raise DeeprootsError(f"schedule must be {SCHEDULE_FORMS}, or a mapping of layer names "
                             f"or resolutions to groups; got {type(schedule).__name__}")
    for key, budget in (("macs", macs), ("params", params)):
        if budget is not None:
            check_number(key, budget, strict=True)
    if isinstance(ignore, str):
        raise DeeprootsError(f"ignore takes a list of layer names or patterns; got the string "
                             f"{ignore!r} (write [{ignore!r}])")
    bad = [p for p in ignore if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if bad:
        close = difflib.get_close_matches(bad[0], names, n=4, cutoff=0.4)
        raise DeeprootsError(f"ignore {bad[0]!r} matches no conv layer"
                             f"{'; closest: ' + ', '.join(close) if close else ''}")


def _why_nothing(sites: Sequence[ConvSite], plan: Dict[str, Tuple[int, str]]) -> str:
    """Why a plan changes no conv, in a few words, and what would change one."""
    spatial = [s for s in sites if s.calls and s.spatial]
    note = {s.name: plan[s.name][1] for s in spatial}
    same = [s for s in spatial if not note[s.name] or note[s.name].startswith("the rule's")]
    # a subclass that would compute something else grouped (a weight-standardised conv):
    # another N does not group it, so it is named first
    left = [s for s in spatial if "computes something else" in note[s.name]]
    if left:
        kind = note[left[0].name].split(" ", 1)[0]
        why = (f"{len(left)} of its spatial convs would compute something else grouped "
               f"({kind}, e.g. {left[0].name}: it standardises or rescales its weight over the "
               f"whole filter), so are left as they were; build the model with the groups "
               f"you want instead")
        if same:
            why += (f"; the others it gives the groups they have already ({same[0].name}: "
                    f"{same[0].groups})")
        return why
    if same:
        s = same[0]
        return (f"it gives each conv it reaches the groups it has already ({s.name}: "
                f"{s.groups}); give another N")
    if any("regroup=True" in n for n in note.values()):
        return ("its spatial convs after the stem are grouped already; regroup=True "
                "(--regroup) regroups them")
    if all(n.startswith(("stem", "ignored")) for n in note.values()):
        return "every spatial conv is the stem or ignored; ignore fewer layers"
    return next(iter(note.values()), "it reaches no spatial conv")


def _example(model: nn.Module, example_input) -> torch.Tensor:
    if example_input is None:
        if getattr(model, "default_input_size", None) is None:
            raise DeeprootsError(f"{type(model).__name__} has no default input size; give "
                                 f"example_input, e.g. torch.zeros(1, 3, 224, 224)")
        param = next(model.parameters(), None)
        return torch.zeros(1, *parse_input_size(None, model),
                           device=param.device if param is not None else "cpu")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else \
            type(example_input).__name__
        raise DeeprootsError(f"example_input must be a batch of images shaped (N, C, H, W); got "
                             f"{shape}")
    return example_input


def _budget_schedule(sites, before, in_channels, ignore, regroup, macs, params,
                     options) -> str:
    """The smallest root-N meeting the budget, from exact per-layer costs: a conv's
    multiply-adds and weights scale as 1 / groups."""
    key, budget = ("macs", macs) if macs is not None else ("params", params)
    check_number(key, budget, strict=True)
    layers = {c.name: c for c in before.layers}
    total = getattr(before, key)
    if budget >= 1:
        return "root-1"
    candidates = [s for s in sites if s.calls and s.spatial]
    widest = max(s.in_channels for s in candidates)
    best: Optional[Tuple[float, int]] = None
    n = 2
    while n <= widest:
        plan = _plan(sites, f"root-{n}", in_channels, ignore, regroup, **options)
        saved = 0.0
        for s in sites:
            g_after, g_before = plan[s.name][0], s.groups
            if g_after == g_before or s.name not in layers:
                continue
            weights = s.out_channels * (s.in_channels // g_before) * s.kernel[0] * s.kernel[1]
            part = layers[s.name].macs if key == "macs" else weights
            saved += part * (1 - g_before / g_after)  # both scale as 1 / groups
        fraction = (total - saved) / total
        if fraction <= budget + 1e-12:
            return f"root-{n}"
        if best is None or fraction < best[0]:
            best = (fraction, n)
        n *= 2
    if best is None or best[0] >= 1 - 1e-12:
        notes = [note for g, note in
                 _plan(sites, "root-2", in_channels, ignore, regroup, **options).values()
                 if not note.startswith(("1x1", "stem", "not reached"))]
        if notes and all(n == "ignored" for n in notes):
            why = "every spatial conv after the stem is ignored"
        elif any("depthwise" in n or "already in" in n for n in notes) and not regroup:
            why = ("its spatial convs after the stem are depthwise or already grouped; "
                   "regroup=True (--regroup) regroups them")
        else:
            why = "no spatial conv after the stem can take more groups"
        raise DeeprootsError(f"no root-N schedule brings {key} to {budget} of the model's: "
                             f"root-N changes nothing here ({why}); the cheapest reachable is "
                             f"the model as it is, 1.000")
    raise DeeprootsError(f"no root-N schedule brings {key} to {budget} of the model's; the "
                         f"smallest fraction is {best[0]:.3f} (root-{best[1]}). Accepted: a "
                         f"budget of at least {best[0]:.3f}"
                         + (", or fewer ignored layers" if ignore else ""))


def _report(schedule, size, sites, plan, before, after, init, shared) -> RootifyReport:
    b = {c.name: c for c in before.layers}
    a = {c.name: c for c in after.layers}
    rows = []
    for s in sites:
        g, note = plan[s.name]
        if s.name in shared:  # one module under several names: grouped once, everywhere
            also = f"one module, also reached as {', '.join(shared[s.name])}"
            note = f"{note}; {also}" if note else also
        cb, ca = b.get(s.name), a.get(s.name)
        rows.append(LayerChange(
            s.name, _res(s), "x".join(map(str, s.kernel)), s.groups, g,
            cb.macs if cb else 0, ca.macs if ca else 0, cb.params if cb else 0,
            ca.params if ca else 0, note))
    name = schedule if isinstance(schedule, str) else "mapping " + json.dumps(dict(schedule))
    return RootifyReport(name, size, rows, before.macs, after.macs, before.params,
                         after.params, init)
