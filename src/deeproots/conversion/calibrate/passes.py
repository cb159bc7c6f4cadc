"""The calibration images and the passes a calibrated conversion makes over them: batches from
a tensor or a loader, each conv's input energy, the forward order of its layers, passes
stopped at the layer a stage is fitting (:func:`deeproots.capture.run_until`), and passes
that start at the first grouped conv, the trained layers before it computed once
(:class:`Prefixed`); and what the trained model computes kept for several conversions of it
(:class:`DensePasses`)."""
from __future__ import annotations

import copy
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from ...capture import Stop, capture, fx_graph, hooks, run_until
from ...errors import DeeprootsError
from ...layout import channels_last
from ...models.layers import conv_layers, layer_name

__all__ = ["calibration_batches", "activation_energy", "Prefixed", "prefixed", "forward",
           "input_of", "output_of", "norm_after", "forward_order", "reached_convs",
           "first_reached", "norms_before", "sampled_inputs", "dense_outputs", "DensePasses",
           "frozen_batch_norm", "is_batch_norm", "norm_leaves"]

_NORM_BUFFERS = {"weight", "bias", "running_mean", "running_var"}
_NORM_STATE = _NORM_BUFFERS | {"num_batches_tracked"}


def _norm_subclass(m: nn.Module) -> bool:
    """A batch norm subclass to keep whole in a trace (timm's ``BatchNormAct2d``: the norm,
    then dropout and an activation, in its own forward, which torch.fx would trace into a
    functional batch norm that is no layer): one whose state is a batch norm's alone and
    whose submodules hold none (an activation, a dropout). It acts on each channel alone,
    and a permutation of its channels is one of its weights and statistics."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    own = {n for n, _ in m.named_parameters(recurse=False)} | {
        n for n, _ in m.named_buffers(recurse=False)}
    children = any(True for c in m.children() for _ in (*c.parameters(), *c.buffers()))
    return own <= _NORM_STATE and not children


def norm_leaves(model: nn.Module) -> Callable[[nn.Module], bool]:
    """Which modules of ``model`` a torch.fx trace keeps whole (``fx_graph(leaf=)``), so that
    each is one layer of the graph, as a batch norm is: a batch norm subclass that computes
    in its own forward (:func:`_norm_subclass`) and a frozen batch norm
    (:func:`frozen_batch_norm`), found before the trace (telling one runs it on a probe)."""
    frozen = {id(m) for m in model.modules() if frozen_batch_norm(m)}
    return lambda m: _norm_subclass(m) or id(m) in frozen


_FROZEN: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def frozen_batch_norm(m: nn.Module) -> bool:
    """A batch norm that is no ``_BatchNorm`` (torchvision's and timm's
    ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``, as detection backbones use): its
    state is a batch norm's four buffers, one value a channel, its submodules hold none (an
    activation, a dropout), and it acts on each channel alone, checked on a probe: its
    channels and its buffers permuted together permute its output."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or any(True for _ in m.parameters()):
        return False
    state = dict(m.named_buffers(recurse=False))
    if set(state) != _NORM_BUFFERS or any(True for c in m.children() for _ in c.buffers()):
        return False
    shapes = {t.shape for t in state.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] < 2:
        return False
    if m not in _FROZEN:  # the probe runs once a module
        _FROZEN[m] = _acts_per_channel(m, state)
    return _FROZEN[m]


def _acts_per_channel(m: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
    """Whether ``m``'s channels and its per-channel buffers ``state``, permuted together
    on a probe, permute its output."""
    t = state["weight"]
    if not t.is_floating_point() or t.is_meta:  # nothing to run a probe on
        return False
    probe = torch.Generator().manual_seed(0)
    x = torch.randn(2, t.numel(), 3, 3, generator=probe).to(t)
    perm = torch.randperm(t.numel(), generator=probe).to(t.device)
    # copies in eval mode (a dropout child off): the module itself is not run, its hooks
    # not called
    kept, permuted = copy.deepcopy(m).eval(), copy.deepcopy(m).eval()
    with torch.no_grad():
        for buf in permuted.buffers(recurse=False):
            buf.copy_(buf[perm])
        try:
            want, got = kept.forward(x)[:, perm], permuted.forward(x[:, perm])
        except Exception:  # any module that cannot run a probe: not one to fold through
            return False
    return isinstance(got, torch.Tensor) and got.shape == x.shape and torch.allclose(
        got, want, rtol=1e-4, atol=1e-5)


def is_batch_norm(m: nn.Module) -> bool:
    """A batch norm: torch's, or a frozen one (:func:`frozen_batch_norm`)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or frozen_batch_norm(m)


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


def activation_energy(model: nn.Module, paths: Sequence[str], batches
                      ) -> Dict[str, torch.Tensor]:
    """Each named conv's input on the calibration batches: per channel, the mean square
    (its activation energy)."""
    convs = conv_layers(model)
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def record(name, module, args, out):
        x = args[0].detach()
        sums[name] = sums.get(name, 0) + x.pow(2).sum((0, 2, 3)).double()
        counts[name] = counts.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]

    with hooks({p: convs[p] for p in paths}, after=record), torch.no_grad():
        for x in batches:
            model(x)
    return {p: (sums[p] / counts[p]).float() for p in paths if p in sums}


class Prefixed:
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
            raise Stop
        return super().run_node(node)


def prefixed(models: Sequence[nn.Module], first: str, batches) -> Optional[list]:
    """The batches as :class:`Prefixed` ones for ``models`` (traced alike), the prefix
    being every node before conv ``first``; None when a model cannot be traced."""
    out = [Prefixed(x) for x in batches]
    for model in models:
        try:  # the norms whole: a hook on one (norm_after) sees it run
            gm = fx_graph(model, leaf=norm_leaves(model))
        except DeeprootsError:  # data-dependent Python: full passes instead
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
                except Stop:
                    pass
                env = {n: None for n in prefix}
                env.update({n: runner.env[n] for n in live})
                item.envs[id(model)] = (gm, env)
    return out


def forward(model: nn.Module, x):
    """``model`` on a calibration batch (a :class:`Prefixed` one runs from its prefix)."""
    return x.run(model) if isinstance(x, Prefixed) else model(x)


def input_of(model: nn.Module, x, layer: nn.Module) -> torch.Tensor:
    """``layer``'s input when ``model`` runs ``x``, the rest of the pass not run: a
    calibration pass costs only the layers up to the one it fits."""
    return run_until(lambda: forward(model, x), layer, "input")


def output_of(model: nn.Module, x, layer: nn.Module) -> torch.Tensor:
    """``layer``'s output when ``model`` runs ``x``, the rest of the pass not run."""
    return run_until(lambda: forward(model, x), layer, "output")


def norm_after(model: nn.Module, layer: nn.Module, x) -> Optional[nn.Module]:
    """The batch norm (a frozen one too) that reads the output of ``layer`` directly when
    ``model`` runs ``x`` (the pass stops at the first batch norm after it), or None: a
    constant the layer adds is then one that batch norm's running mean can take."""
    out: list = []
    found: List[Optional[nn.Module]] = []

    def norm(name, module, args):
        if out:
            found.append(module if args[0] is out[-1] else None)
            raise Stop

    norms = [(str(i), m) for i, m in enumerate(model.modules()) if is_batch_norm(m)]
    was = model.training
    model.eval()  # no running statistics change
    try:
        with hooks([("layer", layer)], after=lambda *a: out.append(a[3])), \
                hooks(norms, before=norm), torch.no_grad():
            forward(model, x)
    except Stop:
        pass
    finally:
        model.train(was)
    return found[-1] if found else None


def forward_order(model, x) -> List[nn.Module]:
    """The convs and batch norms a forward pass of ``x`` reaches, in order (once each)."""
    seen: List[nn.Module] = []
    watched = [(str(i), m) for i, m in enumerate(model.modules())
               if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))]

    def reached(name, module, args, out):
        if not any(module is s for s in seen):
            seen.append(module)

    with hooks(watched, after=reached), torch.no_grad():
        forward(model, x)
    return seen


def reached_convs(model, x) -> List[str]:
    """The names of the convs a forward pass of ``x`` reaches, in order."""
    names = {id(c): n for n, c in conv_layers(model).items()}
    return [names[id(m)] for m in forward_order(model, x) if id(m) in names]


def first_reached(model, order, x) -> str:
    """Which of the convs named in ``order`` a forward pass of ``x`` reaches first."""
    convs = reached_convs(model, x)
    return min((n for n in order if n in convs), key=convs.index)


def norms_before(model, first: str, x) -> List[nn.Module]:
    """The batch norms a forward pass reaches before conv ``first``: trained, kept."""
    target = conv_layers(model)[first]
    out = []
    for m in forward_order(model, x):
        if m is target:
            break
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(m)
    return out


def sampled_inputs(model, paths, x) -> Dict[str, torch.Tensor]:
    """Each named conv's input on one calibration batch (for the output energy kept)."""
    convs = conv_layers(model)
    with capture({p: convs[p] for p in paths}, "input") as got, torch.no_grad():
        model(x)
    return {p: t.detach() for p, t in got.items()}


def output_pixels(model: nn.Module, paths: Sequence[str], x) -> Dict[str, int]:
    """Each named conv's output pixels an image (H x W) when ``model`` runs the calibration
    batch ``x``: the rows each image gives its fit."""
    convs = conv_layers(model)
    with capture({p: convs[p] for p in paths}) as got, torch.no_grad():
        forward(model, x)
    return {p: t.shape[2] * t.shape[3] for p, t in got.items()}


CACHE_BYTES = 2 << 30  # the dense targets kept from one pass, at most (else one pass each)


def dense_outputs(model: nn.Module, paths: Sequence[str], batches
                  ) -> Optional[Dict[str, List[torch.Tensor]]]:
    """The outputs of the named convs of ``model`` on every calibration batch, from one pass
    (the refits' targets, computed once instead of once a refit); None when they would take
    more than :data:`CACHE_BYTES`."""
    if not paths or not batches:
        return {}
    convs = conv_layers(model)
    with capture({p: convs[p] for p in paths}) as first, torch.no_grad():
        forward(model, batches[0])
    per_batch = sum(t.numel() * t.element_size() for t in first.values())
    if per_batch * len(batches) > CACHE_BYTES:
        return None
    out: Dict[str, List[torch.Tensor]] = {p: [first[p]] for p in paths}
    for x in batches[1:]:
        with capture({p: convs[p] for p in paths}) as seen, torch.no_grad():
            forward(model, x)
        for p in paths:
            out[p].append(seen[p])
    return out


class DensePasses:
    """The trained model's half of the calibration passes, kept for several calibrated
    conversions of one model on one set of calibration images (a budgeted conversion checks
    layers converted alone, then converts its candidates; a frontier converts at every
    budget): the model's channels-last copy (``dense``, never changed) and the batches, each
    conv's input energy, the values before each first grouped conv (:class:`Prefixed`), and
    each refit target's outputs, each computed the first time a conversion asks for it and
    kept while they fit in :data:`CACHE_BYTES` in all (past it, computed for that conversion
    alone, as without them). Pass it as the calibration data (``rootify(model, schedule,
    calibration=passes)``, ``calibrate(model, changes, passes)``);
    it answers for ``model`` alone, as it was when they were made."""

    def __init__(self, model: nn.Module, data):
        self.source = model
        self._state = _versions(model)
        self.dense = channels_last(copy.deepcopy(model).eval())
        self._batches = [channels_last(b) for b in calibration_batches(data)]
        self._energy: Dict[str, torch.Tensor] = {}
        self._prefix: Dict[str, list] = {}  # first grouped conv -> each batch's dense values
        self._outputs: Dict[str, List[torch.Tensor]] = {}
        self._bytes = 0

    def batches(self) -> List[torch.Tensor]:
        """The calibration batches (channels-last)."""
        return self._batches

    def check(self, model: nn.Module) -> None:
        """A ValueError unless these are ``model``'s passes, and its weights and buffers have
        not changed in place since (a training step, ``load_state_dict``)."""
        if model is not self.source:
            raise ValueError("these DensePasses were made for another model: make one for "
                             "each model converted")
        if _versions(model) != self._state:
            raise ValueError("the model's weights changed since its DensePasses were made: "
                             "make them again")

    def _keep(self, size: int) -> bool:
        if self._bytes + size > CACHE_BYTES:
            return False
        self._bytes += size
        return True

    def energy(self, paths: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Each named conv's input energy (:func:`activation_energy`) in the trained model."""
        todo = [p for p in paths if p not in self._energy]
        if todo:
            self._energy.update(activation_energy(self.dense, todo, self._batches))
        return {p: self._energy[p] for p in paths if p in self._energy}

    def prefixed(self, new: nn.Module, first: str) -> Optional[list]:
        """The batches as :class:`Prefixed` ones for :attr:`dense` and ``new`` (a copy being
        converted), starting at conv ``first``: the trained model's prefix computed once for
        every conversion that groups ``first`` first; None when a model cannot be traced."""
        envs = self._prefix.get(first)
        if envs is None:
            mine = prefixed([self.dense], first, self._batches)
            if mine is None:
                return None
            envs = [item.envs[id(self.dense)] for item in mine]
            if self._keep(sum(_nbytes(v) for _, env in envs for v in env.values())):
                self._prefix[first] = envs
        out = prefixed([new], first, self._batches)
        if out is None:
            return None
        for item, env in zip(out, envs):
            item.envs[id(self.dense)] = env
        return out

    def outputs(self, paths: Sequence[str], batches) -> Optional[Dict[str, List[torch.Tensor]]]:
        """The trained model's outputs of the named convs on every batch (:func:`dense_outputs`,
        ``batches`` these passes' own, prefixed or not), those asked before kept; None when
        the new ones would take more than :data:`CACHE_BYTES` (one pass each then)."""
        todo = [p for p in paths if p not in self._outputs]
        got: Dict[str, List[torch.Tensor]] = {}
        if todo:
            got = dense_outputs(self.dense, todo, batches)
            if got is None:
                return None
            if self._keep(sum(_nbytes(t) for ts in got.values() for t in ts)):
                self._outputs.update(got)
        return {p: self._outputs[p] if p in self._outputs else got[p] for p in paths}


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _versions(model: nn.Module) -> Tuple[int, ...]:
    """Each weight's and buffer's in-place version counter: any in-place change moves one."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))
