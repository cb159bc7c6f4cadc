"""Stage 4 of a calibrated conversion: reconstruction in closed form. Each grouped conv is refit
within its groups and each ungrouped 1x1 conv after it as a whole, by ridge least squares
over the calibration pixels, so that its outputs match the dense model's."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ...errors import DeeprootsError
from ...models.layers import conv_layers
from .passes import input_of, norm_after, output_of

__all__ = ["refit_pointwise", "refit_grouped", "constant_home", "place_constant",
           "conv_input", "conv_patches", "MIN_PIXELS_PER_WEIGHT"]

# A 1x1 conv downstream of the grouped ones, which the conversion did not change, is refit
# only where the calibration images give it this many pixels (rows of the fit) for each
# weight it fits: with fewer the fit memorises the calibration images. Measured: deeproots'
# resnet50 at 28x28 px has its last stage at 1x1 px, 1,000 pixels for 2,049 weights a
# filter; refitting it there took the converted model from 0.566 to 0.5025 top-1 on
# Fashion-MNIST (root-2, 2,000 test images), leaving it as it was keeps 0.564. The grouped
# convs and the 1x1 conv that reads each are refit whatever the count (without, the cut
# alone loses more).
MIN_PIXELS_PER_WEIGHT = 8


def _pairs(dense: nn.Module, new: nn.Module, layer: str, batches,
           target_order: Optional[torch.Tensor], targets: Optional[list] = None):
    """For each calibration batch: the input of conv ``layer`` in ``new`` and the output of
    the conv of the same name in ``dense`` (``targets``, when computed already: one per
    batch), its channels in ``target_order`` where ``new``'s are permuted, both models in
    eval mode (their modes restored after)."""
    target_conv, conv = conv_layers(dense)[layer], conv_layers(new)[layer]
    was = new.training, dense.training
    new.eval(), dense.eval()
    try:
        for i, x in enumerate(batches):
            got = input_of(new, x, conv)
            y = targets[i] if targets is not None else output_of(dense, x, target_conv)
            yield got, (y if target_order is None else y[:, target_order])
    finally:
        new.train(was[0]), dense.train(was[1])


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _Conv2dCalls(TorchFunctionMode):
    """Records each 2-d convolution run while it is entered (``F.conv2d`` is
    ``torch.conv2d``), as (input, weight, padding, output). A torch function mode: it sees
    only the thread that entered it, and a conv that calls ``torch.conv2d`` itself too."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.conv2d:
            call = {"padding": 0, **dict(zip(_CONV2D_ARGS, args)), **(kwargs or {})}
            self.calls.append((call["input"], call["weight"], call["padding"], out))
        return out


def conv_input(conv: nn.Conv2d, x: torch.Tensor
               ) -> Optional[Tuple[torch.Tensor, Tuple[int, int]]]:
    """What ``conv`` convolves for its input ``x``: the tensor its ``F.conv2d`` call reads and
    the zero padding that call adds, so that ``F.unfold`` of the two gives the rows of a
    least-squares fit of its weight. A plain conv reads ``x`` padded as its ``padding``
    says; any other (a subclass that pads in its own ``forward``, timm's ``Conv2dSame``; a
    ``padding_mode`` other than zeros; ``padding="same"``) is run once with its conv calls
    watched (:class:`_Conv2dCalls`: this thread's alone, ``torch.conv2d`` called directly
    too). None for a conv whose output is more than that one call with its own weight (a
    gain applied after it, two calls): no fit of its weight alone reproduces it."""
    if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(
            conv.padding, str):
        return x, conv.padding
    with _Conv2dCalls() as watched, torch.no_grad():
        out = conv(x)
    calls = watched.calls
    if len(calls) != 1 or calls[0][1] is not conv.weight or calls[0][3] is not out:
        return None
    inp, _, padding, _ = calls[0]
    if padding == "valid":
        return inp, (0, 0)
    if padding == "same":  # as F.conv2d pads for it: the odd pixel at the end
        sides = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return F.pad(inp, sides), (0, 0)
    return inp, padding


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The patches ``conv`` convolves for its input ``x``, (N, in_channels x kh x kw, L),
    wherever it pads (:func:`conv_input`); None where no fit of its weight gives its
    output."""
    got = conv_input(conv, x)
    if got is None:
        return None
    inp, padding = got
    return F.unfold(inp, conv.kernel_size, conv.dilation, padding, conv.stride)


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    """The rows of ``a`` with a last column of ones: the fit's constant term."""
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float, intercept: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares from normal equations whose last row and column are the constant
    term's (``ridge`` times the mean of the inputs' second moments on the diagonal; the
    constant not shrunk, or left out without ``intercept``). Returns the solution and the
    target energy it explains."""
    d = xtx.shape[0] - 1
    # inputs that are all zero on the calibration images (a group of channels a ReLU keeps
    # dead: an undertrained network has them) still get a positive ridge, and weight 0
    moment = float(xtx.diagonal()[:d].mean())
    moment = moment if moment > 0 and math.isfinite(moment) else 1.0
    reg = ridge * moment * torch.eye(d + 1, dtype=torch.float64)
    reg[d, d] = 0.0  # the constant is not shrunk
    if not intercept:  # no constant term: the ones column left out
        xtx, xty, reg = xtx[:d, :d], xty[:d], reg[:d, :d]
    try:
        solution = torch.linalg.solve(xtx + reg, xty)  # (d [+ 1], out)
    except torch.linalg.LinAlgError:  # singular still (no calibration pixel at all)
        solution = torch.linalg.lstsq(xtx + reg, xty, driver="gelsd").solution
    return solution, 2 * (solution * xty).sum() - (solution * (xtx @ solution)).sum()


def constant_home(model: nn.Module, conv: nn.Conv2d, x) -> Tuple[bool, Optional[nn.Module]]:
    """Whether a fit of ``conv``'s output (in ``model``, run on ``x``) has a constant term,
    and the batch norm that takes it (:func:`place_constant`): a conv with a bias has one
    (None: the bias takes it); one without has one only where its output goes straight into
    a batch norm, whose running mean takes it."""
    if conv.bias is not None:
        return True, None
    norm = norm_after(model, conv, x)
    return norm is not None, norm


def place_constant(conv: nn.Conv2d, norm: Optional[nn.Module], const: torch.Tensor) -> None:
    """A fit's constant term: in ``conv``'s bias, or (a conv without one) taken off the
    running mean of the batch norm ``norm`` that reads its output, so the batch norm's
    output is what it would be with the constant in the conv."""
    if conv.bias is not None:
        conv.bias.copy_(const.to(conv.bias.dtype))
    elif norm is not None and norm.running_mean is not None:
        norm.running_mean.sub_(const.to(norm.running_mean.dtype))


@torch.no_grad()
def refit_pointwise(dense: nn.Module, new: nn.Module, layer: str, batches,
                    ridge: float = 1e-4, target_order: Optional[torch.Tensor] = None,
                    targets: Optional[list] = None,
                    min_pixels_per_weight: float = MIN_PIXELS_PER_WEIGHT) -> Optional[float]:
    """The conv ``layer`` of ``new`` (a 1x1 conv, as after a root module's grouped conv)
    refit in closed form so that, on the calibration batches, its output matches what the
    same layer of ``dense`` gives (its output channels taken in ``target_order`` where
    ``new``'s are permuted): ridge least squares over every pixel (``ridge`` times the mean of
    the inputs' second moments on the diagonal). Returns the fraction of the target's energy
    the fit leaves unexplained, or None where the calibration images give fewer than
    ``min_pixels_per_weight`` pixels a weight (the layer is left as it is).

    A conv with a bias gets the fit's constant term in it. A conv without one keeps none
    (the model must still load into its own class): when its output goes straight into a
    batch norm, the constant is fit and taken off that batch norm's running mean (the
    layers after compute what the fit says; re-estimating the batch norm later would
    remove it the same way); otherwise the fit has no constant term."""
    conv = conv_layers(new)[layer]
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
        raise DeeprootsError(f"{layer}: only an ungrouped 1x1 conv of stride 1 is refit")
    batches = list(batches)
    intercept, norm = constant_home(new, conv, batches[0])
    d = conv.in_channels
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(d + 1, conv.out_channels, dtype=torch.float64)
    yty = torch.zeros((), dtype=torch.float64)
    for x, y in _pairs(dense, new, layer, batches, target_order, targets):
        # a batch's products in float32 (a GEMM), summed over the batches in float64
        xs = _with_ones(x.permute(0, 2, 3, 1).reshape(-1, d).float())
        ys = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).float()
        xtx += (xs.T @ xs).double()
        xty += (xs.T @ ys).double()
        yty += ys.double().pow(2).sum()
    if float(xtx[d, d]) < min_pixels_per_weight * (d + 1):  # xtx[d, d]: the pixels
        return None
    solution, explained = ridge_solve(xtx, xty, ridge, intercept)
    conv.weight.copy_(solution[:d].T.reshape_as(conv.weight).to(conv.weight.dtype))
    if intercept:
        place_constant(conv, norm, solution[d])
    # what the fit leaves unexplained (its constant counts as explained, wherever it went)
    return float((yty - explained) / max(float(yty), 1e-30))


@torch.no_grad()
def refit_grouped(dense: nn.Module, new: nn.Module, layer: str, batches,
                  ridge: float = 1e-4, target_order: Optional[torch.Tensor] = None,
                  targets: Optional[list] = None) -> Optional[float]:
    """The grouped conv ``layer`` of ``new`` refit in closed form, group by group, so that on
    the calibration batches its output matches what the dense conv of the same name in
    ``dense`` gives (output channels in ``target_order`` where ``new``'s are permuted): each
    group's filters are the ridge least-squares fit of the dense filters' outputs from the
    group's own input channels, which takes over as much as those channels can of what the
    off-diagonal blocks contributed. A constant term as :func:`refit_pointwise` has it.
    Returns the energy the fit leaves unexplained as a fraction of the dense filters' output
    energy without their bias (the measure of the cut's ``output_kept``), or None for a conv
    it does not refit (its output is more than one ``F.conv2d`` call with its own weight: a
    gain applied after it; :func:`conv_input`)."""
    target_conv, conv = conv_layers(dense)[layer], conv_layers(new)[layer]
    batches = list(batches)
    intercept, norm = constant_home(new, conv, batches[0])
    g = conv.groups
    cin, cout = conv.in_channels // g, conv.out_channels // g
    d = cin * conv.kernel_size[0] * conv.kernel_size[1]
    xtx = torch.zeros(g, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(g, d + 1, cout, dtype=torch.float64)
    yty = torch.zeros((), dtype=torch.float64)
    yty_c = torch.zeros((), dtype=torch.float64)
    for xs, y in _pairs(dense, new, layer, batches, target_order, targets):
        xs, y = xs.float(), y.float()
        got = conv_input(conv, xs)  # what its F.conv2d call reads, and that call's padding
        if got is None:  # more than that one call (a gain after it): nothing changed yet
            return None
        read, padding = got
        if target_conv.bias is not None:  # the energy the cut's "output kept" counts
            b = target_conv.bias.detach().view(1, -1, 1, 1)
            centred = y - (b if target_order is None else b[:, target_order])
        else:
            centred = y
        yty_c += centred.double().pow(2).sum()
        for k in range(g):  # one group's patches at a time: (N, d, L)
            cols = F.unfold(read[:, k * cin:(k + 1) * cin].contiguous(), conv.kernel_size,
                            conv.dilation, padding, conv.stride)
            a = _with_ones(cols.transpose(1, 2).reshape(-1, d))
            b = y[:, k * cout:(k + 1) * cout].permute(0, 2, 3, 1).reshape(-1, cout)
            xtx[k] += (a.T @ a).double()
            xty[k] += (a.T @ b).double()
        yty += y.double().pow(2).sum()
    explained = torch.zeros((), dtype=torch.float64)
    weight = conv.weight.detach().clone()
    bias = torch.zeros(conv.out_channels, dtype=torch.float64)
    for k in range(g):
        solution, part = ridge_solve(xtx[k], xty[k], ridge, intercept)
        explained += part
        weight[k * cout:(k + 1) * cout] = solution[:d].T.reshape(cout, cin, *conv.kernel_size)
        if intercept:
            bias[k * cout:(k + 1) * cout] = solution[d]
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if intercept:
        place_constant(conv, norm, bias)
    return float((yty - explained) / max(float(yty_c), 1e-30))
