"""The training step, one for ``deeproots train`` and ``deeproots bench --mode train``:
forward, loss, backward and the SGD update, with what keeps a GPU busy.

* No host synchronisation per step: the running loss and correct count are summed on the
  device and read only when asked (:meth:`TrainStep.read`, once per progress-bar refresh,
  checkpoint or epoch), and a non-finite loss is recorded there too (the first step it
  happened and its value) instead of being checked with ``.item()`` every step. A GPU step
  then only queues work, and the host runs ahead.
* The layout (:class:`Layout`, :func:`choose_layout`): memory format and autocast, one
  decision for the step and evaluation; on CUDA bf16 autocast and channels-last.
* ``compile``: ``torch.compile`` of the forward and loss (backward compiled with it), in
  one of its modes: ``default``; ``reduce-overhead`` (CUDA graphs: one launch per step
  instead of hundreds); ``max-autotune`` (also tunes the conv and matmul kernels). If
  compiling fails, the step says why in one line and runs eagerly.
* ``grouped_conv``: how grouped convs run (:mod:`deeproots.kernels.modules`): ``native``
  (PyTorch), ``triton`` (deeproots' kernels, forward and backward) or ``dispatch`` (the
  fastest, measured per layer).
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import DeeprootsError
from .checks import check_choice
from .config import COMPILE_MODES, GROUPED_CONV, MEMORY_FORMATS, TRITON_VERIFIED_ON_GPU
from .calibration import assign_groups
from .layers import conv_layers, main_logits

__all__ = ["TrainStep", "Layout", "choose_layout", "make_optimizer", "loss_of",
           "resolve_grouped_conv", "distillation_loss", "Distillation", "GroupLasso"]


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


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD with momentum; weight decay on conv and linear weights, not on biases and batch
    norm."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=False)


def loss_of(out, y: torch.Tensor, aux_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(main logits, loss): cross-entropy, plus ``aux_weight`` x each auxiliary classifier's
    (GoogLeNet's, Szegedy et al.: 0.3)."""
    logits = main_logits(out)
    loss = F.cross_entropy(logits, y)
    if isinstance(out, tuple):
        loss = loss + aux_weight * sum(F.cross_entropy(a, y) for a in out[1:] if a is not None)
    return logits, loss


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s distillation term: the KL divergence from the teacher's softened
    class probabilities to the student's, at ``temperature``, times temperature squared (so
    its gradients keep their scale as the temperature changes)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.softmax(teacher.float() / t, 1),
                    reduction="batchmean") * t * t


class Distillation:
    """The loss of a student trained with a teacher: ``(1 - weight) x`` the usual loss plus
    ``weight x`` :func:`distillation_loss` on the teacher's logits for the same batch (the
    teacher in eval mode, no gradients)."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, weight: float = 0.5):
        self.teacher, self.temperature, self.weight = teacher.eval(), temperature, weight
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor
                 ) -> torch.Tensor:
        with torch.no_grad():
            target = main_logits(self.teacher(x))
        return (1 - self.weight) * loss + self.weight * distillation_loss(
            logits, target, self.temperature)


class GroupLasso:
    """CondenseNet's idea for any CNN: a group-lasso penalty, ``weight x`` the sum over the
    grouped-to-be convs of the L2 norms of each (filter, input channel) kernel outside its
    block of an assignment of filters and input channels to groups
    (:func:`deeproots.calibration.assign_groups`, on the weights' energy); :meth:`reassign`
    re-estimates the assignment from the weights as they are. Driving those kernels to zero
    makes the model groupable: a calibrated conversion then keeps almost all its weight."""

    def __init__(self, model: nn.Module, groups: Dict[str, int], weight: float = 1e-3):
        self.convs = {n: conv_layers(model)[n] for n in groups}
        self.groups, self.weight = dict(groups), weight
        self.masks: Dict[str, torch.Tensor] = {}
        self.reassign()

    @torch.no_grad()
    def reassign(self) -> Dict[str, float]:
        """New blocks from the weights as they are; returns each layer's fraction of its
        weight energy inside them."""
        kept = {}
        for name, conv in self.convs.items():
            score = conv.weight.detach().double().pow(2).sum((2, 3)).cpu().numpy()
            rows, cols, kept[name] = assign_groups(score, self.groups[name], starts=1)
            inside = torch.from_numpy(rows[:, None] == cols[None, :])
            self.masks[name] = (~inside).to(conv.weight.device, conv.weight.dtype)
        return kept

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for name, conv in self.convs.items():
            norms = conv.weight.float().pow(2).sum((2, 3)).add(1e-12).sqrt()
            total = total + (norms * self.masks[name]).sum()
        return self.weight * total

    @torch.no_grad()
    def kept(self) -> Dict[str, float]:
        """Each layer's fraction of its weight energy inside its blocks, as assigned."""
        out = {}
        for name, conv in self.convs.items():
            energy = conv.weight.detach().float().pow(2).sum((2, 3))
            out[name] = 1.0 - float((energy * self.masks[name]).sum() / energy.sum())
        return out


def resolve_grouped_conv(how: str, device: torch.device, compile: Optional[str] = None) -> str:
    """``auto``: PyTorch's own (cuDNN, oneDNN) until a GPU run has shown the Triton
    lowerings correct and faster (:data:`deeproots.config.TRITON_VERIFIED_ON_GPU`); then
    the measured dispatch on CUDA when Triton is installed. Native under ``compile`` (the
    compiler then sees whole graphs and picks its own kernels). ``triton`` runs on the CPU
    only under ``TRITON_INTERPRET=1`` (for tests)."""
    check_choice("grouped_conv", how, GROUPED_CONV)
    if how != "auto":
        interpreted = how == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if how in ("triton", "dispatch") and device.type != "cuda" and not interpreted:
            raise DeeprootsError(f"grouped_conv {how!r} runs on CUDA GPUs; got device {device} "
                                 f"(accepted there: native or auto)")
        return how
    if device.type != "cuda" or compile or not TRITON_VERIFIED_ON_GPU:
        return "native"
    try:
        import triton  # noqa: F401  (the GPU extra)
    except ImportError:
        return "native"
    return "dispatch"


class TrainStep:
    """One training step of ``model`` (already on its device) by ``optimizer``.

    ``step(x, y, lr)`` queues forward, loss, backward and update, and adds the batch's loss
    and correct count to sums kept on the device; ``read()`` returns them (and the first
    non-finite loss, if any), synchronising once. ``phases(x, y, lr)`` runs one step and
    returns the seconds of its forward, backward and optimizer parts (timm's ``--detail``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 net: Optional[nn.Module] = None, aux_weight: float = 0.3,
                 compile: Optional[str] = None, grouped_conv: str = "native",
                 layout: Optional[Layout] = None,
                 distillation: Optional[Distillation] = None,
                 penalty: Optional[GroupLasso] = None):
        self.model, self.optimizer = model, optimizer
        self.distillation, self.penalty = distillation, penalty
        self.net = net if net is not None else model  # what runs forward (a DDP wrapper)
        self.aux_weight = aux_weight
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.layout = layout if layout is not None else choose_layout(self.device)
        self.layout.apply(model)  # in place; a no-op if it is already
        self.autocast = self.layout.autocast
        self.grouped_conv = resolve_grouped_conv(grouped_conv, self.device, compile)
        self.fallbacks: List[str] = []
        if self.grouped_conv != "native":
            from .kernels.modules import use_grouped_conv  # Triton: only when asked for

            self.fallbacks = use_grouped_conv(model, self.grouped_conv)
        if compile is not None:
            check_choice("compile", compile, COMPILE_MODES)
        self.compile_mode = compile
        self.compile_s: Optional[float] = None  # seconds of the first (compiling) step
        self.compile_error: Optional[str] = None
        self._forward = self._eager_forward
        if compile:
            self._forward = torch.compile(self._eager_forward,
                                          mode=None if compile == "default" else compile)
        self._compiled = bool(compile)
        # sums on the device: loss x images, correct, first non-finite step (0: none), its loss
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.seen = 0  # images, counted on the host (known without the GPU)
        self.steps = 0

    # -- the parts of a step

    def _eager_forward(self, x: torch.Tensor, y: torch.Tensor):
        with self.autocast():
            logits, loss = loss_of(self.net(x), y, self.aux_weight)
            if self.distillation is not None:
                loss = self.distillation(x, logits, loss)
        if self.penalty is not None and self.net.training:
            loss = loss + self.penalty()
        correct = (logits.argmax(1) == y).sum()
        return loss, correct

    def _prepare(self, x: torch.Tensor, y: torch.Tensor):
        return self.layout.input(x), y.to(self.device, non_blocking=True)

    def _run_forward(self, x, y):
        if not self._compiled or self.compile_s is not None:
            return self._forward(x, y)
        started = time.perf_counter()  # the first compiled call compiles
        try:
            out = self._forward(x, y)
        except Exception as err:  # noqa: BLE001  (any compiler failure: run eagerly)
            self._fall_back(err)
            return self._forward(x, y)
        self._first_call = started
        return out

    def _fall_back(self, err: BaseException) -> None:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else \
            type(err).__name__
        self.compile_error = f"{type(err).__name__}: {reason}"
        warnings.warn(f"torch.compile failed ({self.compile_error}); training eagerly",
                      RuntimeWarning, stacklevel=3)
        self._forward, self._compiled = self._eager_forward, False
        self.optimizer.zero_grad(set_to_none=True)

    def _accumulate(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        loss = loss.detach().double()
        s = self._sums
        bad = ~torch.isfinite(loss) & (s[2] == 0)
        s[2] = torch.where(bad, float(self.steps + 1), s[2])
        s[3] = torch.where(bad, loss, s[3])
        s[0] += loss * n
        s[1] += correct
        self.seen += n
        self.steps += 1

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step at learning rate ``lr``; returns the loss (a device tensor:
        reading it waits for the GPU)."""
        return self._step(x, y, lr, [])

    def phases(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> Dict[str, float]:
        """Seconds of the forward (with the loss), backward and optimizer parts of one step,
        each timed alone (CUDA events on a GPU)."""
        marks = [_Mark(self.device) for _ in range(4)]
        self._step(x, y, lr, marks)
        names = ("forward", "backward", "optimizer")
        return {name: marks[i].seconds_to(marks[i + 1]) for i, name in enumerate(names)}

    def _step(self, x, y, lr: float, marks: List["_Mark"]) -> torch.Tensor:
        """The step; ``marks`` (none, or four) are recorded before the forward, the backward,
        the optimizer and after it."""
        def mark(i):
            if marks:
                marks[i].record()

        x, y = self._prepare(x, y)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mark(0)
        loss, correct = self._run_forward(x, y)
        mark(1)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss.backward()
        except Exception as err:  # noqa: BLE001  (the compiled backward failed to build)
            if not (self._compiled and self.compile_s is None):
                raise
            self._fall_back(err)
            loss, correct = self._forward(x, y)
            loss.backward()
        mark(2)
        self.optimizer.step()
        mark(3)
        if self._compiled and self.compile_s is None:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.compile_s = time.perf_counter() - self._first_call
        self._accumulate(loss, correct, len(y))
        return loss

    def largest_batch(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """After ``x`` ran out of memory: the largest of half, a quarter, ... of the batch
        whose forward and backward fit (0 if not even one image), tried eagerly; no weight
        changes, the gradients are cleared."""
        x, y = self._prepare(x, y)
        fits = len(x) // 2
        while fits >= 1:
            self.optimizer.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.empty_cache()
            try:
                self._eager_forward(x[:fits], y[:fits])[0].backward()
                break
            except torch.cuda.OutOfMemoryError:
                fits //= 2
        self.optimizer.zero_grad(set_to_none=True)
        return fits

    # -- the sums

    def read(self) -> Dict[str, float]:
        """The sums since :meth:`reset` (one synchronisation): ``loss_sum`` (loss x images),
        ``correct``, ``seen``, and ``bad_step`` / ``bad_loss``: the first step (1-based, 0 if
        none) whose loss was not finite, and that loss."""
        loss_sum, correct, bad_step, bad_loss = self._sums.tolist()
        return {"loss_sum": loss_sum, "correct": correct, "seen": float(self.seen),
                "bad_step": int(bad_step), "bad_loss": bad_loss}

    def reset(self, loss_sum: float = 0.0, correct: float = 0.0, seen: float = 0.0,
              steps: int = 0) -> None:
        """Start the sums again (from a checkpoint's, when resuming part-way)."""
        self._sums = torch.tensor([loss_sum, correct, 0.0, 0.0], dtype=torch.float64,
                                  device=self.device)
        self.seen, self.steps = int(seen), steps


class _Mark:
    """A point in time on ``device``'s queue (a CUDA event on that GPU's current stream,
    whichever GPU is current) or the host's clock."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.t = 0.0

    def record(self) -> None:
        if self.cuda:
            self.event.record(torch.cuda.current_stream(self.device))
        else:
            self.t = time.perf_counter()

    def seconds_to(self, later: "_Mark") -> float:
        if self.cuda:
            later.event.synchronize()
            return self.event.elapsed_time(later.event) / 1000
        return later.t - self.t
