"""The Triton kernels against cuDNN on the real shapes of the paper's root networks: every
distinct grouped conv of each model (forward, input gradient, weight gradient) and every
conv -> ReLU -> 1x1 block (the fused kernel), each compared with PyTorch's own convolutions
(`F.conv2d` and its autograd: cuDNN on a GPU), never with another Triton kernel. One row per
layer, printed as soon as it is measured: the largest difference as a fraction of the
reference's largest value, beside the tolerance the dispatch verifies with
(`deeproots.numerics.tolerance` of the output's dtype), and whether it agrees.

    python benchmarks/gpu_check.py                               # GPU: bf16 and fp32, batch 32
    python benchmarks/gpu_check.py --device cpu --quick          # the interpreter, small

Exit status 1 when any row disagrees or fails, so a session's summary says so.
"""
import argparse
import copy
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from deeproots.models.layers import grouped_convs
from deeproots.numerics import tolerance
from deeproots.models.registry import create_model

MODELS = ("nin-root-8", "resnet50-root-64")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference as a fraction of the reference's largest value."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


def _row(kind, layer, desc, errors, allowed, seconds):
    ok = all(e <= allowed for e in errors.values())
    cells = "  ".join(f"{k} {v:.1e}" for k, v in errors.items())
    print(f"{kind:6s} {layer:28s} {desc:34s} {cells:48s} tol {allowed:.0e}  "
          f"{'agrees' if ok else 'DISAGREES'}  ({seconds:.1f} s)", flush=True)
    return ok


def _example(model, size):
    c, h, w = model.default_input_size
    return torch.zeros(1, c, size or h, size or w)


def check_convs(name, batch, dtype, device, limit, size=None):
    """Each distinct grouped conv of ``name``: Triton forward and both gradients against
    F.conv2d's; returns (rows that agree, rows)."""
    from deeproots.kernels.grouped_conv import GroupedConv2dFunction

    model = create_model(name).eval()
    layers = grouped_convs(model, _example(model, size))
    seen, good, rows = set(), 0, 0
    for layer, conv, shape in layers:
        sig = (shape, conv.out_channels, conv.kernel_size, conv.stride, conv.groups)
        if sig in seen or (limit and rows >= limit):
            continue
        seen.add(sig)
        rows += 1
        started = time.perf_counter()
        desc = (f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x"
                f"{conv.kernel_size[1]}/{conv.stride[0]} g{conv.groups} {shape[1]}x{shape[2]}")
        try:
            c = copy.deepcopy(conv).to(device, dtype)
            x = torch.randn(batch, *shape, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            args = (c.stride, c.padding, c.dilation, c.groups)
            x1, w1 = x.clone().requires_grad_(), c.weight.detach().clone().requires_grad_()
            y = GroupedConv2dFunction.apply(x1, w1, None, *args)
            x2, w2 = x.clone().requires_grad_(), c.weight.detach().clone().requires_grad_()
            ref = F.conv2d(x2, w2, None, *args)
            dy = torch.randn_like(ref)
            got = torch.autograd.grad(y, (x1, w1), dy)
            want = torch.autograd.grad(ref, (x2, w2), dy)
            errors = {"out": _error(y, ref), "dx": _error(got[0], want[0]),
                      "dw": _error(got[1], want[1])}
            good += _row("conv", layer, desc, errors, tolerance(dtype, device.type == "cuda"),
                         time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001  (a row says what failed; the rest go on)
            print(f"conv   {layer:28s} {desc:34s} FAILED {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:120] if str(err) else ''}", flush=True)
    return good, rows


def check_blocks(name, batch, dtype, device, limit, size=None):
    """Each distinct conv -> ReLU -> 1x1 block of ``name`` that fuses: the fused kernel
    against the block's layers in F.conv2d (FusedRootConv.native)."""
    from deeproots.speed.fold import fold_batchnorm
    from deeproots.kernels.fusion import FusedRootConv, fuse_root_blocks

    model = create_model(name).eval()
    gm = fold_batchnorm(model)
    fuse_root_blocks(gm, choose=False)
    blocks = [(n, m) for n, m in gm.named_modules() if isinstance(m, FusedRootConv)]
    shapes = {}

    def keep(name):
        def hook(module, args):  # returns None: the inputs are kept as they are
            shapes.setdefault(name, [a.shape for a in args])
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in blocks]
    with torch.enable_grad():  # shapes only: with a gradient wanted the blocks run apart
        gm(_example(model, size).requires_grad_())
    for h in hooks:
        h.remove()
    seen, good, rows = set(), 0, 0
    for n, block in blocks:
        c, p = block.conv, block.pointwise
        sig = (tuple(shapes[n][0][1:]), c.out_channels, p.out_channels, c.kernel_size,
               c.stride, c.groups, block.residual)
        if sig in seen or (limit and (rows >= limit or c.groups == 1)):
            continue  # (a smoke test leaves out the ungrouped blocks: minutes interpreted)
        seen.add(sig)
        rows += 1
        started = time.perf_counter()
        desc = (f"{c.in_channels}->{c.out_channels} {c.kernel_size[0]}x{c.kernel_size[1]} "
                f"g{c.groups} ->{p.out_channels} {shapes[n][0][2]}x{shapes[n][0][3]}"
                f"{' +res' if block.residual else ''}")
        try:
            b = copy.deepcopy(block).to(device, dtype)
            make = lambda s: torch.randn(batch, *s[1:], device=device, dtype=dtype  # noqa
                                         ).contiguous(memory_format=torch.channels_last)
            x = make(shapes[n][0])
            r = make(shapes[n][1]) if block.residual else None
            with torch.no_grad():
                errors = {"out": _error(b.fused(x, r), b.native(x, r))}
            good += _row("fused", n.removesuffix("_fused"), desc, errors,
                         tolerance(dtype, device.type == "cuda"), time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001
            print(f"fused  {n:28s} {desc:34s} FAILED {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:120] if str(err) else ''}", flush=True)
    return good, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true",
                   help="batch 2, 16x16 images, the first 2 layers and grouped blocks of "
                        "each model: a smoke test under the interpreter")
    args = p.parse_args()
    device = torch.device(args.device)
    import triton

    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"{where}, torch {torch.__version__}, triton {triton.__version__}; errors as a "
          f"fraction of the reference's largest value, against F.conv2d (cuDNN on a GPU)")
    batch, limit, size = (2, 2, 16) if args.quick else (args.batch_size, 0, None)
    total = good = 0
    for name in args.models:
        for key in args.dtypes:
            dtype = DTYPES[key]
            print(f"\n{name}, {key}, batch {batch}, channels-last")
            for check in (check_convs, check_blocks):
                g, n = check(name, batch, dtype, device, limit, size)
                good, total = good + g, total + n
    print(f"\n{good} of {total} rows agree with cuDNN")
    return 0 if good == total else 1


if __name__ == "__main__":
    sys.exit(main())
