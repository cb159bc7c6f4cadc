"""The training step, one for ``deeproots train`` and ``deeproots bench --mode train``:
forward, loss, backward and the optimizer's update, with what keeps a GPU busy.

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

import time
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ..checks import check_choice
from ..config import COMPILE_MODES, OPTIMIZERS
from ..layout import Layout, choose_layout
from ..speed.paths import resolve_grouped_conv
from ..speed.timing import Mark
from .objectives import Distillation, GroupLasso, loss_of

__all__ = ["TrainStep", "make_optimizer"]


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4, opt: str = "sgd") -> torch.optim.Optimizer:
    """``opt``: SGD with momentum (the paper's recipe) or AdamW (decoupled weight decay, betas
    0.9 and 0.999); weight decay on conv and linear weights, not on biases and batch norm."""
    check_choice("opt", opt, OPTIMIZERS)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)


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
        # resolved once by the caller (train, the bench) and carried; "auto" still resolves
        self.grouped_conv = resolve_grouped_conv(grouped_conv, self.device.type, compile)
        self.fallbacks: List[str] = []
        if self.grouped_conv != "native":
            from ..kernels.modules import use_grouped_conv  # Triton: only when asked for

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
        marks = [Mark(self.device) for _ in range(4)]
        self._step(x, y, lr, marks)
        names = ("forward", "backward", "optimizer")
        return {name: marks[i].seconds_to(marks[i + 1]) for i, name in enumerate(names)}

    def _step(self, x, y, lr: float, marks: List[Mark]) -> torch.Tensor:
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
