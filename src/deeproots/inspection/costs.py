"""Exact cost accounting for any ``nn.Module``: multiply-adds and parameters per layer.

Multiply-adds come from PyTorch's own operator counter (``torch.utils.flop_counter``), which
sees every convolution and matrix multiply by its real shapes, grouped convs included; a
multiply-add is half of the FLOPs it reports. The paper's "FLOPS" are multiply-adds (Section
4.3.1), and count convolutions and fully connected layers only: bias additions, batch norm,
pooling and activations are not counted here either.

Parameters follow the paper too: ``params`` counts the weights and biases of conv and linear
layers; batch-norm parameters are reported apart (``bn_params``).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..capture import hooks
from ..errors import DeeprootsError, first_line
from ..models.layers import layer_name
from ..text import format_table

__all__ = ["profile", "Profile", "LayerCost", "parse_input_size", "format_table"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
_COUNTED = _CONVS + (nn.Linear,)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class LayerCost:
    """Cost of one conv or linear layer for one image.

    ``macs`` are multiply-adds; ``params`` the layer's weights and biases; shapes exclude the
    batch dimension; ``calls`` is 0 for a layer the forward pass did not run (e.g. an
    auxiliary head in eval mode)."""

    name: str
    type: str
    kernel: str
    groups: int
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    macs: int
    params: int
    calls: int


@dataclass
class Profile:
    """Costs of a model for one image of ``input_size`` (C, H, W).

    ``macs``: multiply-adds of all counted operators (``other_macs``: those outside every
    row); ``params``: conv and linear weights and biases (the paper's convention), and the
    parameters of modules whose own ``forward`` computes (``functional_params``, e.g. the
    weight of an ``F.conv2d(x, self.w)``); ``conv_weight_params``, ``conv_bias_params``,
    ``linear_params`` split the rest of it; ``bn_params`` and ``other_params`` (a conv's
    gain, a class token, ...) are the rest of ``total_params``, every parameter once."""

    model: str
    input_size: Tuple[int, int, int]
    training: bool
    layers: List[LayerCost] = field(default_factory=list)
    macs: int = 0
    other_macs: int = 0
    params: int = 0
    conv_weight_params: int = 0
    conv_bias_params: int = 0
    linear_params: int = 0
    functional_params: int = 0
    bn_params: int = 0
    other_params: int = 0

    @property
    def total_params(self) -> int:
        """Every parameter of the model, batch norm included."""
        return self.params + self.bn_params + self.other_params

    def activation_bytes(self, training: bool = False, value_bytes: int = 4) -> int:
        """About how much memory one image's activations take, in bytes: to train, every
        conv and linear output kept four times over (its value, its gradient, a batch norm's
        and an activation's copies); for inference, the image and three copies of the
        largest output (a layer's input and output are alive together: nin's fold path
        peaks at about twice its largest output per image, in a check by hand on the CPU)."""
        outputs = [math.prod(layer.output_shape) * layer.calls for layer in self.layers
                   if layer.output_shape]
        if training:
            return 4 * value_bytes * sum(outputs)
        return value_bytes * (math.prod(self.input_size) + 3 * max(outputs, default=0))

    def to_dict(self) -> dict:
        """A JSON-ready dict: totals, and per-layer rows under ``"layers"``."""
        d = asdict(self)
        d["total_params"] = self.total_params
        return d

    def to_json(self, **kwargs) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, per_layer: bool = True) -> str:
        """A readable table: one row per layer (when ``per_layer``), then the totals."""
        lines = []
        if per_layer:
            head = ("layer", "type", "kernel", "groups", "output", "MACs", "params")
            rows = [
                (
                    layer.name,
                    layer.type,
                    layer.kernel,
                    str(layer.groups),
                    "x".join(map(str, layer.output_shape)) if layer.calls else "(not run)",
                    f"{layer.macs:,}",
                    f"{layer.params:,}",
                )
                for layer in self.layers
            ]
            lines.append(format_table(head, rows, align="lllrlrr"))
            lines.append("")
        c, h, w = self.input_size
        mode = "training graph" if self.training else "inference"
        lines.append(f"{self.model} on {c}x{h}x{w} ({mode}), per image:")
        lines.append(f"  multiply-adds  {self.macs:>15,}  ({self.macs / 1e9:.3f} G)")
        if self.other_macs:
            lines.append(f"    outside conv/linear layers {self.other_macs:,}")
        lines.append(f"  params         {self.params:>15,}  ({self.params / 1e6:.3f} M)"
                     "  conv + linear weights and biases")
        lines.append(f"    conv weights {self.conv_weight_params:,}, conv biases "
                     f"{self.conv_bias_params:,}, linear {self.linear_params:,}"
                     + (f", functional {self.functional_params:,}"
                        if self.functional_params else ""))
        lines.append(f"  batch norm     {self.bn_params:>15,}  (not in params)")
        if self.other_params:
            lines.append(f"  other          {self.other_params:>15,}  (not in params)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def parse_input_size(
    input_size: Union[None, int, Sequence[int]], model: Optional[nn.Module] = None
) -> Tuple[int, int, int]:
    """Normalise ``input_size`` to (C, H, W).

    Accepts an int (square, channels from the model), (H, W), or (C, H, W); ``None`` takes the
    model's ``default_input_size``."""
    channels = getattr(model, "in_channels", 3) if model is not None else 3
    if input_size is None:
        default = getattr(model, "default_input_size", None)
        if default is None:
            raise DeeprootsError(
                f"{type(model).__name__} has no default input size; pass input_size, "
                f"e.g. (3, 224, 224)"
            )
        return tuple(default)  # type: ignore[return-value]
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        size: Tuple[int, ...] = (channels, input_size, input_size)
    else:
        try:
            size = tuple(input_size)
        except TypeError:
            size = ()
        if len(size) == 2:
            size = (channels, *size)
    if len(size) != 3 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise DeeprootsError(
            f"input_size must be a positive int, (H, W) or (C, H, W); got {input_size!r}"
        )
    return size  # type: ignore[return-value]


def _kernel(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "fc"
    if isinstance(module, _CONVS):
        return "x".join(map(str, module.kernel_size))
    return "-"


# Multiply-adds of the fused attention operators the counter does not know: PyTorch's
# inference fast paths of nn.MultiheadAttention and nn.TransformerEncoderLayer, and SDPA's
# CPU kernel. Each returns FLOPs (2 x multiply-adds), from the shapes, as the counter's own
# rules do, so that a model counts the same on a CPU as on the meta device.
def _mha_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs):
    """q, k, v projections, QK^T, the weighted sum of V, and the output projection."""
    *batch, length, e = query
    source = key[-2]
    n = math.prod(batch)
    return 2 * n * (length * e * e + 2 * source * e * e + 2 * length * source * e
                    + length * e * e)


def _encoder_layer_flops(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                         proj_bias, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1,
                         norm_weight_2, norm_bias_2, ffn_weight_1, *args, out_shape=None,
                         **kwargs):
    """Self-attention as :func:`_mha_flops`, then the feed-forward block's two linears."""
    *batch, length, e = src
    hidden = ffn_weight_1[0]
    n = math.prod(batch)
    return _mha_flops(src, src, src, embed_dim, num_heads) + 2 * n * length * 2 * e * hidden


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


_ATTENTION_RULES = {
    "_native_multi_head_attention": _mha_flops,
    "_transformer_encoder_layer_fwd": _encoder_layer_flops,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flops,
}


def _counter() -> FlopCounterMode:
    rules = {getattr(torch.ops.aten, name): fn for name, fn in _ATTENTION_RULES.items()
             if hasattr(torch.ops.aten, name)}
    return FlopCounterMode(display=False, custom_mapping=rules)


def profile(
    model: nn.Module,
    input_size: Union[None, int, Sequence[int]] = None,
    *,
    training: bool = False,
) -> Profile:
    """Count the multiply-adds and parameters of ``model`` for one image.

    Args:
        model: any ``nn.Module`` that takes a batch of images.
        input_size: (C, H, W), (H, W) or an int; default the model's ``default_input_size``.
        training: count the training graph (e.g. GoogLeNet's auxiliary classifiers, which the
            paper's Table 6 includes). Runs on a copy, so batch-norm statistics are untouched.

    Returns:
        A :class:`Profile` with per-layer rows and totals. Every multiply-add and every
        parameter is in a row or in a named remainder: a row per conv (transposed convs
        too) and linear layer, and per module whose own ``forward`` computes (a
        ``F.conv2d(x, self.w)``, say); ``total_params`` is every parameter of the model.
        The same on the meta device and on a CPU (build the model under
        ``with torch.device("meta"):`` to count without computing): attention's fused
        fast paths are counted by rules of their own.
    """
    if not isinstance(model, nn.Module):
        raise DeeprootsError(f"profile() takes an nn.Module; got {type(model).__name__}")
    size = parse_input_size(input_size, model)
    name = getattr(model, "name", type(model).__name__)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    batch = 2 if training else 1  # batch norm in training mode needs more than one value
    runner = copy.deepcopy(model) if training else model
    was_training = runner.training
    runner.train(training)

    shapes: Dict[str, Tuple[tuple, tuple, int]] = {}

    def record(path, module, args, out):
        _, _, calls = shapes.get(path, ((), (), 0))
        out0 = out[0] if isinstance(out, tuple) else out
        shapes[path] = (tuple(args[0].shape[1:]), tuple(out0.shape[1:]), calls + 1)

    counted = [(p, m) for p, m in runner.named_modules() if isinstance(m, _COUNTED)]
    counter = _counter()
    x = torch.zeros((batch, *size), device=device, dtype=dtype)
    try:
        with hooks(counted, after=record), torch.no_grad(), counter:
            runner(x)
    except DeeprootsError:
        raise
    except Exception as err:  # the model cannot run this input: say which and why
        raise DeeprootsError(f"could not run {name} on a {size[0]}x{size[1]}x{size[2]} input "
                             f"({type(err).__name__}: {first_line(err)})") from err
    finally:
        runner.train(was_training)
    return _account(runner, counter, shapes, name, size, training, batch)


def _own_ops(counts, root: str, path: str, children) -> Dict[str, int]:
    """FLOPs by operator that ``path``'s own forward computes: its subtree's less its
    children's."""
    key = lambda p: root if not p else f"{root}.{p}"  # noqa: E731
    own = {}
    for op, n in counts.get(key(path), {}).items():
        below = sum(counts.get(key(f"{path}.{c}" if path else c), {}).get(op, 0)
                    for c in children)
        if n - below > 0:
            own[str(op).split(".")[-1]] = n - below
    return own


def _account(runner, counter, shapes, name, size, training, batch) -> Profile:
    """The rows and totals: each counted layer's multiply-adds (its whole subtree), each
    other module's own (its subtree less its children's, where its ``forward`` computes),
    and every parameter once, by the module that owns it."""
    counts = counter.get_flop_counts()
    root = type(runner).__name__

    def flops(path: str) -> int:
        return sum(counts.get(root if not path else f"{root}.{path}", {}).values())

    result = Profile(model=name, input_size=size, training=training)
    seen: set = set()  # parameters counted already (tied weights count once)
    counted_paths = []
    modules = dict(runner.named_modules())
    for path, module in modules.items():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        own_params = sum(p.numel() for p in own)
        # a module inside a counted layer: its costs are the layer's
        inside_layer = any(path.startswith(c + ".") if c else path != ""
                           for c in counted_paths)
        if isinstance(module, _COUNTED) and not inside_layer:
            counted_paths.append(path)
            in_shape, out_shape, calls = shapes.get(path, ((), (), 0))
            result.layers.append(LayerCost(
                name=layer_name(path) or f"({type(module).__name__})", type=type(module).__name__,
                kernel=_kernel(module), groups=getattr(module, "groups", 1),
                input_shape=in_shape, output_shape=out_shape, macs=flops(path) // 2 // batch,
                params=own_params, calls=calls))
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            core = sum(t.numel() for t in (weight, bias) if isinstance(t, nn.Parameter)
                       and any(t is p for p in own))
            if isinstance(module, nn.Linear):
                result.linear_params += core
            else:
                result.conv_weight_params += weight.numel() if any(
                    weight is p for p in own) else 0
                result.conv_bias_params += core - (weight.numel() if any(
                    weight is p for p in own) else 0)
            result.other_params += own_params - core  # a conv's gain, say
            continue
        if inside_layer:
            result.other_params += own_params
            continue
        own_ops = _own_ops(counts, root, path, [c for c, _ in module.named_children()])
        if own_ops:  # its own forward computes: F.conv2d(x, self.w), attention, ...
            result.layers.append(LayerCost(
                name=layer_name(path) or f"({type(module).__name__})",
                type=f"{type(module).__name__} ({', '.join(sorted(own_ops))})",
                kernel=_kernel(module), groups=getattr(module, "groups", 1), input_shape=(),
                output_shape=(), macs=sum(own_ops.values()) // 2 // batch, params=own_params,
                calls=1))
            result.functional_params += own_params
        elif isinstance(module, _NORMS):
            result.bn_params += own_params
        else:
            result.other_params += own_params
    result.params = (result.conv_weight_params + result.conv_bias_params
                     + result.linear_params + result.functional_params)
    result.macs = counter.get_total_flops() // 2 // batch
    result.other_macs = result.macs - sum(layer.macs for layer in result.layers)
    return result
