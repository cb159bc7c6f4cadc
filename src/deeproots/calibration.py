"""Converting a *trained* CNN into a root network that keeps its accuracy, with no gradient
step: the grouped convs keep the weight that matters (channels assigned to groups, the
permutations folded into the neighbouring layers), and the 1x1 conv after each of them is
refit so that the root module computes what the dense layers computed, on a few thousand
calibration images.

    new, report = deeproots.rootify(trained, "root-8", calibration=images)  # model's inputs
    print(report.calibration_table())

The steps, each measured by the benchmark (``benchmarks/calibrated_rootify.py``):

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
3. **Batch norm re-estimated** on the calibration images.
4. **Reconstruction.** In the order the forward pass reaches them, each on the converted
   model before it (its batch norms re-estimated up to it): each grouped conv is refit
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
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from .errors import DeeprootsError, first_line
from .layers import block_diagonal_weight, conv_layers, layer_name, regroup
from .text import format_table

__all__ = ["assign_groups", "fold_permutations", "RootSite", "root_sites", "calibrate",
           "CalibrationReport", "LayerCalibration", "refit_pointwise", "refit_grouped",
           "reestimate_batchnorm",
           "calibration_batches", "STAGES"]

STAGES = ("block-diagonal", "+ permutation", "+ batch norm", "+ refit")
# modules that act on each channel alone: a permutation of the channels passes through them
_PER_CHANNEL = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU,
                nn.Hardswish, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d,
                nn.Identity)
_PER_CHANNEL_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu,
                          F.max_pool2d, F.avg_pool2d, F.dropout, torch.flatten)
_STATELESS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.MaxPool2d,
              nn.AvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


# ---------------------------------------------------------------------------------------------
# The assignment


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


def _order(labels: np.ndarray) -> torch.Tensor:
    """The permutation that puts group 0's members first, then group 1's, ... (stable)."""
    return torch.from_numpy(np.argsort(labels, kind="stable"))


# ---------------------------------------------------------------------------------------------
# Where permutations can be folded


@dataclass
class RootSite:
    """A conv to group and its neighbours in the traced model: the conv that produces its
    input channels and the per-channel layers between (``before``), and the per-channel
    layers after it and the conv that reads its output (``after``). ``producer``/``consumer``
    are None where the channel order is fixed, with the reason."""

    layer: str
    producer: Optional[str] = None
    before: List[str] = field(default_factory=list)
    consumer: Optional[str] = None
    after: List[str] = field(default_factory=list)
    fixed_in: str = ""
    fixed_out: str = ""


def _per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PER_CHANNEL)
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS and node.target is not torch.flatten
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _conv_node(gm, node) -> Optional[nn.Conv2d]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            return m
    return None


def _name(gm, node) -> str:
    """What a node is, for a reason: a module's class, a function's or method's name."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    return str(getattr(node.target, "__name__", node.target))


def _why(gm, node) -> str:
    if len(node.users) > 1:
        users = ", ".join(_name(gm, u) for u in node.users)
        return f"its channels also go to {users} (a residual add, a concatenation)"
    if node.op == "placeholder":
        return "it reads the model's input"
    return f"its channels come from {_name(gm, node)}, not a conv"


def root_sites(model: nn.Module, layers: Iterable[str]) -> Dict[str, RootSite]:
    """For each conv ``layers`` names (as :func:`deeproots.conv_layers` does), where its
    input and output permutations can be folded (:class:`RootSite`), from a torch.fx trace of
    ``model``; a model FX cannot trace keeps every order (the reason in each site)."""
    layers = list(layers)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001  (data-dependent Python: nothing to fold)
        why = f"torch.fx could not trace the model ({type(err).__name__}: {first_line(err)})"
        return {n: RootSite(n, fixed_in=why, fixed_out=why) for n in layers}
    uses: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1

    def unique(node) -> bool:  # a module with state, called once: safe to permute
        m = gm.get_submodule(node.target)
        return isinstance(m, _STATELESS) or uses.get(node.target, 0) == 1

    paths = {layer_name(n.target): n for n in gm.graph.nodes if _conv_node(gm, n) is not None}
    sites = {}
    for name in layers:
        node = paths.get(name)
        site = RootSite(name)
        sites[name] = site
        if node is None or uses.get(node.target, 0) != 1:
            site.fixed_in = site.fixed_out = "the conv is called more than once"
            continue
        # back: per-channel layers to the conv that produces the channels, used once each
        cur, chain = node.args[0], []
        while True:
            if not isinstance(cur, fx.Node) or len(cur.users) != 1:
                site.fixed_in = _why(gm, cur) if isinstance(cur, fx.Node) else "no producer"
                break
            conv = _conv_node(gm, cur)
            if conv is not None and conv.groups == 1 and unique(cur):
                site.producer, site.before = layer_name(cur.target), chain[::-1]
                break
            if _per_channel(gm, cur) and (cur.op != "call_module" or unique(cur)):
                if cur.op == "call_module":
                    chain.append(cur.target)
                cur = cur.args[0]
                continue
            site.fixed_in = _why(gm, cur)
            break
        # forward: per-channel layers to the conv that reads them
        cur, chain = node, []
        while True:
            if len(cur.users) != 1:
                site.fixed_out = _why(gm, cur)
                break
            nxt = next(iter(cur.users))
            conv = _conv_node(gm, nxt)
            if conv is not None and conv.groups == 1 and unique(nxt):
                site.consumer, site.after = layer_name(nxt.target), chain
                break
            if _per_channel(gm, nxt) and (nxt.op != "call_module" or unique(nxt)):
                if nxt.op == "call_module":
                    chain.append(nxt.target)
                cur = nxt
                continue
            site.fixed_out = f"its channels go to {_name(gm, nxt)}, not a conv"
            break
    return sites


def _modules(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules())


def _permute_channels(module: nn.Module, perm: torch.Tensor, dim: str) -> None:
    """Permute a conv's output (``dim="out"``) or input channels, or a batch norm's."""
    with torch.no_grad():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for t in (module.weight, module.bias, module.running_mean, module.running_var):
                if t is not None:
                    t.copy_(t[perm])
        elif isinstance(module, nn.Conv2d):
            if dim == "out":
                module.weight.copy_(module.weight[perm])
                if module.bias is not None:
                    module.bias.copy_(module.bias[perm])
            else:
                module.weight.copy_(module.weight[:, perm])


def fold_permutations(model: nn.Module, site: RootSite, perm_in: Optional[torch.Tensor],
                      perm_out: Optional[torch.Tensor]) -> None:
    """Apply a conv's input and output channel permutations, in place, folded into its
    neighbours (``site``): the producer's filters and the batch norms between, the conv's
    own weight on both sides, and the consumer's input channels. What the model computes is
    unchanged (to rounding)."""
    modules = _modules(model)
    conv = conv_layers(model)[site.layer]
    if perm_in is not None:
        if site.producer is None:
            raise DeeprootsError(f"{site.layer}: its input order is fixed ({site.fixed_in})")
        _permute_channels(conv_layers(model)[site.producer], perm_in, "out")
        for path in site.before:
            _permute_channels(modules[path], perm_in, "out")
        _permute_channels(conv, perm_in, "in")
    if perm_out is not None:
        if site.consumer is None:
            raise DeeprootsError(f"{site.layer}: its output order is fixed ({site.fixed_out})")
        _permute_channels(conv, perm_out, "out")
        for path in site.after:
            _permute_channels(modules[path], perm_out, "out")
        _permute_channels(conv_layers(model)[site.consumer], perm_out, "in")


# ---------------------------------------------------------------------------------------------
# Calibration data


def calibration_batches(data, batch_size: int = 256) -> List[torch.Tensor]:
    """Calibration images as a list of float batches: from a tensor of images (N, C, H, W)
    or from batches (a loader yielding images or (images, labels))."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise DeeprootsError(f"calibration images must be a batch (N, C, H, W); got shape "
                                 f"{tuple(data.shape)}")
        if not len(data):
            raise DeeprootsError("the calibration data is empty")
        if not torch.isfinite(data).all():
            raise DeeprootsError("the calibration images hold NaN or infinity")
        return [data[i:i + batch_size].float() for i in range(0, len(data), batch_size)]
    out = []
    for item in (data.batches() if hasattr(data, "batches") else data):
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise DeeprootsError("calibration data must yield image batches (N, C, H, W) or "
                                 "(images, labels)")
        out.append(x.float())
    if not out:
        raise DeeprootsError("the calibration data is empty")
    return out


def _inputs_of(model: nn.Module, paths: Sequence[str], batches) -> Dict[str, torch.Tensor]:
    """Each named conv's input on the calibration batches: per channel, the mean square
    (its activation energy)."""
    convs = conv_layers(model)
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name):
        def record(mod, args, out):
            x = args[0].detach()
            sums[name] = sums.get(name, 0) + x.pow(2).sum((0, 2, 3)).double()
            counts[name] = counts.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]
        return record

    hooks = [convs[p].register_forward_hook(hook(p)) for p in paths]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {p: (sums[p] / counts[p]).float() for p in paths if p in sums}


class _Reached(Exception):
    """Raised by a hook to stop a forward pass at the layer it was wanted for."""


class _Prefixed:
    """A calibration batch whose forward passes start at the first conv being grouped: the
    layers before it are the trained ones, unchanged by the conversion (their batch norms
    are not re-estimated), so the values the rest of the network reads from them are
    computed once per model (a torch.fx trace; every other earlier value given as None)
    and each later pass runs only the rest."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.envs: Dict[int, Tuple[fx.GraphModule, dict]] = {}

    def __len__(self) -> int:
        return len(self.x)

    def run(self, model: nn.Module):
        gm, env = self.envs[id(model)]
        return fx.Interpreter(gm).run(self.x, initial_env=dict(env))


class _StopAt(fx.Interpreter):
    def __init__(self, gm, stop):
        super().__init__(gm)
        self.stop = stop

    def run_node(self, node):
        if node is self.stop:
            raise _Reached
        return super().run_node(node)


def _prefixed(models: Sequence[nn.Module], first: str, batches) -> Optional[list]:
    """The batches as :class:`_Prefixed` ones for ``models`` (traced alike), the prefix
    being every node before conv ``first``; None when a model cannot be traced."""
    out = [_Prefixed(x) for x in batches]
    for model in models:
        try:
            gm = fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001  (data-dependent Python: full passes instead)
            return None
        nodes = list(gm.graph.nodes)
        stop = next((n for n in nodes if n.op == "call_module"
                     and layer_name(n.target) == first), None)
        if stop is None:
            return None
        prefix = nodes[:nodes.index(stop)]
        inside = set(prefix)
        live = [n for n in prefix if any(u not in inside for u in n.users)]
        with torch.no_grad():
            for item in out:
                runner = _StopAt(gm, stop)
                try:
                    runner.run(item.x)
                except _Reached:
                    pass
                env = {n: None for n in prefix}
                env.update({n: runner.env[n] for n in live})
                item.envs[id(model)] = (gm, env)
    return out


def _forward(model: nn.Module, x):
    return x.run(model) if isinstance(x, _Prefixed) else model(x)


def _run_until(model: nn.Module, x: torch.Tensor, layer: nn.Module, output: bool
               ) -> torch.Tensor:
    """``layer``'s input (or output) when ``model`` runs ``x``, the rest of the forward pass
    not run: a calibration pass costs only the layers up to the one it fits."""
    got = []

    def hook(mod, args, out):
        got.append(out if output else args[0])
        raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        _forward(model, x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not got:
        raise DeeprootsError("the calibration pass never reached the layer to refit")
    return got[0]


def _feeds_batchnorm(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the output of ``layer`` goes straight into a batch norm when ``model`` runs
    ``x`` (the pass stops at that batch norm): a constant the layer adds is then one that
    re-estimating the batch norm's mean removes."""
    out, fed = [], []

    def keep(mod, args, result):
        out.append(result)

    def norm(mod, args):
        fed.append(bool(out) and args[0] is out[-1])
        raise _Reached

    handles = [layer.register_forward_hook(keep)] + [
        m.register_forward_pre_hook(norm) for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was = model.training
    model.eval()  # no running statistics change
    try:
        with torch.no_grad():
            _forward(model, x)
    except _Reached:
        pass
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return bool(out) and bool(fed) and fed[-1]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches, until: Optional[nn.Module] = None,
                         keep=()) -> int:
    """Every batch norm's running mean and variance recomputed on the calibration batches
    (a cumulative average, in train mode, nothing else changed); with ``until``, only those
    the forward pass reaches before that layer (the pass stops there; the others keep their
    statistics); those in ``keep`` keep theirs. Returns how many were re-estimated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not any(m is k for k in keep)]
    saved = [(m.momentum, m.training, {k: v.clone() for k, v in m.state_dict().items()})
             for m in norms]
    was = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x in batches:
            if until is None:
                _forward(model, x)
            else:
                _run_until(model, x, until, output=False)
    finally:
        model.train(was)
        for m, (momentum, training, stats) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
            if int(m.num_batches_tracked) == 0:  # not reached: its statistics as they were
                m.load_state_dict(stats)
    return sum(int(m.num_batches_tracked) > 0 for m in norms)


def _pairs(dense: nn.Module, new: nn.Module, layer: str, batches,
           target_order: Optional[torch.Tensor]):
    """For each calibration batch: the input of conv ``layer`` in ``new`` and the output of
    the conv of the same name in ``dense`` (its channels in ``target_order`` where ``new``'s
    are permuted), both models in eval mode (their modes restored after)."""
    target_conv, conv = conv_layers(dense)[layer], conv_layers(new)[layer]
    was = new.training, dense.training
    new.eval(), dense.eval()
    try:
        for x in batches:
            got = _run_until(new, x, conv, output=False)
            y = _run_until(dense, x, target_conv, output=True)
            yield got, (y if target_order is None else y[:, target_order])
    finally:
        new.train(was[0]), dense.train(was[1])


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    """The rows of ``a`` with a last column of ones: the fit's constant term."""
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)


def _ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float, intercept: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares from normal equations whose last row and column are the constant
    term's (``ridge`` times the mean of the inputs' second moments on the diagonal; the
    constant not shrunk, or left out without ``intercept``). Returns the solution and the
    target energy it explains."""
    d = xtx.shape[0] - 1
    reg = ridge * float(xtx.diagonal()[:d].mean()) * torch.eye(d + 1, dtype=torch.float64)
    reg[d, d] = 0.0  # the constant is not shrunk
    if not intercept:  # no constant term: the ones column left out
        xtx, xty, reg = xtx[:d, :d], xty[:d], reg[:d, :d]
    solution = torch.linalg.solve(xtx + reg, xty)  # (d [+ 1], out)
    return solution, 2 * (solution * xty).sum() - (solution * (xtx @ solution)).sum()


@torch.no_grad()
def refit_pointwise(dense: nn.Module, new: nn.Module, layer: str, batches,
                    ridge: float = 1e-4, target_order: Optional[torch.Tensor] = None) -> float:
    """The conv ``layer`` of ``new`` (a 1x1 conv, as after a root module's grouped conv)
    refit in closed form so that, on the calibration batches, its output matches what the
    same layer of ``dense`` gives (its output channels taken in ``target_order`` where
    ``new``'s are permuted): ridge least squares over every pixel (``ridge`` times the mean of
    the inputs' second moments on the diagonal). Returns the fraction of the target's energy
    the fit leaves unexplained.

    A conv with a bias gets the fit's constant term in it. A conv without one keeps none
    (the model must still load into its own class): when its output goes straight into a
    batch norm, the constant is fit and dropped, as the batch norm re-estimated after the
    fit removes it exactly; otherwise the fit has no constant term."""
    conv = conv_layers(new)[layer]
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
        raise DeeprootsError(f"{layer}: only an ungrouped 1x1 conv of stride 1 is refit")
    batches = list(batches)
    intercept = conv.bias is not None or _feeds_batchnorm(new, conv, batches[0])
    d = conv.in_channels
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(d + 1, conv.out_channels, dtype=torch.float64)
    yty = torch.zeros((), dtype=torch.float64)
    for x, y in _pairs(dense, new, layer, batches, target_order):
        # a batch's products in float32 (a GEMM), summed over the batches in float64
        xs = _with_ones(x.permute(0, 2, 3, 1).reshape(-1, d).float())
        ys = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).float()
        xtx += (xs.T @ xs).double()
        xty += (xs.T @ ys).double()
        yty += ys.double().pow(2).sum()
    solution, explained = _ridge_solve(xtx, xty, ridge, intercept)
    conv.weight.copy_(solution[:d].T.reshape_as(conv.weight).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_(solution[d].to(conv.bias.dtype))
    # what the fit leaves unexplained; a constant dropped before a batch norm counts as
    # explained, as the batch norm removes it
    return float((yty - explained) / max(float(yty), 1e-30))


@torch.no_grad()
def refit_grouped(dense: nn.Module, new: nn.Module, layer: str, batches,
                  ridge: float = 1e-4, target_order: Optional[torch.Tensor] = None
                  ) -> Optional[float]:
    """The grouped conv ``layer`` of ``new`` refit in closed form, group by group, so that on
    the calibration batches its output matches what the dense conv of the same name in
    ``dense`` gives (output channels in ``target_order`` where ``new``'s are permuted): each
    group's filters are the ridge least-squares fit of the dense filters' outputs from the
    group's own input channels, which takes over as much as those channels can of what the
    off-diagonal blocks contributed. A constant term as :func:`refit_pointwise` has it.
    Returns the energy the fit leaves unexplained as a fraction of the dense filters' output
    energy without their bias (the measure of the cut's ``output_kept``), or None for a conv
    it does not refit (one that pads other than with zeros in its own forward)."""
    target_conv, conv = conv_layers(dense)[layer], conv_layers(new)[layer]
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(
            conv.padding, str):
        return None
    batches = list(batches)
    intercept = conv.bias is not None or _feeds_batchnorm(new, conv, batches[0])
    g = conv.groups
    cin, cout = conv.in_channels // g, conv.out_channels // g
    d = cin * conv.kernel_size[0] * conv.kernel_size[1]
    xtx = torch.zeros(g, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(g, d + 1, cout, dtype=torch.float64)
    yty = torch.zeros((), dtype=torch.float64)
    yty_c = torch.zeros((), dtype=torch.float64)
    for xs, y in _pairs(dense, new, layer, batches, target_order):
        xs, y = xs.float(), y.float()
        if target_conv.bias is not None:  # the energy the cut's "output kept" counts
            b = target_conv.bias.detach().view(1, -1, 1, 1)
            centred = y - (b if target_order is None else b[:, target_order])
        else:
            centred = y
        yty_c += centred.double().pow(2).sum()
        for k in range(g):
            cols = F.unfold(xs[:, k * cin:(k + 1) * cin].contiguous(), conv.kernel_size,
                            conv.dilation, conv.padding, conv.stride)  # (N, d, L)
            a = _with_ones(cols.transpose(1, 2).reshape(-1, d))
            b = y[:, k * cout:(k + 1) * cout].permute(0, 2, 3, 1).reshape(-1, cout)
            xtx[k] += (a.T @ a).double()
            xty[k] += (a.T @ b).double()
        yty += y.double().pow(2).sum()
    explained = torch.zeros((), dtype=torch.float64)
    weight = conv.weight.detach().clone()
    bias = torch.zeros(conv.out_channels, dtype=torch.float64)
    for k in range(g):
        solution, part = _ridge_solve(xtx[k], xty[k], ridge, intercept)
        explained += part
        weight[k * cout:(k + 1) * cout] = solution[:d].T.reshape(cout, cin, *conv.kernel_size)
        if intercept:
            bias[k * cout:(k + 1) * cout] = solution[d]
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_(bias.to(conv.bias.dtype))
    return float((yty - explained) / max(float(yty_c), 1e-30))


# ---------------------------------------------------------------------------------------------
# The conversion


@dataclass
class LayerCalibration:
    """One grouped conv of a calibrated conversion: groups; the fraction of its weight
    energy kept on the diagonal blocks without and with the assignment, weighted by the
    input channels' activation energy; the fraction of its output energy the cut keeps on
    the calibration images; which sides were permuted (or why not); the 1x1 conv refit after
    it and the energy the fit left unexplained."""

    layer: str
    groups: int
    weight_kept_plain: float
    weight_kept: float
    output_kept: Optional[float] = None
    permuted_in: bool = False
    permuted_out: bool = False
    fixed: str = ""
    refit: str = ""
    refit_unexplained: Optional[float] = None
    grouped_unexplained: Optional[float] = None  # the grouped conv's own refit


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did, per grouped conv, and (when the caller measured them) the
    test top-1 of each stage (:data:`STAGES`)."""

    images: int
    layers: List[LayerCalibration] = field(default_factory=list)
    batchnorms: int = 0
    refits: Dict[str, float] = field(default_factory=dict)  # 1x1 conv -> unexplained energy
    stages: Dict[str, Optional[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        head = ("layer", "groups", "weight kept", "assigned", "output kept", "refit kept",
                "permuted", "1x1 refit", "unexplained")
        rows = [(c.layer, str(c.groups), f"{100 * c.weight_kept_plain:.1f}%",
                 f"{100 * c.weight_kept:.1f}%",
                 f"{100 * c.output_kept:.1f}%" if c.output_kept is not None else "",
                 f"{100 * (1 - c.grouped_unexplained):.1f}%"
                 if c.grouped_unexplained is not None else "",
                 "/".join(s for s, ok in (("in", c.permuted_in), ("out", c.permuted_out)) if ok)
                 or "-", c.refit or "-",
                 f"{100 * c.refit_unexplained:.2f}%" if c.refit_unexplained is not None else "")
                for c in self.layers]
        lines = [f"calibrated on {self.images} images; {self.batchnorms} batch norms "
                 f"re-estimated; {self.seconds:.1f} s",
                 format_table(head, rows, align="lrrrrrlll")]
        fixed = [f"{c.layer}: {c.fixed}" for c in self.layers if c.fixed]
        if fixed:
            lines += ["channel orders kept:"] + [f"  {f}" for f in fixed]
        if self.stages:
            lines.append(format_table(("stage", "test top-1"), [
                (k, f"{v:.4f}" if v is not None else "") for k, v in self.stages.items()],
                align="lr"))
        return "\n".join(lines)


def _output_kept(dense_conv: nn.Conv2d, cut: nn.Conv2d, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = dense_conv(x)
        got = cut(x)
        bias = dense_conv.bias.view(1, -1, 1, 1) if dense_conv.bias is not None else 0
        energy = float((want - bias).pow(2).sum())
        return 1.0 - float((got - want).pow(2).sum()) / max(energy, 1e-30)


REFITS = ("root", "all")


def _forward_order(model, x) -> List[nn.Module]:
    """The convs and batch norms a forward pass of ``x`` reaches, in order (once each)."""
    seen: List[nn.Module] = []
    watched = [m for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))]

    def hook(mod, args, out):  # returns None: the output is kept
        if not any(mod is s for s in seen):
            seen.append(mod)

    hooks = [m.register_forward_hook(hook) for m in watched]
    try:
        with torch.no_grad():
            _forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _reached_convs(model, x) -> List[str]:
    names = {id(c): n for n, c in conv_layers(model).items()}
    return [names[id(m)] for m in _forward_order(model, x) if id(m) in names]


def _first_reached(model, order, x) -> str:
    convs = _reached_convs(model, x)
    return min((n for n in order if n in convs), key=convs.index)


def _norms_before(model, first: str, x) -> List[nn.Module]:
    """The batch norms a forward pass reaches before conv ``first``: trained, kept."""
    target = conv_layers(model)[first]
    out = []
    for m in _forward_order(model, x):
        if m is target:
            break
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(m)
    return out


def _refit_targets(model, order, sites, refit, x) -> List[str]:
    """The 1x1 convs to refit, in the order a forward pass of ``x`` reaches them."""
    reached = _reached_convs(model, x)
    convs = conv_layers(model)
    first = min((reached.index(n) for n in order if n in reached), default=len(reached))

    def pointwise(n):
        c = convs[n]
        return c.kernel_size == (1, 1) and c.groups == 1 and c.stride == (1, 1)

    if refit == "all":
        return [n for n in reached[first + 1:] if pointwise(n) and n not in order]
    roots = {sites[n].consumer for n in order}
    return [n for n in reached if n in roots and pointwise(n)]


def calibrate(model: nn.Module, changes: Dict[str, int], batches, *, stages=None,
              ridge: float = 1e-4, refit: str = "all", grouped: bool = True
              ) -> Tuple[nn.Module, CalibrationReport]:
    """``model`` (trained, dense in the layers ``changes`` names) converted to those groups
    with the steps of this module, on the calibration ``batches``; ``model`` itself is not
    changed. ``stages``, if given, is called with each stage's name and model (a copy of the
    conversion so far, to evaluate). ``refit``: ``"all"`` (every ungrouped 1x1 conv from the
    first grouped conv on) or ``"root"`` (the one right after each grouped conv);
    ``grouped``: refit the grouped convs too. Returns the converted model and its report."""
    check_trained(model)
    started = time.perf_counter()
    if stages is not None:  # the caller's evaluations are not the conversion's time
        measure, evaluating = stages, [0.0]

        def stages(name, model):
            t0 = time.perf_counter()
            measure(name, model)
            evaluating[0] += time.perf_counter() - t0
    # channels-last: the calibration passes run twice as fast on a CPU (oneDNN)
    dense = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    new = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    report = CalibrationReport(images=sum(len(b) for b in batches))
    order = [n for n in conv_layers(new) if n in changes]
    for name in order:
        if conv_layers(new)[name].groups != 1:
            raise DeeprootsError(f"{name} is already in {conv_layers(new)[name].groups} groups: "
                                 f"calibrated conversion groups dense convs (regroup=False)")
    energy = _inputs_of(dense, order, batches)
    sites = root_sites(new, order)
    if stages is not None:  # the diagonal blocks alone, in the trained order
        plain = copy.deepcopy(dense)
        for name in order:
            conv = conv_layers(plain)[name]
            kept = _block_diagonal(conv.weight, changes[name])
            regroup(conv, changes[name], reinit=False)
            with torch.no_grad():
                conv.weight.copy_(kept)
        stages(STAGES[0], plain)
    inputs = _sampled_inputs(dense, order, batches[0])
    out_orders: Dict[str, torch.Tensor] = {}  # each conv's output order, where permuted
    in_orders: Dict[str, torch.Tensor] = {}  # each grouped conv's input order, likewise
    for name in order:
        g, site = changes[name], sites[name]
        if site.producer in changes:  # another conv being grouped makes these channels
            site.producer, site.fixed_in = None, f"they come from {site.producer}, grouped too"
        if site.consumer in changes:
            site.consumer, site.fixed_out = None, f"they go to {site.consumer}, grouped too"
        conv = conv_layers(new)[name]
        w = conv.weight.detach().double()
        score = (w.pow(2).sum((2, 3)) * energy[name].double()[None, :]).numpy()
        plain_rows = np.arange(conv.out_channels) // (conv.out_channels // g)
        plain_cols = np.arange(conv.in_channels) // (conv.in_channels // g)
        row_g, col_g, kept = assign_groups(score, g, fix_rows=site.consumer is None,
                                           fix_cols=site.producer is None)
        perm_out = _order(row_g) if site.consumer is not None else None
        perm_in = _order(col_g) if site.producer is not None else None
        fold_permutations(new, site, perm_in, perm_out)
        for conv_name, perm in ((site.producer, perm_in), (name, perm_out)):
            if perm is not None:
                before = out_orders.get(conv_name)
                out_orders[conv_name] = perm if before is None else before[perm]
        if perm_in is not None:
            in_orders[name] = perm_in
        fixed = "; ".join(f"{side} order kept: {why}" for side, why in (
            ("input", site.fixed_in), ("output", site.fixed_out)) if why)
        report.layers.append(LayerCalibration(
            name, g, _kept(score, plain_rows, plain_cols) / max(float(score.sum()), 1e-30),
            float(kept),
            permuted_in=perm_in is not None, permuted_out=perm_out is not None, fixed=fixed))
    # from here on the passes start at the first conv being grouped (the layers before it
    # are the trained ones, kept as they are)
    first = _first_reached(new, order, batches[0])
    fast = _prefixed([dense, new], first, batches)
    keep = _norms_before(new, first, batches[0])
    if fast is not None:
        batches = fast
    for name, row in zip(order, report.layers):  # the cut: the diagonal blocks of each
        conv = conv_layers(new)[name]
        dense_permuted = copy.deepcopy(conv)
        kept = _block_diagonal(conv.weight, changes[name])
        regroup(conv, changes[name], reinit=False)
        with torch.no_grad():
            conv.weight.copy_(kept)
        x = inputs[name] if name not in in_orders else inputs[name][:, in_orders[name]]
        row.output_kept = _output_kept(dense_permuted, conv, x)
    if stages is not None:
        stages(STAGES[1], copy.deepcopy(new))
    report.batchnorms = reestimate_batchnorm(new, batches, keep=keep)
    if stages is not None:
        stages(STAGES[2], copy.deepcopy(new))
    # the 1x1 convs refit, in the order the forward pass reaches them: each root module's
    # (refit="root"), or every ungrouped 1x1 conv from the first grouped conv on
    # (refit="all"); before each, the batch norms up to it re-estimated on the model as it
    # is then, so that every fit sees the statistics it will run with
    targets = _refit_targets(new, order, sites, refit, batches[0])
    for row in report.layers:
        consumer = sites[row.layer].consumer
        if consumer not in targets:
            row.refit = "no 1x1 conv reads it: not refit"
    if grouped:  # the grouped convs refit too, each where the forward pass reaches it
        reached = _reached_convs(new, batches[0])
        targets = sorted(set(targets) | {n for n in order if n in reached}, key=reached.index)
    rows = {row.layer: row for row in report.layers}
    for name in targets:
        layer = conv_layers(new)[name]
        reestimate_batchnorm(new, batches, until=layer, keep=keep)
        if name in rows:  # a grouped conv, refit within its groups
            rows[name].grouped_unexplained = refit_grouped(dense, new, name, batches, ridge,
                                                           out_orders.get(name))
            continue
        unexplained = refit_pointwise(dense, new, name, batches, ridge, out_orders.get(name))
        report.refits[name] = unexplained
        for row in report.layers:
            if sites[row.layer].consumer == name:
                row.refit, row.refit_unexplained = name, unexplained
    if targets:
        reestimate_batchnorm(new, batches, keep=keep)  # those after the last refit
    if stages is not None:
        stages(STAGES[3], copy.deepcopy(new))
    report.seconds = time.perf_counter() - started - (evaluating[0] if stages else 0.0)
    return new, report


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


def _block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    return block_diagonal_weight(weight.detach(), groups)


def _sampled_inputs(model, paths, x) -> Dict[str, torch.Tensor]:
    """Each named conv's input on one calibration batch (for the output energy kept)."""
    convs = conv_layers(model)
    got = {}

    def keep(path):
        def hook(mod, args, out):  # returns None: the output is kept
            got.setdefault(path, args[0].detach())
        return hook

    hooks = [convs[p].register_forward_hook(keep(p)) for p in paths]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got
