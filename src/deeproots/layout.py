"""The memory layout and precision a model runs in: one decision, made here and carried to
whoever needs it (the training step, evaluation, the inference paths, the calibration
passes, the benchmarks), never set again by hand.

* channels-last (NHWC) everywhere by default: oneDNN's convolutions on a CPU, its grouped ones
  above all, and the tensor cores' on a GPU read it directly (``python
  benchmarks/train_throughput.py``; docs/training.md has the figures);
* bf16 autocast for training on CUDA (float32 on the CPU).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Dict, Iterator, Optional, Tuple, TypeVar

import torch
from torch import nn

from .checks import check_choice
from .config import MEMORY_FORMATS

__all__ = ["Layout", "choose_layout", "channels_last", "Placement", "float32_cpu_copy"]

T = TypeVar("T", torch.Tensor, nn.Module)


def channels_last(value: T) -> T:
    """A model (in place) or a batch of images (a copy where needed) in channels-last, the
    layout every fast path of deeproots runs convolutions in; other tensors as they are."""
    if isinstance(value, nn.Module):
        return value.to(memory_format=torch.channels_last)
    return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value


class Layout:
    """How a training run holds its tensors: the memory format of the model and of every
    batch (``"channels-last"`` or ``"contiguous"``, NCHW) and the autocast dtype (None:
    float32). One decision for the step, evaluation and the checkpoint's records."""

    def __init__(self, device: torch.device, memory_format: str = "contiguous",
                 autocast_dtype: Optional[torch.dtype] = None):
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.autocast_dtype = autocast_dtype

    def __repr__(self) -> str:
        cast = f", autocast {self.autocast_dtype}" if self.autocast_dtype else ""
        return f"Layout({self.memory_format}{cast})"

    @property
    def torch_format(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format == "channels-last" else \
            torch.contiguous_format

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` in this memory format, in place (before DDP wraps it)."""
        return model.to(memory_format=self.torch_format)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, in this memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.torch_format) if x.dim() == 4 else x

    def autocast(self):
        """The autocast context of the forward pass (a no-op in float32)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    # bf16 autocast on GPUs: tensor cores, half the bytes of every activation
    return torch.bfloat16 if device.type == "cuda" else None


def choose_layout(device: torch.device, memory_format: str = "auto") -> Layout:
    """The training layout for ``device``: bf16 autocast on CUDA (float32 on the CPU), and
    the memory format ``memory_format`` names; ``"auto"`` is channels-last on every device.
    On CUDA that is the layout tensor-core convolutions read directly; on the CPU oneDNN's
    convolutions, its grouped ones above all, run faster in it, forward and backward, for
    every model measured (``python benchmarks/train_throughput.py``; the figures are in
    docs/training.md). A rule, not a measurement: two runs of the same command compute the
    same numbers."""
    check_choice("memory_format", memory_format, MEMORY_FORMATS)
    device = torch.device(device)
    fmt = "channels-last" if memory_format == "auto" else memory_format
    return Layout(device, fmt, _autocast_dtype(device))


def _tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _is_channels_last(t: torch.Tensor) -> bool:
    """Held channels-last and not also plainly contiguous (a 1x1 conv's weight can be both)."""
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous())


def float32_cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` on the CPU (its floating tensors cast; ``model``
    unchanged): what a conversion computes on, whatever the model's precision and device."""
    return copy.deepcopy(model).to("cpu", torch.float32)


class Placement:
    """How a user's model holds each of its tensors (by name): its device, its dtype, and
    whether it is channels-last. A conversion computes on a float32 CPU copy
    (:func:`float32_cpu_copy`), in its own layout; what it returns is held as the model was
    (:meth:`restore`): a half-precision model on a GPU comes back in half precision on that
    GPU, a contiguous one contiguous."""

    def __init__(self, model: nn.Module):
        self.held: Dict[str, Tuple[torch.device, torch.dtype, bool]] = {
            name: (t.device, t.dtype, _is_channels_last(t)) for name, t in _tensors(model)}

    @property
    def moved(self) -> bool:
        """Whether a float32 CPU copy differs from the model (a tensor elsewhere, or a
        floating one in another precision)."""
        return any(dev.type != "cpu" or (dtype.is_floating_point and dtype != torch.float32)
                   for dev, dtype, _ in self.held.values())

    def restore(self, model: nn.Module) -> nn.Module:
        """``model`` (a conversion of the placed one: the same names) held, in place, as the
        placed model held each tensor of the same name; tensors of other names as they are.
        As ``Module.to`` moves them: a parameter stays the same object (shared ones stay
        shared) wherever torch can swap its data."""
        names: Dict[int, str] = {}
        for name, t in _tensors(model):
            names.setdefault(id(t), name)

        def place(t: torch.Tensor) -> torch.Tensor:
            held = self.held.get(names.get(id(t), ""))
            if held is None:
                return t
            dev, dtype, last = held
            out = t.to(dev, dtype if t.is_floating_point() else t.dtype)
            if out.dim() == 4:
                out = out.contiguous(memory_format=torch.channels_last if last
                                     else torch.contiguous_format)
            return out

        with torch.no_grad():
            model._apply(place)  # torch's own walk (Module.to's): parameters swapped in place
        return model
