"""Putting the kernels into models: a conv module that runs the Triton kernel, and a conv
module that picks, per shape, dtype and device, the fastest of several lowerings of a
grouped convolution, measured once and remembered.

The lowerings of a grouped conv:

* ``native``: ``F.conv2d(..., groups=g)`` (cuDNN on a GPU, oneDNN on a CPU);
* ``triton``: deeproots' Triton kernel (:mod:`.grouped_conv`; CUDA only);
* ``dense``: one ungrouped conv whose weight is block-diagonal (zeros off the groups):
  g times the multiply-adds, but a GEMM the library runs fast;
* ``split``: one conv per group, concatenated;
* ``inductor``: ``F.conv2d`` compiled by torch.compile with ``max-autotune``, which measures
  inductor's own Triton conv templates (they take groups) against cuDNN's kernel.
  Seconds to compile per shape, so a dispatch measures it only when asked
  (``choices=LOWERINGS``); the default candidates are ``DEFAULT_LOWERINGS``.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DeeprootsError, first_line
from ..models.layers import layer_name
from ..numerics import disagreement, tolerance
from ..speed.paths import DEFAULT_LOWERINGS, GROUPED_CONV, LOWERINGS
from ..speed.timing import interleaved

__all__ = ["TritonConv2d", "DispatchConv2d", "LOWERINGS", "lowerings", "unsupported",
           "replace_convs", "dispatch_cache", "CONV_MODULES", "use_grouped_conv",
           "DEFAULT_LOWERINGS", "dispatch_notes", "tolerance", "disagreement",
           "MEASURE_IMAGES", "restore_choices"]



def padding_unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why the Triton kernels cannot pad as ``conv`` does, or None."""
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (the kernel pads with zeros)"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r} (the kernel takes explicit padding)"
    return None


def unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why the Triton conv module should not run ``conv``, or None."""
    reason = padding_unsupported(conv)
    if reason:
        return reason
    if conv.groups == 1:
        return "ungrouped (left to cuDNN's dense kernels)"
    return None


def _dense_weight(conv: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
    """The block-diagonal [out, in, k, k] weight equal to ``conv``'s grouped ``weight``
    (differentiable: its gradient is the grouped weight's)."""
    g = conv.groups
    out, per = weight.shape[0], weight.shape[1]
    rows = torch.arange(out, device=weight.device) // (out // g)
    cols = torch.arange(per * g, device=weight.device) // per
    mask = (rows[:, None] == cols[None, :]).to(weight.dtype)[:, :, None, None]
    return weight.repeat(1, g, 1, 1) * mask


def _autocast(x: torch.Tensor, *tensors):
    """``tensors`` in the dtype autocast would run a conv in, if autocast is on."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None else None for t in (x, *tensors))


# a lowering: fn(conv, x, weight, bias) -> y; weight and bias passed in, so that the dispatch
# can time a backward pass on copies without touching the layer's gradients
def _native(conv, x, weight, bias):
    return conv._conv_forward(x, weight, bias)


def _dense(conv, x, weight, bias):
    return F.conv2d(x, _dense_weight(conv, weight), bias, conv.stride, conv.padding,
                    conv.dilation, 1)


def _split(conv, x, weight, bias):
    g, per = conv.groups, conv.in_channels // conv.groups
    biases = bias.chunk(g) if bias is not None else [None] * g
    return torch.cat([F.conv2d(x[:, i * per:(i + 1) * per], w, b, conv.stride, conv.padding,
                               conv.dilation) for i, (w, b) in enumerate(
                                   zip(weight.chunk(g), biases))], 1)


def _triton(conv, x, weight, bias):
    from .grouped_conv import GroupedConv2dFunction  # Triton: only when run

    x, weight, bias = _autocast(x, weight, bias)
    return GroupedConv2dFunction.apply(x, weight, bias, conv.stride, conv.padding,
                                       conv.dilation, conv.groups)


# one compiled F.conv2d per (stride, padding, dilation, groups); inductor specialises each
# on its input shapes
_COMPILED: Dict[tuple, Callable] = {}


def _inductor(conv, x, weight, bias):
    key = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if key not in _COMPILED:
        def conv2d(x, weight, bias):
            return F.conv2d(x, weight, bias, *key)

        _COMPILED[key] = torch.compile(conv2d, mode="max-autotune-no-cudagraphs",
                                       dynamic=False)
    return _COMPILED[key](x, weight, bias)


def lowerings(conv: nn.Conv2d, device: torch.device) -> Dict[str, Callable]:
    """The lowerings of ``conv`` that can run on ``device``, each
    ``fn(conv, x, weight, bias) -> y``."""
    out: Dict[str, Callable] = {"native": _native}
    if conv.groups > 1 and conv.padding_mode == "zeros":
        out["dense"] = _dense
        out["split"] = _split
        out["inductor"] = _inductor
        if device.type == "cuda" and unsupported(conv) is None:
            out["triton"] = _triton
    return out


class _SharedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` holding ``conv``'s own parameters (shared, not copied): its
    ``state_dict`` is ``conv``'s, so checkpoints, cost counting and analysis see the same
    layer."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.train(conv.training)


class TritonConv2d(_SharedConv2d):
    """``conv`` (its parameters shared) run forward and backward by the Triton kernels."""

    def __init__(self, conv: nn.Conv2d):
        reason = unsupported(conv)
        if reason:
            raise DeeprootsError(f"the Triton conv cannot run this layer: {reason}")
        super().__init__(conv)

    # torch.compile runs this layer as it is (a graph break), not traced into its kernels
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _triton(self, x, self.weight, self.bias)


# (lowering chosen, ms of each candidate) per (device type, dtype, autocast, training,
# batch bucket, shapes, conv): the choices of this process
_CACHE: Dict[tuple, Tuple[str, Dict[str, float]]] = {}
_RESTORED: set = set()  # keys whose choice a checkpoint brought, not yet verified here
_FULL_CHECKED: set = set()  # keys whose choice was checked on a batch larger than the slice
MEASURE_IMAGES = 32  # candidates are verified and timed on at most this slice of a batch


def dispatch_cache() -> Dict[tuple, Tuple[str, Dict[str, float]]]:
    """The choices made so far in this process (a checkpoint keeps them, so that a resumed
    run computes with the lowerings it started with: :func:`restore_choices`)."""
    return _CACHE


def restore_choices(items) -> None:
    """A checkpoint's dispatch choices, ``(key, (lowering, timings))`` pairs, taken as this
    process's; each is verified on its first use, as a new choice is, before it runs."""
    for key, value in items:
        key = tuple(tuple(k) if isinstance(k, list) else k for k in key)
        _CACHE[key] = tuple(value) if isinstance(value, list) else value
        _RESTORED.add(key)


def _time_ms(call: Callable[[], None], cuda: bool, name: str = "", repeats: int = 10,
             device: Optional[torch.device] = None) -> float:
    """Median ms of ``call()`` by the one timer (:func:`deeproots.speed.timing.interleaved`): CUDA
    events on ``device``'s current stream after a synchronised warm-up on a GPU; three
    warm-up calls and no minimum warm-up time, since the dispatch times every lowering of
    every new shape."""
    warmup = 3
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted: a timing means nothing;
        # one call, to choose (the dispatch's CPU lowerings are timed alike here)
        repeats, warmup = 1, 0
    timing = interleaved({"call": call}, images=1, repeats=repeats, warmup=warmup,
                         warmup_s=0.0, cuda=cuda, device=device)
    return 1000 * timing["call"].median_s


def _bucket(n: int) -> int:
    """The batch size's bucket in a dispatch key: the next power of two (a last partial
    batch, an evaluation pass, a halved batch reuse the choice of their bucket)."""
    return 1 << max(0, n - 1).bit_length()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DispatchConv2d(_SharedConv2d):
    """``conv`` (its parameters shared) run by the fastest of its lowerings for each input
    shape (the batch bucketed), dtype, kind of device and autocast setting, chosen on the
    first call with that key and remembered for the process (:func:`dispatch_cache`).

    Every lowering but the native one is verified first: run once on the real input (a
    slice of at most :data:`MEASURE_IMAGES` images), its output, and in training its input,
    weight and bias gradients, compared with the native lowering's within a tolerance per
    dtype (:func:`tolerance`). One that raises or disagrees is dropped for that key with one
    warning line naming the layer, the lowering and the reason (``rejected``,
    :func:`dispatch_notes`), and the layer goes on with the others. The verified ones are
    timed (forward and backward in training, on copies of the tensors, so the layer's own
    gradients are untouched) and the fastest kept. Under torchrun, rank 0 chooses and the
    other ranks take its choice. ``choices`` names the candidates (any of ``LOWERINGS``)."""

    timer = staticmethod(_time_ms)  # replaceable, e.g. by a fake clock in tests

    def __init__(self, conv: nn.Conv2d, choices=DEFAULT_LOWERINGS, name: str = ""):
        super().__init__(conv)
        bad = [c for c in choices if c not in LOWERINGS]
        if bad or not choices:
            raise DeeprootsError(f"dispatch choices must be among {', '.join(LOWERINGS)}; got "
                                 f"{list(choices)}")
        self.choices = tuple(choices)
        self.layer = name
        self.chosen: Dict[tuple, str] = {}
        self.rejected: Dict[str, str] = {}  # lowering -> why it was dropped

    def _key(self, x: torch.Tensor, training: bool) -> tuple:
        kind = x.device.type
        cast = str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else ""
        return (kind, str(x.dtype), cast, training, _bucket(x.shape[0]), tuple(x.shape[1:]),
                x.is_contiguous(memory_format=torch.channels_last), tuple(self.weight.shape),
                self.stride, self.padding, self.dilation, self.groups, self.bias is not None)

    def _twins(self, x: torch.Tensor, training: bool):
        def twin(t):  # a copy that wants a gradient where the original does
            return t.detach().clone().requires_grad_(training and t.requires_grad) \
                if t is not None else None

        return twin(x[:MEASURE_IMAGES]), twin(self.weight), twin(self.bias)

    def _run(self, fn, tensors, grad) -> List[Optional[torch.Tensor]]:
        """The output and, with ``grad``, the gradients of the tensors that want one."""
        x_, w_, b_ = tensors
        if grad is None:
            with torch.no_grad():
                return [fn(self, x_, w_, b_)]
        y = fn(self, x_, w_, b_)
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        return [y.detach(), *torch.autograd.grad(y, wanted, grad.to(y.dtype))]

    def _verify(self, options: Dict[str, Callable], x: torch.Tensor,
                training: bool) -> Dict[str, Callable]:
        """The lowerings that agree with the native one on this input (the native one
        itself included); the others are rejected, with the reason."""
        tensors = self._twins(x, training)
        with torch.no_grad():
            shape = _native(self, tensors[0], tensors[1], tensors[2]).shape
        grad = None
        if training:  # a random upstream gradient, from a generator of its own: the run's
            # random state is not touched
            gen = torch.Generator(device=x.device).manual_seed(0)
            grad = torch.randn(shape, generator=gen, device=x.device)
        want = self._run(_native, tensors, grad)
        # the tolerance of the dtype the conv computes in (its output's: bf16 under autocast
        # though the input is fp32), for the output and the gradients alike
        dtype = want[0].dtype
        kept = {"native": _native}
        for name, fn in options.items():
            if name == "native":
                continue
            try:
                got = self._run(fn, tensors, grad)
                reason = next((f"{what}: {why}" for what, g, w in zip(
                    ("output", "input gradient", "weight gradient", "bias gradient"), got,
                    want) if (why := disagreement(g, w, dtype))), None)
            except Exception as err:  # noqa: BLE001  (a compile, ptxas, resource error)
                reason = f"{type(err).__name__}: {first_line(err, 200)}"
            if reason is None:
                kept[name] = fn
            else:
                self._reject(name, reason)
        return kept

    def _reject(self, name: str, reason: str) -> None:
        if name in self.rejected:
            return
        self.rejected[name] = reason
        warnings.warn(f"deeproots dispatch: {self.layer or 'a grouped conv'}: lowering "
                      f"{name!r} dropped ({reason}); it goes on without it",
                      RuntimeWarning, stacklevel=3)

    def _measure(self, options: Dict[str, Callable], x: torch.Tensor,
                 training: bool) -> Dict[str, float]:
        x_, w_, b_ = self._twins(x, training)
        grad = None
        ms = {}
        for name, fn in options.items():
            def call(fn=fn):
                if not training:
                    with torch.no_grad():
                        fn(self, x_, w_, b_)
                    return
                y = fn(self, x_, w_, b_)
                nonlocal grad
                grad = torch.ones_like(y) if grad is None else grad
                y.backward(grad)
                for t in (x_, w_, b_):
                    if t is not None:
                        t.grad = None

            ms[name] = self.timer(call, x.is_cuda, name=name, device=x.device)
        return ms

    def _choose(self, options, x, training) -> Tuple[str, Dict[str, float]]:
        if len(options) == 1:
            return next(iter(options)), {next(iter(options)): 0.0}
        kept = self._verify(options, x, training)
        ms = self._measure(kept, x, training) if len(kept) > 1 else {"native": 0.0}
        return min(ms, key=ms.get), ms

    @torch.compiler.disable  # the measuring is host code; the compiler leaves it alone
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        key = self._key(x, training)
        options = {k: fn for k, fn in lowerings(self, x.device).items() if k in self.choices}
        if key not in _CACHE or _CACHE[key][0] not in options:
            _CACHE[key] = self._decide(key, lambda: self._choose(options, x, training))
            _RESTORED.discard(key)
        elif key in _RESTORED:  # a choice a checkpoint brought: verified before its first use
            chosen = _CACHE[key][0]
            _CACHE[key] = self._decide(key, lambda: self._recheck(options, chosen, x,
                                                                   training))
            _RESTORED.discard(key)
        chosen = _CACHE[key][0]
        self.chosen[key] = chosen
        if chosen != "native" and key not in _FULL_CHECKED and len(x) > MEASURE_IMAGES:
            chosen = self._check_full(key, options, chosen, x)
        return options[chosen](self, x, self.weight, self.bias)

    def _decide(self, key: tuple, decide: Callable[[], Tuple[str, Dict[str, float]]]):
        """``decide()`` here, or under torchrun rank 0's, broadcast to every rank, once the
        ranks agree they are at the same key (a rank at another key would wait on another
        broadcast for ever): ranks that disagree run natively, and every rank remembers
        every rank's key as native, so that their caches stay alike."""
        if not _distributed():
            return decide()
        import torch.distributed as dist

        keys: List[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(keys, key)
        if any(k != key for k in keys):
            for k in keys:
                _CACHE.setdefault(k, ("native", {"native": 0.0}))
            self._reject("dispatch", "the processes of a torchrun met different shapes at this "
                                     "layer; it runs natively")
            return _CACHE[key] if _CACHE[key][0] == "native" else ("native", {"native": 0.0})
        chosen = [decide() if dist.get_rank() == 0 else None, self.rejected]
        dist.broadcast_object_list(chosen, src=0)
        self.rejected = dict(chosen[1])
        return chosen[0]

    def _recheck(self, options, chosen: str, x: torch.Tensor, training: bool):
        """A restored choice, verified on this input as a new one is (else native)."""
        if chosen == "native" or chosen not in options:
            return "native", {"native": 0.0}
        kept = self._verify({"native": _native, chosen: options[chosen]}, x, training)
        return (chosen, _CACHE[self._key(x, training)][1]) if chosen in kept else \
            ("native", {"native": 0.0})

    def _check_full(self, key: tuple, options, chosen: str, x: torch.Tensor) -> str:
        """The first batch larger than the measured slice (another autotune bucket of the
        Triton kernels): the chosen lowering's output checked against the native one on it,
        once per key; native from then on if they disagree (under torchrun, if they disagree
        on any rank)."""
        with torch.no_grad():
            try:
                got = options[chosen](self, x, self.weight, self.bias)
                want = _native(self, x, self.weight, self.bias)
                reason = disagreement(got, want, want.dtype)
            except Exception as err:  # noqa: BLE001  (a compile or resource error)
                reason = f"{type(err).__name__}: {first_line(err, 200)}"
        if _distributed():  # one verdict for every rank
            import torch.distributed as dist

            reasons: List[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(reasons, reason)
            reason = next((r for r in reasons if r), None)
        _FULL_CHECKED.add(key)
        if reason is None:
            return chosen
        self._reject(chosen, f"on a full batch of {len(x)}: {reason}")
        _CACHE[key] = ("native", {"native": 0.0})
        self.chosen[key] = "native"
        return "native"


def dispatch_notes(model: nn.Module) -> List[str]:
    """One line per lowering a dispatch in ``model`` dropped, and why (for a run's
    ``summary.json`` and the bench's notes)."""
    return [f"{m.layer or name}: lowering {low!r} dropped ({why})"
            for name, m in model.named_modules() if isinstance(m, DispatchConv2d)
            for low, why in m.rejected.items()]


def replace_convs(model: nn.Module, make: Callable[[nn.Conv2d], nn.Module],
                  only_grouped: bool = True, inplace: bool = False
                  ) -> Tuple[nn.Module, List[str]]:
    """A copy of ``model`` (``model`` itself with ``inplace``) with each grouped conv
    replaced by ``make(conv)``; returns it and one line per grouped conv left as it was (and
    why)."""
    model = model if inplace else copy.deepcopy(model)
    kept = []
    for path, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or (only_grouped and conv.groups == 1):
            continue
        try:
            wrapped = make(conv)
            wrapped.layer = layer_name(path)
        except ValueError as err:
            kept.append(f"{layer_name(path)}: {err}")
            continue
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, wrapped)
    return model, kept


# the module each non-native way of --grouped-conv (deeproots.speed.paths.GROUPED_CONV) runs by
CONV_MODULES = {"triton": TritonConv2d, "dispatch": DispatchConv2d}


def use_grouped_conv(model: nn.Module, how: str) -> List[str]:
    """Run ``model``'s grouped convs (in place) by ``how``: ``"triton"`` (the Triton kernels,
    forward and backward) or ``"dispatch"`` (the fastest lowering, measured per layer). The
    parameters and their names stay the same. Returns the layers left to PyTorch and why."""
    if how not in CONV_MODULES:
        raise DeeprootsError(f"grouped convs run by one of {', '.join(CONV_MODULES)} here (of "
                             f"{', '.join(GROUPED_CONV)}); got {how!r}")
    return replace_convs(model, CONV_MODULES[how], inplace=True)[1]
