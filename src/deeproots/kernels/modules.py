"""Putting the kernels into models: a conv module that runs the Triton kernel, and a conv
module that picks, per shape, dtype and device, the fastest of several lowerings of a
grouped convolution, measured once and remembered.

The lowerings of a grouped conv:

* ``native``: ``F.conv2d(..., groups=g)`` (cuDNN on a GPU, oneDNN on a CPU);
* ``triton``: deeproots' Triton kernel (:mod:`.grouped_conv`; CUDA only);
* ``dense``: one ungrouped conv whose weight is block-diagonal (zeros off the groups):
  g times the multiply-adds, but a GEMM the library runs fast;
* ``split``: one conv per group, concatenated.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import layer_name
from ..timing import interleaved

__all__ = ["TritonConv2d", "DispatchConv2d", "LOWERINGS", "lowerings", "unsupported",
           "replace_convs", "dispatch_cache"]

LOWERINGS = ("native", "triton", "dense", "split")


def unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why the Triton kernel cannot run ``conv``, or None."""
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (the kernel pads with zeros)"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r} (the kernel takes explicit padding)"
    if conv.groups == 1:
        return "ungrouped (left to cuDNN's dense kernels)"
    return None


def _dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The block-diagonal [out, in, k, k] weight equal to ``conv``'s grouped one."""
    g, w = conv.groups, conv.weight
    out, per = w.shape[0], w.shape[1]
    dense = w.new_zeros(out, per * g, *w.shape[2:])
    step = out // g
    for i in range(g):
        dense[i * step:(i + 1) * step, i * per:(i + 1) * per] = w[i * step:(i + 1) * step]
    return dense


def lowerings(conv: nn.Conv2d, device: torch.device) -> Dict[str, Callable]:
    """The lowerings of ``conv`` that can run on ``device``, each ``fn(x) -> y``."""
    args = (conv.stride, conv.padding, conv.dilation)
    out: Dict[str, Callable] = {
        "native": lambda x: F.conv2d(x, conv.weight, conv.bias, *args, conv.groups)}
    if conv.groups > 1:
        dense = _dense_weight(conv).detach()
        out["dense"] = lambda x: F.conv2d(x, dense, conv.bias, *args, 1)
        g, per = conv.groups, conv.in_channels // conv.groups
        weights = conv.weight.chunk(g)
        biases = conv.bias.chunk(g) if conv.bias is not None else [None] * g
        out["split"] = lambda x: torch.cat(
            [F.conv2d(x[:, i * per:(i + 1) * per], weights[i], biases[i], *args)
             for i in range(g)], 1)
        if device.type == "cuda" and unsupported(conv) is None:
            from .grouped_conv import grouped_conv2d  # Triton: only on a GPU

            out["triton"] = lambda x: grouped_conv2d(x, conv.weight, conv.bias, *args,
                                                     conv.groups)
    return out


class TritonConv2d(nn.Module):
    """``conv`` (its parameters shared, not copied) with its forward in the Triton kernel;
    gradients flow through PyTorch's own conv backward."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        reason = unsupported(conv)
        if reason:
            raise ValueError(f"the Triton conv cannot run this layer: {reason}")
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .grouped_conv import GroupedConv2dFunction  # Triton: only when run

        c = self.conv
        return GroupedConv2dFunction.apply(x, c.weight, c.bias, c.stride, c.padding, c.dilation,
                                           c.groups)


# (lowering chosen, ms of each candidate) per (device, dtype, shapes, conv settings)
_CACHE: Dict[tuple, Tuple[str, Dict[str, float]]] = {}


def dispatch_cache() -> Dict[tuple, Tuple[str, Dict[str, float]]]:
    """The choices made so far in this process."""
    return _CACHE


def _time_ms(fn: Callable, x: torch.Tensor, repeats: int = 10) -> float:
    """Median ms of ``fn(x)`` by the one timer (:func:`deeproots.timing.interleaved`): CUDA
    events after a synchronised warm-up on a GPU; three warm-up calls and no minimum warm-up
    time, since the dispatch times every lowering of every new shape."""
    def call():
        with torch.no_grad():
            fn(x)

    timing = interleaved({"call": call}, images=1, repeats=repeats, warmup=3, warmup_s=0.0,
                         cuda=x.is_cuda)
    return 1000 * timing["call"].median_s


class DispatchConv2d(nn.Module):
    """``conv`` run by the fastest of its lowerings for each input shape, dtype and device:
    measured on the first call with that key, remembered for the process
    (:func:`dispatch_cache`). ``choices`` limits the candidates."""

    timer = staticmethod(_time_ms)  # replaceable, e.g. by a fake clock in tests

    def __init__(self, conv: nn.Conv2d, choices=LOWERINGS):
        super().__init__()
        self.conv, self.choices = conv, tuple(choices)
        self.chosen: Dict[tuple, str] = {}

    def _key(self, x: torch.Tensor) -> tuple:
        c = self.conv
        return (str(x.device), str(x.dtype), tuple(x.shape), x.is_contiguous(
            memory_format=torch.channels_last), tuple(c.weight.shape), c.stride, c.padding,
            c.dilation, c.groups, c.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        options = {k: fn for k, fn in lowerings(self.conv, x.device).items()
                   if k in self.choices}
        if key not in _CACHE:
            ms = {k: self.timer(fn, x) for k, fn in options.items()}
            _CACHE[key] = (min(ms, key=ms.get), ms)
        self.chosen[key] = _CACHE[key][0]
        return options[_CACHE[key][0]](x)


def replace_convs(model: nn.Module, make: Callable[[nn.Conv2d], nn.Module],
                  only_grouped: bool = True) -> Tuple[nn.Module, List[str]]:
    """A copy of ``model`` with each grouped conv wrapped by ``make(conv)``; returns it and
    one line per grouped conv left as it was (and why)."""
    model = copy.deepcopy(model)
    kept = []
    for path, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or (only_grouped and conv.groups == 1):
            continue
        try:
            wrapped = make(conv)
        except ValueError as err:
            kept.append(f"{layer_name(path)}: {err}")
            continue
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, wrapped)
    return model, kept
