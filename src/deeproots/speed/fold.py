"""Batch norm folded into the convolutions before it: the first step of every inference path
and every export (:mod:`deeproots.speed.deploy`, :mod:`deeproots.speed.export`)."""
from __future__ import annotations

import copy
from typing import Dict

from torch import fx, nn

from ..capture import fx_graph
from ..errors import DeeprootsError

__all__ = ["fold_batchnorm", "check_module"]


def check_module(model, what: str) -> None:
    """A one-line error unless ``model`` is an ``nn.Module`` (``what`` names the caller)."""
    if not isinstance(model, nn.Module):
        hint = (f" (build it first: deeproots.create_model({model!r}))"
                if isinstance(model, str) else "")
        raise DeeprootsError(f"{what} takes an nn.Module; got {type(model).__name__} "
                             f"{model!r:.60}{hint}")


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, an ``fx.GraphModule``) with every conv -> batch-norm
    pair folded into the conv's weights and bias (torch's ``fuse_conv_bn_eval`` on each pair
    a torch.fx trace finds: a conv whose output only that batch norm reads, called once).
    Pre-activation BN, which comes before its conv, stays as it is."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    gm = fx_graph(model, "fold batch norm of")
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        conv = node.args[0] if norm is not None and node.args else None
        if not (isinstance(conv, fx.Node) and conv.op == "call_module"):
            continue
        wanted = next((c for n, c in _FOLDABLE.items() if isinstance(norm, n)), None)
        if wanted is None or not isinstance(modules[conv.target], wanted):
            continue
        if len(conv.users) != 1 or calls[conv.target] != 1 or not norm.track_running_stats:
            continue
        fused = fuse_conv_bn_eval(modules[conv.target], norm)
        parent, _, attr = conv.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        modules[conv.target] = fused
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded batch norms
    return gm


# which batch norm folds into which conv (a conv subclass, e.g. one that pads in its forward,
# counts as the conv it extends)
_FOLDABLE = {nn.BatchNorm1d: nn.Conv1d, nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm3d: nn.Conv3d}
