"""Looking inside a model as it runs, one way for every part of deeproots: forward hooks held
by a context manager (:func:`hooks`, :func:`capture`), a pass stopped early at the layer it
was run for (:class:`Stop`, :func:`run_until`), and the one torch.fx trace
(:func:`fx_graph`). The costs, the conversion's rule and calibration, the covariance
analysis, the roofline and the per-layer timings all look inside models through these, so a
hook is never left on a model (they are removed on the way out, whatever happens) and a
model's inputs and outputs are never replaced (callbacks' return values are ignored).

    with capture(model, {"conv2a": model.conv2a}) as seen:   # each module's first output
        model(x)
    seen["conv2a"].shape
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

from torch import fx, nn

from .errors import DeeprootsError, first_line

__all__ = ["hooks", "capture", "Stop", "run_until", "fx_graph", "Modules"]

Modules = Union[Mapping[str, nn.Module], Iterable[Tuple[str, nn.Module]]]


class Stop(Exception):
    """Raised by a hook to end a forward pass at the layer it was run for: the rest of the
    network is not computed (:func:`run_until`)."""


def _items(modules: Modules):
    return list(modules.items()) if isinstance(modules, Mapping) else list(modules)


@contextlib.contextmanager
def hooks(modules: Modules, *, before: Optional[Callable] = None,
          after: Optional[Callable] = None) -> Iterator[None]:
    """Within: ``before(name, module, args)`` is called as each of ``modules`` (a mapping
    or pairs of name and module) starts its forward, ``after(name, module, args, output)``
    as it ends; neither can change what the module reads or returns. The hooks are removed
    on the way out."""
    def pre(name):
        def hook(module, args):
            before(name, module, args)  # returns None: the inputs are kept
        return hook

    def post(name):
        def hook(module, args, out):
            after(name, module, args, out)  # returns None: the output is kept
        return hook

    handles = []
    try:
        for name, module in _items(modules):
            if before is not None:
                handles.append(module.register_forward_pre_hook(pre(name)))
            if after is not None:
                handles.append(module.register_forward_hook(post(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture(modules: Modules, what: str = "output", every: bool = False
            ) -> Iterator[Dict[str, object]]:
    """Within: the ``what`` (``"output"``, or ``"input"``: the first positional argument)
    of each of ``modules`` as a forward pass computes it, by name: the first call's, or with
    ``every`` a list of every call's."""
    if what not in ("output", "input"):
        raise DeeprootsError(f"capture takes what='output' or 'input'; got {what!r}")
    seen: Dict[str, object] = {}

    def keep(name, module, args, out=None):
        value = out if what == "output" else args[0]
        if every:
            seen.setdefault(name, []).append(value)
        else:
            seen.setdefault(name, value)

    with hooks(modules, **({"after": keep} if what == "output" else {"before": keep})):
        yield seen


def run_until(forward: Callable[[], object], layer: nn.Module, what: str = "input"):
    """``layer``'s input (or output, ``what="output"``) when ``forward()`` runs a model
    that holds it, the rest of the pass not run. A one-line error if the pass never
    reaches the layer."""
    got = []

    def stop(name, module, args, out=None):
        got.append(out if what == "output" else args[0])
        raise Stop

    with hooks([("layer", layer)], **({"after": stop} if what == "output" else {"before": stop})):
        try:
            forward()
        except Stop:
            pass
    if not got:
        raise DeeprootsError("the forward pass never reached the layer it was run for")
    return got[0]


def fx_graph(model: nn.Module, what: str = "",
             leaf: Optional[Callable[[nn.Module], bool]] = None) -> fx.GraphModule:
    """``model`` traced by torch.fx (its graph and submodules); a one-line
    :class:`DeeprootsError` naming what could not be traced and why, for ``what`` (the
    purpose, e.g. "fold batch norm of"). ``leaf``: modules besides torch.nn's own to keep
    as one call each rather than trace into (a library's batch norm subclass)."""
    try:
        if leaf is None:
            return fx.symbolic_trace(model)

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return leaf(m) or super().is_leaf_module(m, qualname)

        tracer = Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:  # noqa: BLE001  (data-dependent Python, an untraceable op)
        raise DeeprootsError(f"cannot {what or 'trace'} {type(model).__name__}: torch.fx could "
                             f"not trace it ({type(err).__name__}: {first_line(err)})") from err
