"""Building blocks shared by every model family: the conv-bn-relu block, filter grouping of
existing convolutions (root modules), He initialisation and input checks.

A *root module* (Section 3, Fig. 4) is a grouped spatial convolution followed by an ungrouped
1x1 convolution. deeproots builds every network ungrouped and then groups the layers a
schedule names with :func:`apply_groups`, so the same function converts any user's CNN.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import math
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..capture import capture
from ..errors import DeeprootsError, first_line
from ..checks import GroupsError, check_groups_mapping

__all__ = [
    "input_channels",
    "ConvBNAct",
    "GroupsError",
    "apply_groups",
    "regroup",
    "regroup_refusal",
    "expand_groups",
    "block_diagonal_weight",
    "divisors",
    "common_divisors",
    "module_paths",
    "convert",
    "grouped_convs",
    "conv_layers",
    "layer_name",
    "he_init",
    "init_weights",
    "InputCheck",
    "main_logits",
    "example_logits",
]


class ConvBNAct(nn.Module):
    """Convolution, then batch norm (optional), then ReLU (optional).

    Attributes are named ``conv``, ``bn`` and ``act`` (torchvision's ``BasicConv2d``), so a
    layer is addressed by the block's path, e.g. ``"conv2a"`` or ``"inception3a.branch2.1"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: Optional[int] = None,
        groups: int = 1,
        bias: bool = False,
        bn: bool = True,
        bn_affine: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_channels, affine=bn_affine) if bn else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def layer_name(path: str) -> str:
    """The name deeproots uses for a conv at module path ``path``: the path, less a trailing
    ``.conv`` (so the conv inside ``ConvBNAct`` block ``conv2a`` is called ``conv2a``)."""
    return path[: -len(".conv")] if path.endswith(".conv") else path


def conv_layers(model: nn.Module) -> Dict[str, nn.Conv2d]:
    """All ``nn.Conv2d`` modules of ``model`` (subclasses too), keyed by :func:`layer_name`,
    in model order; a conv the model reaches by several paths once, by its first."""
    return {layer_name(p): m for p, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def input_channels(model: nn.Module) -> Optional[int]:
    """The image channels ``model`` reads: its ``in_channels`` where it says (a deeproots
    model), else its first conv's (a model of your own), else None."""
    said = getattr(model, "in_channels", None)
    if isinstance(said, int):
        return said
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def module_paths(model: nn.Module) -> Dict[int, list]:
    """Every path by which ``model`` reaches each of its modules, by ``id``: a module shared
    under several attribute names has several."""
    paths: Dict[int, list] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def grouped_convs(model: nn.Module, example: torch.Tensor) -> list:
    """``(layer, conv, input shape of one image)`` of every grouped conv that a forward pass
    of ``example`` runs, in the order it runs them (each conv once)."""
    grouped = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1]
    with capture(grouped, "input") as inputs, torch.no_grad():
        model(example)
    convs = dict(model.named_modules())
    return [(layer_name(n), convs[n], tuple(x.shape[1:])) for n, x in inputs.items()]


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order (in O(sqrt(n)), for any ``n``)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def common_divisors(a: int, b: int) -> list[int]:
    """The whole numbers that divide both ``a`` and ``b``, increasing."""
    return divisors(math.gcd(a, b))


def _regroup_weight(conv: nn.Conv2d, groups: int) -> torch.Tensor:
    """An uninitialised weight of ``conv`` in ``groups`` groups: [out, in / groups, kh, kw],
    on the conv's device and in its dtype."""
    return torch.empty(conv.out_channels, conv.in_channels // groups, *conv.kernel_size,
                       device=conv.weight.device, dtype=conv.weight.dtype)


def regroup(conv: nn.Conv2d, groups: int, reinit: bool = True) -> nn.Conv2d:
    """``conv`` in ``groups`` filter groups, in place: the same object (so a conv that a
    model reaches by several paths stays one module), of the same class, with its other
    parameters and buffers; only ``groups`` and the weight's shape change, the weight
    He-initialised when ``reinit`` (else uninitialised: load or copy weights into it).
    Returns ``conv``."""
    conv.groups = groups
    conv.weight = nn.Parameter(_regroup_weight(conv, groups),
                               requires_grad=conv.weight.requires_grad)
    if reinit:
        he_init(conv)
    return conv


def _filled(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A CPU float32 copy of ``module`` with every parameter and buffer drawn at random
    (meta modules too): a probe that runs."""
    probe = copy.deepcopy(module)
    if any(t.is_meta for t in list(probe.parameters()) + list(probe.buffers())):
        probe = probe.to_empty(device="cpu")
    probe = probe.to("cpu", torch.float32)
    with torch.no_grad():
        for t in list(probe.parameters()) + list(probe.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
    return probe


def regroup_refusal(conv: nn.Conv2d, groups: int) -> Optional[str]:
    """Why regrouping ``conv`` in place would change what it computes, or None.

    A plain ``nn.Conv2d`` regroups faithfully. A subclass (a conv that pads in ``forward``,
    standardises its weight, scales by a gain, ...) is checked on a probe: regrouped with
    weights W, it must compute what it computes with the block-diagonal expansion of W
    (zeros off the groups' blocks). A weight-standardised conv fails that (its statistics
    are over the whole filter) and is left as it was, with this reason."""
    if type(conv) is nn.Conv2d:
        return None
    before = conv.groups
    if groups % before:
        return (f"{type(conv).__name__} is in {before} groups; regrouping it to {groups} "
                f"cannot be checked to compute the same kind of layer")
    generator = torch.Generator().manual_seed(0)
    dense = _filled(conv, generator)  # the same random parameters in both
    grouped = regroup(copy.deepcopy(dense), groups, reinit=False)
    with torch.no_grad():
        grouped.weight.copy_(torch.randn(grouped.weight.shape, generator=generator))
        dense.weight.copy_(expand_groups(grouped.weight, groups, before))
        k = [(s - 1) * d + 1 for s, d in zip(conv.kernel_size, conv.dilation)]
        x = torch.randn(2, conv.in_channels, max(8, k[0] + 2), max(8, k[1] + 2),
                        generator=generator)
        try:
            want, got = dense(x), grouped(x)
        except Exception as err:  # noqa: BLE001  (the subclass's own forward)
            return (f"{type(conv).__name__} fails in {groups} groups "
                    f"({type(err).__name__}: {first_line(err)})")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(
            got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return (f"{type(conv).__name__} computes something else in {groups} groups than its "
                f"block-diagonal dense form (e.g. it standardises or rescales its weight over "
                f"the whole filter); left as it was")
    return None


def expand_groups(weight: torch.Tensor, groups: int, groups_before: int = 1) -> torch.Tensor:
    """The weight [out, in / groups_before, kh, kw] of a conv in ``groups_before`` groups
    that computes what ``weight`` [out, in / groups, kh, kw] computes in ``groups`` groups
    (``groups`` a multiple of ``groups_before``): zeros outside each output channel's
    group."""
    out, per_group = weight.shape[:2]
    cin = per_group * groups
    per_before = cin // groups_before
    full = weight.new_zeros(out, per_before, *weight.shape[2:])
    for o in range(0, out, out // groups):
        g = o // (out // groups)
        offset = g * per_group - (o // (out // groups_before)) * per_before
        full[o:o + out // groups, offset:offset + per_group] = weight[o:o + out // groups]
    return full


def block_diagonal_weight(weight: torch.Tensor, groups: int, groups_before: int = 1
                          ) -> torch.Tensor:
    """The diagonal blocks of a conv weight [out, in / groups_before, k, k] as the weight of
    the same conv in ``groups`` groups [out, in / groups, k, k]: output channel o keeps its
    weights on the input channels of its own group."""
    out, per_group_before = weight.shape[:2]
    cin = per_group_before * groups_before
    per_group = cin // groups
    rows = []
    for o in range(out):
        g = o // (out // groups)
        start = g * per_group  # input channel where o's new group begins
        g_before = o // (out // groups_before)
        offset = start - g_before * per_group_before  # inside o's old group
        rows.append(weight[o, offset:offset + per_group])
    return torch.stack(rows)


def apply_groups(
    model: nn.Module, groups: Optional[Mapping[str, int]], *, reinit: bool = True
) -> Dict[str, int]:
    """Give the conv layers named in ``groups`` that many filter groups, in place.

    Keys are layer names as :func:`conv_layers` lists them, or shell-style patterns over them
    (``"layer3.*.conv2"``); when several keys match a layer the last one wins. Each matched
    conv is regrouped in place (:func:`regroup`): the same module, of the same class (a
    subclass keeps its own ``forward`` and parameters), shared wherever the model uses it;
    its weight becomes ``[out, in/g, k, k]``, He-initialised when ``reinit``. A value of 1
    ungroups a layer.

    Returns the ``{layer name: groups}`` that was applied. Raises :class:`GroupsError` when
    a key matches no conv layer, a value is not a whole number >= 1, a layer's input or
    output channels are not divisible by its groups, or a conv subclass would compute
    something else regrouped (:func:`regroup_refusal`).
    """
    if not isinstance(model, nn.Module):
        raise GroupsError(f"filter groups go on an nn.Module; got {type(model).__name__} "
                          f"{model!r:.60}")
    if not groups:
        return {}
    check_groups_mapping(groups)
    layers = conv_layers(model)
    names = list(layers)
    for key in groups:
        if not any(fnmatch.fnmatchcase(n, key) for n in names):
            close = difflib.get_close_matches(key, names, n=4, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise GroupsError(
                f"groups key {key!r} matches no conv layer of {type(model).__name__}{hint}. "
                f"Conv layers are named by module path (see deeproots.conv_layers(model))"
            )
    plan: Dict[str, int] = {}
    for name, module in layers.items():
        wanted = None
        for key, value in groups.items():
            if fnmatch.fnmatchcase(name, key):
                wanted = value
        if wanted is None or wanted == module.groups:
            continue
        cin, cout = module.in_channels, module.out_channels
        if cin % wanted or cout % wanted:
            raise GroupsError(
                f"layer {name!r} has {cin} input and {cout} output channels, which "
                f"{wanted} groups do not divide; groups that divide both: "
                f"{', '.join(map(str, common_divisors(cin, cout)))}"
            )
        reason = regroup_refusal(module, wanted)
        if reason:
            raise GroupsError(f"layer {name!r}: {reason}")
        plan[name] = wanted
    for name, wanted in plan.items():  # every layer checked before the first changes
        regroup(layers[name], wanted, reinit)
    return plan


def convert(model: nn.Module, groups: Mapping[str, int]) -> nn.Module:
    """Turn your own CNN into a root network: group the named conv layers, in place.

    ``deeproots.convert(model, {"features.3": 4})`` gives that conv 4 filter groups and a fresh
    He initialisation (the grouped filters are a new architecture to train from scratch, as
    in the paper, not an approximation of the old weights). Returns ``model``.
    """
    apply_groups(model, groups, reinit=True)
    return model


def he_init(module: nn.Module) -> None:
    """He et al. (2015) initialisation, as the paper uses (Sections 4.1, 4.3), for one conv or
    linear layer: normal with std sqrt(2 / fan_in) for convs, zero biases. fan_in counts only
    the channels a filter sees (in / groups), so grouped filters get the right scale."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return  # a meta tensor holds no values (costs are counted without weights)
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0, 0.01)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class InputCheck:
    """Mixin: a clear error for a batch the network cannot take.

    Subclasses set ``in_channels``, ``min_input_size`` (the smallest height and width for
    which every layer still has an output) and, for networks with fixed-size classifiers,
    ``max_input_size``; ``forward`` calls ``self.check_input(x)``.
    """

    in_channels: int = 3
    min_input_size: int = 1
    max_input_size: Optional[int] = None
    default_input_size: Tuple[int, int, int] = (3, 224, 224)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is an (N, in_channels, H, W) batch of a size this
        network takes."""
        if _tracing():  # shapes are symbolic while a graph is traced for export
            return
        name = getattr(self, "name", type(self).__name__)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DeeprootsError(
                f"{name} expects a batch of images shaped (N, {self.in_channels}, H, W); "
                f"got {shape}"
            )
        _, c, h, w = x.shape
        if c != self.in_channels:
            data = getattr(self, "trained_on", None)  # a model loaded from a checkpoint
            if isinstance(data, dict) and data:
                raise DeeprootsError(
                    f"{name} was trained on {self.in_channels}-channel images"
                    + (f" ({data['name']})" if data.get("name") else "")
                    + f"; got {c} channels (shape {tuple(x.shape)}): give it images like "
                    f"those (its pretrained_cfg says how they were prepared)"
                )
            raise DeeprootsError(
                f"{name} was built for {self.in_channels}-channel input; got {c} channels "
                f"(shape {tuple(x.shape)}). Build it with in_channels={c} to accept this."
            )
        lo, hi = self.min_input_size, self.max_input_size
        if min(h, w) < lo or (hi is not None and max(h, w) > hi):
            accepted = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise DeeprootsError(
                f"input {h}x{w} does not fit {name}: height and width must be {accepted} "
                f"pixels (default {self.default_input_size[1]}x{self.default_input_size[2]})"
                + (f". {self.input_size_hint}" if getattr(self, "input_size_hint", "") else "")
            )


def _tracing() -> bool:
    return (torch.jit.is_tracing() or is_fx_symbolic_tracing()
            or torch.onnx.is_in_onnx_export())


def main_logits(out):
    """The class scores of a model's output: GoogLeNet in training returns
    ``(logits, aux2, aux1)``; every other model returns the logits."""
    return out[0] if isinstance(out, tuple) else out


def example_output(model: nn.Module, x: torch.Tensor, name: Optional[str] = None):
    """What ``model`` returns for the batch ``x`` (eval mode, no gradients; the model is put
    back in the mode it was in). A one-line DeeprootsError for a model that cannot run this
    batch (a forward that takes other inputs, a shape it refuses)."""
    name = name or getattr(model, "name", type(model).__name__)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except DeeprootsError:
        raise
    except Exception as err:  # the user's model: say which input it refused, and why
        raise DeeprootsError(f"{name} cannot run a batch of shape {tuple(x.shape)} "
                             f"({type(err).__name__}: {first_line(err)}); deeproots feeds a "
                             f"model one tensor of images (N, C, H, W)") from None
    finally:
        model.train(was_training)
    return out


def example_logits(model: nn.Module, x: torch.Tensor, name: Optional[str] = None
                   ) -> torch.Tensor:
    """The class scores ``model`` gives for the batch ``x`` (:func:`example_output`). A
    one-line DeeprootsError for a model that cannot run this batch or that does not return
    class scores (a tensor, or GoogLeNet's tuple of them)."""
    name = name or getattr(model, "name", type(model).__name__)
    out = example_output(model, x, name)
    logits = main_logits(out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = (f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
               else f"a {type(out).__name__}")
        raise DeeprootsError(f"{name} returns {got} for a batch of shape {tuple(x.shape)}; "
                             f"deeproots takes a model that returns class scores, a tensor "
                             f"(N, classes) (or a tuple whose first item is one)")
    return logits


def init_weights(modules: Iterable[nn.Module]) -> None:
    """He-initialise every conv, linear and batch-norm layer in ``modules``."""
    for m in modules:
        he_init(m)
