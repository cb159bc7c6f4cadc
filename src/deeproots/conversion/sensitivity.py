"""Each layer's price: for every conv the rule could group and every group count it could take,
what grouping that layer alone costs in accuracy and what it saves in multiply-adds,
parameters and measured time. The table a budgeted conversion searches
(:mod:`.search`), and what ``deeproots rootify CHECKPOINT --sensitivity`` prints.

The accuracy side, closed form and with no gradient step, per layer and group count:

* the channels assigned to groups as the calibrated conversion assigns them
  (:func:`~deeproots.conversion.calibrate.assign_groups`, the same neighbours' fixed orders);
* the grouped conv refit within its groups by ridge least squares to the dense conv's outputs
  on the calibration images (the calibrated conversion's refit), from one set of normal
  equations per layer: the full covariance of the layer's input patches, whose diagonal
  blocks serve every group count and assignment alike; the energy it leaves unexplained;
* the top-1, on other images of the training split (the selection images), of the model
  with that layer alone so converted (its weight block-diagonal in the assigned order, the
  constant term in its bias or the batch norm after it): a pass that starts at the layer,
  the layers before it computed once; and in the same pass how far its predictions moved
  from the dense model's, the mean KL divergence of its softmax from the dense one. On 1,000
  selection images a top-1 moves by a point or more with which images happen to flip (a
  layer can even measure *better* than dense); the divergence counts every image's change,
  so it orders the options without that noise and adds up over layers, to second order:
  the search (:mod:`.search`) minimises its sum.

The speed side: each conv timed at each group count on an input of its own shape in the
model, at the batch size asked, channels-last (the ``fold`` path's form), and the whole
dense model in the ``fold`` path, all side by side in one session by the one timer
(:func:`deeproots.speed.timing.interleaved`), so that a schedule's time is predicted as the
model's less what each layer saves, every figure of that sum taken in the same minutes.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..capture import capture
from ..errors import DeeprootsError
from ..layout import channels_last
from ..models.layers import common_divisors, conv_layers
from ..runtime import check_batch_fits
from ..speed.timing import contention_note, interleaved
from ..text import format_table
from .calibrate.assignment import assign_groups
from .calibrate.passes import calibration_batches, forward, prefixed
from .calibrate.refit import constant_home, conv_patches, place_constant, ridge_solve
from .calibrate.sites import root_sites
from .rule import ConvSite, groupable

__all__ = ["Option", "LayerPrice", "Sensitivity", "layer_prices", "group_counts", "most_saved",
           "ROOT_COUNTS", "model_ms", "select_top1", "selection_scores"]

# the counts a layer is priced at (those that divide its channels), and the uniform root-N
# schedules a budget and a frontier compare with: the paper's
ROOT_COUNTS = (2, 4, 8, 16, 32, 64)
FIT_ROWS = 131072  # input patches a layer's normal equations are summed over, at most
RIDGE = 1e-4
KL_FLOOR = 1e-4  # nats: a divergence below this is taken as this when measuring a ratio to it
VERIFIED_FACTOR = (0.25, 50.0)  # how far a check of a layer may scale its priced divergences


@dataclass
class Option:
    """One layer at one group count: its multiply-adds and parameters per image, its
    measured ms per batch, the energy its refit leaves unexplained (a fraction of the dense
    output's), the selection images' top-1 with this layer alone converted, and the mean
    KL divergence (nats) of that model's softmax from the dense model's on them (None: not
    measured, as in a table written before it was)."""

    groups: int
    macs: int
    params: int
    ms: float
    unexplained: float
    top1: float
    kl: Optional[float] = None


@dataclass
class LayerPrice:
    """One groupable conv: its shape, its dense costs and time, and its :class:`Option`\\ s."""

    layer: str
    resolution: str
    kernel: str
    in_channels: int
    out_channels: int
    macs: int
    params: int
    ms: float
    options: List[Option] = field(default_factory=list)


@dataclass
class Sensitivity:
    """The price of every groupable layer of a model, and the model's own: its top-1 on the
    selection images, its multiply-adds and parameters per image, its ms per batch in the
    ``fold`` path at ``batch_size`` on ``device``."""

    model: str
    device: str
    batch_size: int
    fit_images: int
    select_images: int
    top1: float
    macs: int
    params: int
    ms: float
    layers: List[LayerPrice] = field(default_factory=list)
    seconds: float = 0.0
    # "layer@groups" -> the divergence that layer alone measured converted by the whole
    # calibrated pipeline (batch norms re-estimated, its 1x1 refit): filled by a budgeted
    # conversion as it checks the layers its search proposes (see :meth:`kl_of`)
    verified: Dict[str, float] = field(default_factory=dict)
    others: Optional[float] = None  # other processes' share of the CPUs while it was timed

    def to_dict(self) -> dict:
        return asdict(self)

    def kl_of(self, layer: LayerPrice, option: Option) -> Optional[float]:
        """``option``'s divergence as the search counts it: as priced, times what the
        calibrated conversion of that layer alone measured over what it was priced at (the
        mean over the counts checked, kept within :data:`VERIFIED_FACTOR`; 1 where none
        was). The price's closed-form refit leaves the batch norms as they were; the
        conversion re-estimates them, and on a model whose statistics drifted (a one-epoch
        resnet50's deepest stage) that costs 3 points more than the price says."""
        if option.kl is None:
            return None
        factors = []
        for o in layer.options:
            measured = self.verified.get(f"{layer.layer}@{o.groups}")
            if measured is not None and o.kl is not None:
                factors.append(measured / max(o.kl, KL_FLOOR))
        if not factors:
            return option.kl
        low, high = VERIFIED_FACTOR
        return option.kl * min(high, max(low, sum(factors) / len(factors)))

    @classmethod
    def from_dict(cls, raw: dict) -> "Sensitivity":
        """The table :meth:`to_dict` (``--sensitivity --json``) wrote."""
        layers = [LayerPrice(**{**layer, "options": [Option(**o) for o in layer["options"]]})
                  for layer in raw.get("layers", [])]
        return cls(**{**raw, "layers": layers})

    def top1_per_kl(self) -> Optional[float]:
        """The top-1 lost per nat of divergence, fitted over every option (least squares
        through the origin: ``drop = slope * kl``), or None where no option has a divergence.
        What turns a schedule's summed divergence into a predicted top-1."""
        pairs = [(self.top1 - o.top1, o.kl) for layer in self.layers for o in layer.options
                 if o.kl is not None]
        denominator = sum(kl * kl for _, kl in pairs)
        if not pairs or denominator <= 0:
            return None
        return max(0.0, sum(drop * kl for drop, kl in pairs) / denominator)

    def table(self) -> str:
        """One row per layer and group count: what it costs and what it saves."""
        head = ("layer", "shape", "groups", "top-1 cost", "KL", "unexplained", "MACs saved",
                "params saved", "ms saved", "ms")
        rows = []
        for layer in self.layers:
            shape = (f"{layer.in_channels}->{layer.out_channels} {layer.kernel} "
                     f"{layer.resolution}")
            rows.append((layer.layer, shape, "1", "", "", "", "", "", "", f"{layer.ms:.2f}"))
            for o in layer.options:
                rows.append(("", "", str(o.groups), f"{100 * (self.top1 - o.top1):+.2f}",
                             "" if o.kl is None else f"{o.kl:.4f}",
                             f"{100 * o.unexplained:.1f}%",
                             f"{100 * (layer.macs - o.macs) / self.macs:.1f}%",
                             f"{100 * (layer.params - o.params) / self.params:.1f}%",
                             f"{100 * (layer.ms - o.ms) / self.ms:.1f}%", f"{o.ms:.2f}"))
        return "\n".join([
            f"{self.model}: each layer alone grouped; top-1 on {self.select_images} selection "
            f"images ({100 * self.top1:.2f} dense), costs saved as a share of the model's "
            f"({self.macs:,} MACs, {self.params:,} params, {self.ms:.1f} ms a batch of "
            f"{self.batch_size} on {self.device}, fold path)",
            format_table(head, rows, align="llrrrrrrrr"),
            *filter(None, [contention_note(self.others, "the layers")]),
            f"priced in {self.seconds:.0f} s"])


def group_counts(site: ConvSite) -> List[int]:
    """The counts a conv is priced at: those of :data:`ROOT_COUNTS` that divide both its
    channel counts. (Every divisor from 2 to 64 was tried, 2026-12-06: on nin, 96 -> 192
    and 192 -> 192 channels, it doubles the options, the search chose none of the new ones
    that beat a power of two, and a `--latency 0.7` conversion took 158 s instead of about
    110, past issue 30's two minutes; docs/conversion.md.)"""
    return [g for g in common_divisors(site.in_channels, site.out_channels)
            if g in ROOT_COUNTS]


# ---------------------------------------------------------------------------------------------
# The normal equations of one layer


class _Equations:
    """The normal equations of one conv's refit: the covariance of its input patches (with a
    ones column: the constant term), against its dense outputs, summed in float64 over at
    most :data:`FIT_ROWS` patches; each input channel's energy; the outputs' energy."""

    def __init__(self, conv: nn.Conv2d, rows_per_batch: int, name: str = "the conv"):
        self.conv, self.rows, self.name = conv, rows_per_batch, name
        self.d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        self.xtx = torch.zeros(self.d + 1, self.d + 1, dtype=torch.float64)
        self.xty = torch.zeros(self.d + 1, conv.out_channels, dtype=torch.float64)
        self.yty = torch.zeros(conv.out_channels, dtype=torch.float64)  # per filter
        self.centred = torch.zeros(conv.out_channels, dtype=torch.float64)
        self.energy = torch.zeros(conv.in_channels, dtype=torch.float64)
        self.pixels = 0
        self.generator = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        c = self.conv
        x, y = x.float().contiguous(), y.float()
        self.energy += x.pow(2).sum((0, 2, 3)).double()
        self.pixels += x.shape[0] * x.shape[2] * x.shape[3]
        cols = conv_patches(c, x)  # (N, d, L): padded as the conv pads, wherever it does
        if cols is None:  # more than one call with its weight (a gain after it): as written
            cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)
        a = cols.transpose(1, 2).reshape(-1, self.d)
        b = y.permute(0, 2, 3, 1).reshape(-1, c.out_channels)
        if len(a) != len(b):
            raise DeeprootsError(f"{self.name}: {type(c).__name__} writes {len(b) // len(x)} "
                                 f"pixels an image from {len(a) // len(x)} patches of its "
                                 f"input; its forward convolves something deeproots does not "
                                 f"see, so it cannot be priced: leave it out (--ignore "
                                 f"{self.name})")
        if len(a) > self.rows:  # a random sample of the patches: the fit's statistics
            pick = torch.randperm(len(a), generator=self.generator)[:self.rows]
            a, b = a[pick], b[pick]
        a = torch.cat([a, torch.ones(len(a), 1)], 1)
        self.xtx += (a.T @ a).double()
        self.xty += (a.T @ b).double()
        self.yty += b.double().pow(2).sum(0)
        bias = c.bias.detach().double() if c.bias is not None else 0.0
        self.centred += (b.double() - bias).pow(2).sum(0)

    def score(self) -> np.ndarray:
        """Each (filter, input channel) kernel's energy times the channel's input energy."""
        w = self.conv.weight.detach().double()
        return (w.pow(2).sum((2, 3)) * (self.energy / max(self.pixels, 1))[None, :]).numpy()

    def refit(self, rows: np.ndarray, cols: np.ndarray, groups: int, intercept: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """The dense-shaped weight that is the refit grouped conv (zero off the assigned
        blocks), its constant term per filter, and the fraction of the centred output energy
        it leaves unexplained."""
        c = self.conv
        taps = c.kernel_size[0] * c.kernel_size[1]
        weight = torch.zeros(c.out_channels, c.in_channels * taps, dtype=torch.float64)
        const = torch.zeros(c.out_channels, dtype=torch.float64)
        explained = 0.0
        for k in range(groups):
            filters = torch.from_numpy(np.flatnonzero(rows == k))
            channels = torch.from_numpy(np.flatnonzero(cols == k))
            index = (channels[:, None] * taps + torch.arange(taps)[None, :]).reshape(-1)
            index = torch.cat([index, torch.tensor([self.d])])  # the constant's, last
            xtx = self.xtx[index][:, index]
            xty = self.xty[index][:, filters]
            n = len(index) - 1
            solution, part = ridge_solve(xtx, xty, RIDGE, intercept)
            explained += float(part)
            weight[filters[:, None], index[:n][None, :]] = solution[:n].T
            if intercept:
                const[filters] = solution[n]
        total = float(self.yty.sum())
        unexplained = (total - explained) / max(float(self.centred.sum()), 1e-30)
        return weight.reshape(c.weight.shape).float(), const.float(), unexplained


# ---------------------------------------------------------------------------------------------
# The price of every layer


def layer_prices(model: nn.Module, fit, select: Tuple[torch.Tensor, torch.Tensor], *,
                 batch_size: int = 128, device: str = "cpu", ignore: Sequence[str] = (),
                 stem: str = "input", repeats: int = 5, name: str = "",
                 progress: Optional[Callable[[str], None]] = None) -> Sensitivity:
    """The :class:`Sensitivity` of ``model`` (trained, eval mode; not changed): every conv
    the rule could group, at every count :func:`group_counts` gives it, priced
    on the calibration images ``fit`` (a tensor or batches), the labelled ``select`` images
    (images, labels), and timings at ``batch_size`` on ``device``. ``progress`` is called
    with a line as each layer is done."""
    started = time.perf_counter()
    model = model.eval()
    fit_batches = [channels_last(b) for b in calibration_batches(fit)]
    images, labels = select
    select_batches = [channels_last(b) for b in calibration_batches(images)]
    example = fit_batches[0][:1]
    sites, layers = groupable(model, example, ignore=ignore, stem=stem)
    if not layers:
        raise DeeprootsError(f"{name or type(model).__name__} has no conv the rule could "
                             f"group (every spatial conv is the stem, ignored or grouped "
                             f"already)")
    convs = conv_layers(model)
    from ..inspection.costs import profile  # (a counter over the model's own layers)

    size = tuple(example.shape[1:])
    cost = profile(model, size)
    check_batch_fits(cost.activation_bytes(), batch_size, device,
                     f"time {name or type(model).__name__}")  # before minutes of pricing
    per_layer = {c.name: c for c in cost.layers}
    top1, _, dense = _scores(model, select_batches, labels)
    equations = _equations(model, convs, layers, fit_batches)
    sites_of = root_sites(model, [s.name for s in layers])
    shapes = _input_shapes(model, convs, layers, example)
    dense_ms, conv_ms, others = _times(model, size, {s.name: (convs[s.name], shapes[s.name],
                                                              group_counts(s)) for s in layers},
                                       batch_size, device, repeats)
    result = Sensitivity(name or type(model).__name__, str(device), batch_size,
                         sum(len(b) for b in fit_batches), len(images), top1, cost.macs,
                         cost.params, dense_ms, others=others)
    for site in layers:
        conv = convs[site.name]
        eq = equations[site.name]
        times = conv_ms[site.name]
        price = LayerPrice(site.name, f"{site.resolution[0]}x{site.resolution[1]}",
                           "x".join(map(str, site.kernel)), site.in_channels,
                           site.out_channels, per_layer[site.name].macs,
                           per_layer[site.name].params, times[1])
        fixed = sites_of[site.name]
        starts = prefixed([model], site.name, select_batches) or select_batches
        intercept, norm = constant_home(model, conv, example)
        for g in group_counts(site):
            rows, cols, _ = assign_groups(eq.score(), g, fix_rows=fixed.consumer is None,
                                          fix_cols=fixed.producer is None)
            weight, const, unexplained = eq.refit(rows, cols, g, intercept)
            with _installed(conv, norm, weight, const if intercept else None):
                got, kl, _ = _scores(model, starts, labels, dense)
            price.options.append(Option(g, *_grouped_costs(per_layer[site.name], conv, g),
                                        times[g], unexplained, got, kl))
        result.layers.append(price)
        if progress is not None:
            progress(f"{site.name}: " + ", ".join(
                f"{o.groups} groups {100 * (top1 - o.top1):+.2f} (KL {o.kl:.3f})"
                for o in price.options))
    result.seconds = time.perf_counter() - started
    return result


def _grouped_costs(dense, conv: nn.Conv2d, g: int) -> Tuple[int, int]:
    """A conv's multiply-adds and parameters per image at ``g`` groups, from its dense
    costs (``dense``: its row of the model's profile); its bias is kept whole."""
    bias = dense.params - conv.weight.numel()
    return dense.macs // g, conv.weight.numel() // g + bias


def most_saved(model: nn.Module, example: torch.Tensor, *, ignore: Sequence[str] = (),
               stem: str = "input") -> Dict[str, Tuple[int, int]]:
    """The model's multiply-adds and parameters per image, and the most that grouping can
    save of each (every conv the rule could group at its largest count of
    :func:`group_counts`), counted with no image seen: a multiply-add or parameter budget
    checked before any layer is priced. ``{"macs": (total, saved), "params": (...)}``."""
    from ..inspection.costs import profile

    _, layers = groupable(model.eval(), example, ignore=ignore, stem=stem)
    cost = profile(model, tuple(example.shape[1:]))
    per_layer = {c.name: c for c in cost.layers}
    convs = conv_layers(model)
    saved = {"macs": 0, "params": 0}
    for site in layers:
        counts = group_counts(site)
        if counts:
            dense = per_layer[site.name]
            macs, params = _grouped_costs(dense, convs[site.name], max(counts))
            saved["macs"] += dense.macs - macs
            saved["params"] += dense.params - params
    return {"macs": (cost.macs, saved["macs"]), "params": (cost.params, saved["params"])}


def _equations(model, convs, layers, batches) -> Dict[str, _Equations]:
    """Every layer's normal equations from one dense pass over the calibration batches."""
    per_batch = max(1, FIT_ROWS // max(1, len(batches)))
    eqs = {s.name: _Equations(convs[s.name], per_batch, s.name) for s in layers}
    watched = {s.name: convs[s.name] for s in layers}
    with torch.no_grad():
        for x in batches:
            with capture(watched, "input") as xs, capture(watched) as ys:
                model(x)
            for name, eq in eqs.items():
                eq.add(xs[name], ys[name])
    return eqs


def _input_shapes(model, convs, layers, example) -> Dict[str, tuple]:
    with capture({s.name: convs[s.name] for s in layers}, "input") as xs, torch.no_grad():
        model(example)
    return {name: tuple(x.shape[1:]) for name, x in xs.items()}


def _scores(model: nn.Module, batches, labels: torch.Tensor,
            reference: Optional[torch.Tensor] = None
            ) -> Tuple[float, float, torch.Tensor]:
    """Top-1 of ``model`` over the selection batches (each possibly a :class:`Prefixed`),
    the mean KL divergence of its softmax from ``reference``'s (log-probabilities; 0.0
    without one), and its own log-probabilities."""
    hits, start, kl, outs = 0, 0, 0.0, []
    with torch.no_grad():
        for x in batches:
            out = forward(model, x)
            logits = (out[0] if isinstance(out, tuple) else out).float().cpu()
            n = len(x)
            hits += int((logits.argmax(1) == labels[start:start + n]).sum())
            logp = F.log_softmax(logits, 1)
            if reference is not None:
                ref = reference[start:start + n]
                kl += float((ref.exp() * (ref - logp)).sum())
            outs.append(logp)
            start += n
    return hits / max(start, 1), kl / max(start, 1), torch.cat(outs)


def selection_scores(model: nn.Module, select: Tuple[torch.Tensor, torch.Tensor],
                     reference: Optional[torch.Tensor] = None
                     ) -> Tuple[float, float, torch.Tensor]:
    """``model``'s (eval mode) top-1 on the labelled selection images ``(images, labels)``,
    the mean KL divergence of its softmax from ``reference``'s (0.0 without one), and its
    log-probabilities (a reference for another model)."""
    images, labels = select
    batches = [channels_last(b) for b in calibration_batches(images)]
    return _scores(model.eval(), batches, labels.cpu(), reference)


def select_top1(model: nn.Module, select: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """Top-1 of ``model`` (eval mode) on the labelled selection images ``(images, labels)``:
    what a search measures its candidates by, apart from the test split."""
    return selection_scores(model, select)[0]


class _installed:
    """Within: ``conv`` computes with ``weight``, and the constant ``const`` in its bias or
    (for a conv without one) taken off the running mean of the batch norm after it; all as
    it was on the way out."""

    def __init__(self, conv, norm, weight, const):
        self.conv, self.norm, self.weight, self.const = conv, norm, weight, const

    def __enter__(self):
        c = self.conv
        self.saved = (c.weight.detach().clone(), None if c.bias is None else
                      c.bias.detach().clone(), None if self.norm is None else
                      self.norm.running_mean.clone())
        with torch.no_grad():
            c.weight.copy_(self.weight)
            if self.const is not None:
                place_constant(c, self.norm, self.const)
        return self

    def __exit__(self, *exc):
        weight, bias, mean = self.saved
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if bias is not None:
                self.conv.bias.copy_(bias)
            if mean is not None:
                self.norm.running_mean.copy_(mean)


# ---------------------------------------------------------------------------------------------
# Time


def _times(model: nn.Module, size, layers: Dict[str, Tuple[nn.Conv2d, tuple, Sequence[int]]],
           batch_size: int, device: str, repeats: int
           ) -> Tuple[float, Dict[str, Dict[int, float]], Optional[float]]:
    """ms per batch of the whole ``model`` in the ``fold`` path, and of each of ``layers``
    (name: conv, its input's shape, its counts) dense (1) and at each count (channels-last,
    with a bias as after batch norm is folded), all timed side by side in one session: a
    schedule's predicted time is the model's less its layers' savings, and a change in the
    machine's speed between two sessions (5-10% on a shared CPU) would move that ratio. Last,
    the share of the CPUs other processes used meanwhile."""
    dev = torch.device(device)
    x = torch.randn(batch_size, *size, device=dev)
    folded = _folded(model, x)
    work = {"model": lambda: folded(x)}
    for name, (conv, shape, counts) in layers.items():
        xs = channels_last(torch.randn(batch_size, *shape, device=dev))
        for g in (1, *counts):
            layer = channels_last(nn.Conv2d(conv.in_channels, conv.out_channels,
                                            conv.kernel_size, conv.stride, conv.padding,
                                            conv.dilation, g, bias=True).to(dev).eval())
            work[f"{name}@{g}"] = (lambda layer=layer, xs=xs: _no_grad(layer, xs))
    timings = interleaved(work, batch_size, repeats=repeats, cuda=dev.type == "cuda",
                          device=dev)
    ms = {key: 1000 * t.median_s for key, t in timings.items()}
    return ms["model"], {name: {g: ms[f"{name}@{g}"] for g in (1, *counts)}
                         for name, (_, _, counts) in layers.items()}, timings["model"].others


def _no_grad(layer, x):
    with torch.inference_mode():
        layer(x)


def _folded(model: nn.Module, x: torch.Tensor):
    """A copy of ``model`` on ``x``'s device as the ``fold`` path runs it (batch norm folded,
    channels-last): what a converted model is timed as. A model torch.fx cannot trace (its
    Python looks at shapes: timm's ``Conv2dSame``) has no batch norm folded: it is timed in
    eval mode, channels-last, with its batch norms, the dense model and each converted one
    alike."""
    from ..capture import fx_graph
    from ..speed.deploy import build_path  # (the inference paths use this package's rule)

    copied = copy.deepcopy(model).to(x.device).eval()
    try:
        return build_path(copied, x, "fold")
    except DeeprootsError:
        try:  # traced again only where the fold failed: was it the trace?
            fx_graph(copied)
        except DeeprootsError:
            pass
        else:
            raise
    copied = channels_last(copied)

    def unfolded(inp):
        with torch.inference_mode():
            return copied(channels_last(inp))

    return unfolded


def model_ms(models: Dict[str, nn.Module], size, batch_size: int, device: str,
             repeats: int = 5) -> Tuple[Dict[str, float], Optional[float]]:
    """ms per batch of each model in the ``fold`` path (batch norm folded, channels-last:
    what a converted model runs as), at ``batch_size`` on ``device``, timed side by side;
    and the share of the CPUs other processes used meanwhile (:class:`OthersShare`)."""
    dev = torch.device(device)
    x = torch.randn(batch_size, *size, device=dev)
    built = {name: _folded(m, x) for name, m in models.items()}
    timings = interleaved({name: (lambda f=f: f(x)) for name, f in built.items()}, batch_size,
                          repeats=repeats, cuda=dev.type == "cuda", device=dev)
    return ({name: 1000 * t.median_s for name, t in timings.items()},
            next(iter(timings.values())).others)
