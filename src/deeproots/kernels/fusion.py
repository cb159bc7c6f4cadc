"""Fusing root modules: in a traced (torch.fx) model, each grouped conv -> ReLU -> 1x1 conv
chain (and the residual add and ReLU after it, as in a ResNet bottleneck) becomes one
:class:`FusedRootConv`, run by the fused Triton kernel (:mod:`.fused_root`). An ungrouped
conv -> ReLU -> 1x1 conv chain fuses the same way (groups = 1), so that an orig network
and its root variant, timed in the same path, get the same treatment.

    gm = deeproots.fold_batchnorm(model)          # a GraphModule, batch norm folded
    fused, kept = fuse_root_blocks(gm)            # in place; names of the fused blocks

NiN's blocks (conv1a -> conv1b, conv2a -> conv2b, conv3a -> conv3b) and every bottleneck
of a ResNet (conv2 -> conv3 -> + identity -> ReLU; an ungrouped conv2 of more than 256
channels excepted) fuse; GoogLeNet's grouped convs feed a concatenation, not a 1x1 conv,
and stay as they are.
"""
from __future__ import annotations

import operator
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import DeeprootsError, first_line
from ..numerics import disagreement
from .modules import _autocast, _time_ms, padding_unsupported

__all__ = ["FusedRootConv", "fuse_root_blocks", "fusable"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _plain_1x1(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and \
        conv.padding in ((0, 0), "valid")


def fusable(conv: nn.Conv2d, pointwise: nn.Conv2d) -> Optional[str]:
    """Why ``conv`` -> ReLU -> ``pointwise`` cannot run as one fused kernel, or None."""
    from .fused_root import check_root  # Triton: only when fusing

    reason = padding_unsupported(conv)
    if reason:
        return reason
    if not _plain_1x1(pointwise):
        return "the conv after it is not a plain 1x1 conv"
    return check_root(conv.weight, pointwise.weight, conv.groups)


class FusedRootConv(nn.Module):
    """``conv`` -> ReLU -> ``pointwise`` [-> + residual] [-> ReLU] as one Triton kernel, the
    grouped conv's output never written to memory.

    With ``choose`` (the default) the block verifies, on the first batch of each shape,
    dtype and device, that the fused kernel runs and agrees with its layers run one after
    another (else they run apart, ``rejected`` says why), then times the two and keeps the
    faster (``chosen``, ``timings`` in ms): where the 1x1 conv is much wider than a tile,
    the kernel recomputes the grouped conv per tile and fusing can lose. Inference: when a
    gradient is wanted the block runs its layers one after another (correct, not fused)."""

    timer = staticmethod(_time_ms)  # replaceable, e.g. by a fake clock in tests

    def __init__(self, conv: nn.Conv2d, pointwise: nn.Conv2d, residual: bool = False,
                 relu_out: bool = False, choose: bool = True):
        super().__init__()
        reason = fusable(conv, pointwise)
        if reason:
            raise DeeprootsError(f"cannot fuse this root block: {reason}")
        self.conv, self.pointwise = conv, pointwise
        self.residual, self.relu_out, self.choose = residual, relu_out, choose
        self.chosen: Dict[tuple, str] = {}  # "fused" or "unfused", per input key
        self.timings: Dict[tuple, Dict[str, float]] = {}
        self.rejected: Optional[str] = None  # why the fused kernel was dropped, if it was
        self.layer = ""

    def extra_repr(self) -> str:
        return f"residual={self.residual}, relu_out={self.relu_out}, choose={self.choose}"

    def _out_shape(self, x: torch.Tensor) -> Tuple[int, int, int, int]:
        from .grouped_conv import output_size  # Triton: only when run

        c = self.conv
        size = output_size(x.shape[2], x.shape[3], *c.kernel_size, c.stride, c.padding,
                           c.dilation)
        return (x.shape[0], self.pointwise.out_channels, *size)

    def unfused(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """The block's layers one after another."""
        y = self.pointwise(F.relu(self.conv(x)))
        y = y + residual if residual is not None else y
        return F.relu(y) if self.relu_out else y

    def native(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """The block's layers one after another in PyTorch's own convolutions (cuDNN),
        whatever module runs the conv in this path: the reference the fused kernel is
        verified against, never another Triton kernel (which shares its tile helpers)."""
        c, p = self.conv, self.pointwise
        h = F.relu(nn.Conv2d._conv_forward(c, x, c.weight, c.bias))
        y = nn.Conv2d._conv_forward(p, h, p.weight, p.bias)
        y = y + residual if residual is not None else y
        return F.relu(y) if self.relu_out else y

    def fused(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block in the fused kernel (forward only)."""
        from .fused_root import fused_root_conv  # Triton: only when run

        c, p = self.conv, self.pointwise
        x, residual, *params = _autocast(x, residual, c.weight, c.bias, p.weight, p.bias)
        if residual is not None and residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        return fused_root_conv(x, *params, c.stride, c.padding, c.dilation, c.groups,
                               residual, self.relu_out)

    @torch.compiler.disable
    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (residual is not None) != self.residual:
            raise DeeprootsError(f"this fused block {'takes' if self.residual else 'takes no'} "
                                 f"residual input; got {'one' if residual is not None else 'none'}")
        params = (self.conv.weight, self.conv.bias, self.pointwise.weight,
                  self.pointwise.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, residual, *params)):
            return self.unfused(x, residual)
        if residual is not None and tuple(residual.shape) != self._out_shape(x):
            return self.unfused(x, residual)  # a broadcast add: the kernel adds whole maps
        if not self.choose:
            return self.fused(x, residual)
        kind = x.device.type
        key = (str(x.device), str(x.dtype), tuple(x.shape), x.stride(),
               str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else "")
        if key not in self.chosen:
            self.chosen[key], self.timings[key] = self._choose(x, residual)
        return (self.fused if self.chosen[key] == "fused" else self.unfused)(x, residual)

    def _choose(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        """The fused kernel, verified on this input against the layers in PyTorch's own
        convolutions (:meth:`native`: it must run and agree within the tolerance of the
        output's dtype), then timed against the layers apart as this path runs them; the
        layers apart when it fails either way (``rejected`` says why, in one warning
        line)."""
        want = self.native(x, residual)
        try:
            reason = disagreement(self.fused(x, residual), want, want.dtype)
        except Exception as err:  # noqa: BLE001  (a compile, ptxas or resource error)
            reason = f"{type(err).__name__}: {first_line(err, 200)}"
        if reason is not None:
            if self.rejected is None:
                self.rejected = reason
                warnings.warn(f"deeproots fused block {self.layer or ''}: the fused kernel "
                              f"dropped ({reason}); its layers run apart",
                              RuntimeWarning, stacklevel=3)
            return "unfused", {}
        ms = {name: self.timer(lambda fn=fn: fn(x, residual), x.is_cuda, name=name,
                               device=x.device)
              for name, fn in (("fused", self.fused), ("unfused", self.unfused))}
        return min(ms, key=ms.get), ms


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _conv(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Conv2d]:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv2d):
            return mod
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _residual_of(add: fx.Node, out: fx.Node) -> Optional[fx.Node]:
    """The other tensor of ``add`` = out + other (or other + out), or None."""
    if add.op != "call_function" or add.target not in _ADD_FUNCTIONS or add.kwargs \
            or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is out else add.args[0]
    return other if isinstance(other, fx.Node) and other is not out else None


def fuse_root_blocks(gm: fx.GraphModule, choose: bool = True) -> Tuple[List[str], List[str]]:
    """Replace, in place, every conv -> ReLU -> 1x1 conv chain of ``gm`` (each
    intermediate used once), with the residual add and the ReLU that follow where present,
    by a :class:`FusedRootConv` (``choose``: each block keeps the fused kernel only where
    it measures faster). Returns the first convs of the blocks fused, and one line per
    conv followed by ReLU and a 1x1 conv that could not be (and why)."""
    fused, kept = [], []
    for node in list(gm.graph.nodes):
        conv = _conv(gm, node)
        if conv is None:
            continue
        relu = _only_user(node)
        if relu is None or not _is_relu(gm, relu):
            continue
        nxt = _only_user(relu)
        pointwise = _conv(gm, nxt) if nxt is not None else None
        if pointwise is None or not _plain_1x1(pointwise):  # not a root block
            continue
        reason = fusable(conv, pointwise)
        if reason:
            kept.append(f"{node.target}: {reason}")
            continue
        chain, residual, relu_out = [node, relu, nxt], None, False
        after = _only_user(nxt)
        if after is not None and _residual_of(after, nxt) is not None:
            residual = _residual_of(after, nxt)
            chain.append(after)
            after = _only_user(after)
        if after is not None and _is_relu(gm, after):
            relu_out = True
            chain.append(after)
        target = f"{node.target}_fused"
        block = FusedRootConv(conv, pointwise, residual is not None, relu_out, choose)
        block.layer = str(node.target)
        gm.add_submodule(target, block)
        with gm.graph.inserting_before(chain[-1]):
            new = gm.graph.call_module(target, (node.args[0],) + (
                (residual,) if residual is not None else ()))
        chain[-1].replace_all_uses_with(new)
        for old in reversed(chain):
            gm.graph.erase_node(old)
        fused.append(str(node.target))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return fused, kept
