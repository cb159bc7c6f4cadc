"""Where a grouped conv's channel permutations can be folded: the conv that produces its input
channels and the per-channel layers between, the conv that reads its output and the layers
between, found in one torch.fx trace; and the folding itself, which leaves what the dense
model computes unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import fx, nn
from torch.nn import functional as F

from ...capture import fx_graph
from ...errors import DeeprootsError
from ...models.layers import conv_layers, layer_name
from .passes import frozen_batch_norm, is_batch_norm, norm_leaves

__all__ = ["RootSite", "root_sites", "fold_permutations"]

# modules that act on each channel alone: a permutation of the channels passes through them
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU,
                nn.Hardswish, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d,
                nn.Identity)
_PER_CHANNEL_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu,
                          F.max_pool2d, F.avg_pool2d, F.dropout, torch.flatten)
_STATELESS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.MaxPool2d,
              nn.AvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


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
        m = gm.get_submodule(node.target)
        return isinstance(m, _PER_CHANNEL) or frozen_batch_norm(m)
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
        gm = fx_graph(model, "fold channel permutations of", leaf=norm_leaves(model))
    except DeeprootsError as err:  # data-dependent Python: nothing to fold
        why = str(err)
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
    """Permute a conv's output (``dim="out"``) or input channels, or a batch norm's (a
    frozen one's too)."""
    with torch.no_grad():
        if is_batch_norm(module):
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
