"""The GPU targets of the grouped-convolution issue, in one command: whole models (root over
orig, each path, beside the roofline bound), every grouped conv layer (each lowering:
cuDNN, deeproots' Triton kernel, block-diagonal dense, split per group, inductor
max-autotune, against its roofline bound), and every root block (grouped conv + ReLU + 1x1
conv [+ residual + ReLU]) unfused against the fused kernel, each beside its bound; then
every variant of the paper's Tables 4, 6 and 8 against its orig. Prints
the device; every step is timed with CUDA events after a synchronised warm-up, the models
of a pair side by side in one process.

    python benchmarks/gpu_targets.py                        # H100/H200: bf16, batch 256
    python benchmarks/gpu_targets.py --device cpu --dtype float32 --batch-size 4 --quick
"""
import argparse
import time

import torch
from torch.nn import functional as F

from deeproots.speed.bench import bench_models, bench_paper, format_bench
from deeproots.kernels.modules import _time_ms, lowerings
from deeproots.models.layers import grouped_convs
from deeproots.models.registry import create_model
from deeproots.speed.roofline import machine, roofline

TABLES = {"resnet50": 4, "googlenet": 6, "nin": 8}  # the paper's timed tables
PAIRS = [("resnet50", "resnet50-root-64", 1.15), ("googlenet", "googlenet-root-16", 1.15),
         ("nin", "nin-root-8", 1.25)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def grouped_layers(name: str):
    """(layer, conv, input shape of one image) of every grouped conv, in model order."""
    model = create_model(name).eval()
    return grouped_convs(model, torch.zeros(1, *model.default_input_size))


def layer_table(name, batch, dtype, device, hw, repeats, inductor):
    peak, bw = hw.peak_flops[dtype], hw.bandwidth
    size = torch.finfo(DTYPES[dtype]).bits // 8
    print(f"\n{name}: grouped conv layers, batch {batch}, {dtype}, channels-last "
          f"(us per batch; TFLOP/s; fraction of the roofline bound)")
    head = f"{'layer':26s} {'shape':28s} {'bound':>7s}"
    lows = ("native", "triton", "dense", "split") + (("inductor",) if inductor else ())
    print(head + "".join(f" {k:>16s}" for k in lows) + "  best   within 2x")
    compile_s = []
    seen = set()
    for layer, conv, shape in grouped_layers(name):
        key = (tuple(shape), conv.out_channels, conv.kernel_size, conv.stride, conv.groups)
        if key in seen:
            continue
        seen.add(key)
        try:
            _layer_row(layer, conv, shape, batch, dtype, device, peak, bw, size, lows, repeats,
                       compile_s)
        except Exception as err:  # noqa: BLE001  (a row says what failed; the rest go on)
            print(f"{layer:26s} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                  flush=True)
    if compile_s:
        print(f"inductor max-autotune: {sum(compile_s):.0f} s compiling and tuning "
              f"{len(compile_s)} shapes")


def _layer_row(layer, conv, shape, batch, dtype, device, peak, bw, size, lows, repeats,
               compile_s):
    conv = conv.to(device, DTYPES[dtype])
    x = torch.randn(batch, *shape, device=device, dtype=DTYPES[dtype]).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
    macs = y.numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * \
        conv.kernel_size[1]
    moved = (x.numel() + y.numel() + conv.weight.numel()) * size
    bound = max(2 * macs / peak, moved / bw)
    ms = {}
    with torch.no_grad():
        for k, fn in lowerings(conv, x.device).items():
            if k not in lows:
                continue
            if k == "inductor":  # the first call compiles and autotunes
                start = time.perf_counter()
                fn(conv, x, conv.weight, conv.bias)
                compile_s.append(time.perf_counter() - start)
            ms[k] = _time_ms(lambda fn=fn: fn(conv, x, conv.weight, conv.bias), x.is_cuda,
                             repeats=repeats)
    cells = "".join(
        f" {1e3 * ms[k]:7.0f} {2 * macs / ms[k] / 1e9:4.0f}T{1e3 * bound / ms[k]:4.0%}"
        if k in ms else f" {'-':>16s}" for k in lows)
    best = min(ms, key=ms.get)
    desc = f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x" \
           f"{conv.kernel_size[1]}/{conv.stride[0]} g{conv.groups} {shape[1]}x{shape[2]}"
    print(f"{layer:26s} {desc:28s} {1e6 * bound:7.0f}{cells}  {best:6s} "
          f"{'yes' if ms[best] <= 2e3 * bound else 'NO'}", flush=True)


def block_bounds(block, x_shape, batch, dtype, hw):
    """(seconds apart, seconds fused): the roofline bounds of a conv -> ReLU -> 1x1 conv
    block for a batch. Apart, each conv is one kernel with its bias, ReLU (and residual add)
    fused in, and the intermediate goes to memory and back; fused, it stays on chip."""
    c, p = block.conv, block.pointwise
    with torch.device("meta"):
        h = F.conv2d(torch.empty(batch, *x_shape[1:]), c.weight.to("meta"), None, c.stride,
                     c.padding, c.dilation, c.groups)
        y = F.conv2d(h, p.weight.to("meta"))
    size = torch.finfo(DTYPES[dtype]).bits // 8
    macs = h.numel() * c.weight[0].numel() + y.numel() * p.in_channels
    x_items = batch * x_shape[1:].numel()
    fused = (x_items + y.numel() * (2 if block.residual else 1) + c.weight.numel()
             + p.weight.numel()) * size
    apart = fused + 2 * h.numel() * size
    compute = 2 * macs / hw.peak_flops[dtype]
    return max(compute, apart / hw.bandwidth), max(compute, fused / hw.bandwidth)


def fused_table(name, batch, dtype, device, hw, repeats, bounds_only=False):
    """Each distinct conv -> ReLU -> 1x1 block of ``name``: cuDNN's layers, Triton conv +
    cuDNN 1x1, the fused kernel; us per batch beside the bounds apart and fused."""
    from deeproots.speed.fold import fold_batchnorm
    from deeproots.kernels.fusion import FusedRootConv, fuse_root_blocks

    model = create_model(name).eval()
    gm = fold_batchnorm(model)
    inputs = {}

    def keep_input(block, args, _out):
        inputs.setdefault(block, [a.shape for a in args])

    fused, _ = fuse_root_blocks(gm)
    blocks = [m for m in gm.modules() if isinstance(m, FusedRootConv)]
    if not blocks:
        print(f"\n{name}: no conv -> ReLU -> 1x1 block to fuse")
        return
    hooks = [b.register_forward_hook(keep_input) for b in blocks]
    with torch.enable_grad():  # shapes only: the blocks run their layers apart
        gm(torch.zeros(1, *model.default_input_size, requires_grad=True))
    for h in hooks:
        h.remove()
    print(f"\n{name}: conv -> ReLU -> 1x1 blocks, batch {batch}, {dtype}, channels-last, "
          f"roofline bounds on {hw.name}" + ("" if bounds_only else
                                             " (us per batch; fraction of the fused bound)"))
    print(f"{'block':20s} {'shape':36s} {'apart':>8s} {'fused':>7s}" + ("  gain at best" if
          bounds_only else f" {'cuDNN':>13s} {'triton+1x1':>13s} {'fused kernel':>13s}  gain"))
    seen = set()
    for path, block in zip(fused, blocks):
        shapes = inputs[block]
        c, p = block.conv, block.pointwise
        key = (tuple(shapes[0][1:]), c.out_channels, p.out_channels, c.kernel_size,
               c.stride, c.groups, block.residual)
        if key in seen:
            continue
        seen.add(key)
        bound_u, bound_f = block_bounds(block, shapes[0], batch, dtype, hw)
        desc = (f"{c.in_channels}->{c.out_channels} {c.kernel_size[0]}x{c.kernel_size[1]} "
                f"g{c.groups} ->{p.out_channels} {shapes[0][2]}x{shapes[0][3]}"
                f"{' +res' if block.residual else ''}")
        line = f"{path:20s} {desc:36s} {1e6 * bound_u:8.1f} {1e6 * bound_f:7.1f}"
        if bounds_only:
            print(f"{line}  {bound_u / bound_f:.2f}x", flush=True)
            continue
        try:
            _fused_row(block, shapes, batch, dtype, device, repeats, line, bound_f)
        except Exception as err:  # noqa: BLE001  (a row says what failed; the rest go on)
            print(f"{line}  failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}",
                  flush=True)


def _fused_row(block, shapes, batch, dtype, device, repeats, line, bound_f):
    from deeproots.kernels.fusion import FusedRootConv
    from deeproots.kernels.modules import TritonConv2d

    c, p = block.conv, block.pointwise
    block = block.to(device, DTYPES[dtype])
    make = lambda shape: torch.randn(batch, *shape[1:], device=device,  # noqa: E731
                                     dtype=DTYPES[dtype]).contiguous(
                                         memory_format=torch.channels_last)
    x = make(shapes[0])
    r = make(shapes[1]) if block.residual else None
    ms = {}
    with torch.no_grad():
        ms["cuDNN"] = _time_ms(lambda: block.unfused(x, r), x.is_cuda, repeats=repeats)
        if c.groups > 1:  # the Triton conv takes grouped convs only
            apart = FusedRootConv(c, p, block.residual, block.relu_out)
            apart.conv = TritonConv2d(c)
            ms["triton+1x1"] = _time_ms(lambda: apart.unfused(x, r), x.is_cuda,
                                        repeats=repeats)
        ms["fused"] = _time_ms(lambda: block.fused(x, r), x.is_cuda, repeats=repeats)
    cells = "".join(f" {1e3 * ms[k]:6.0f}{1e3 * bound_f / ms[k]:6.0%}" if k in ms
                    else f" {'-':>12s}" for k in ("cuDNN", "triton+1x1", "fused"))
    gain = min(v for k, v in ms.items() if k != "fused") / ms["fused"]
    print(f"{line}{cells}  {gain:.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--paths", nargs="+",
                   default=["fold", "triton", "dispatch", "fused", "cudagraph", "compile"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true",
                   help="NiN only (its pair and Table 8), few repeats: a smoke test")
    p.add_argument("--models", nargs="+", choices=[root for _, root, _ in PAIRS],
                   help="the root models whose pairs to time (default: all three)")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--tables-only", action="store_true",
                   help="only the per-layer and fused tables of --models' root networks, "
                        "each row printed as it is measured (no whole-model timing)")
    p.add_argument("--table-paths", nargs="*", default=["dispatch", "fused"],
                   help="paths to time every variant of Tables 4, 6 and 8 in (none: skip)")
    p.add_argument("--bounds-only", action="store_true",
                   help="print the conv -> ReLU -> 1x1 blocks' roofline bounds (apart, fused) "
                        "for --hardware and stop: any machine, no timing")
    p.add_argument("--hardware", default="h100", choices=["h100", "h200", "a100"],
                   help="with --bounds-only: the data sheet to take the roofs from")
    p.add_argument("--inductor", action="store_true",
                   help="also time each grouped layer compiled by inductor (max-autotune): "
                        "minutes of compiling")
    args = p.parse_args()
    if args.bounds_only:
        from deeproots.speed.roofline import HARDWARE

        for _, root, _ in PAIRS:
            for name in (root, root.split("-")[0]):
                fused_table(name, args.batch_size, args.dtype, None, HARDWARE[args.hardware],
                            0, bounds_only=True)
        return
    hw, where = machine(args.device)
    print(where)
    if args.device != "cuda":
        args.paths = [x for x in args.paths if x not in ("triton", "fused", "cudagraph")]
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        args.paths = [x for x in args.paths if x not in ("triton", "fused")]
    pairs = PAIRS[2:] if args.quick else PAIRS
    if args.models:
        pairs = [pair for pair in pairs if pair[1] in args.models]
    repeats = 3 if args.quick else args.repeats
    verdicts = []
    for orig, root, target in pairs:
        bound = {r.model: r for r in (roofline(m, hardware=hw, dtype=args.dtype,
                                               batch_size=args.batch_size)
                                      for m in (orig, root))}
        ideal = bound[orig].fused_s / bound[root].fused_s
        for path in ([] if args.tables_only else args.paths):
            try:
                rows = bench_models([orig, root], batch_size=args.batch_size,
                                    device=args.device, dtype=args.dtype, paths=[path],
                                    repeats=repeats, warmup=3)
            except Exception as err:  # one path failing must not lose the others' figures
                print(f"{orig}/{root} path {path}: failed ({type(err).__name__}: {err})")
                continue
            print(format_bench(rows), flush=True)
            speedup = rows[0].ms_per_image / rows[1].ms_per_image
            verdicts.append(f"{path:9s} {root:18s} {speedup:5.2f}x over {orig} (target "
                            f"{target}x, roofline {ideal:.2f}x fused): "
                            f"{'met' if speedup >= target else 'missed'}")
        if not args.skip_layers and args.dtype in ("bfloat16", "float16", "float32"):
            layer_table(root, args.batch_size, args.dtype, torch.device(args.device), hw,
                        repeats, args.inductor)
            if args.device == "cuda":
                fused_table(root, args.batch_size, args.dtype, torch.device(args.device), hw,
                            repeats)
    table_paths = [] if args.tables_only else [x for x in args.table_paths if x in args.paths]
    for table in (["nin"] if args.quick else TABLES):
        for path in table_paths:
            try:
                rows = bench_paper(table, batch_size=args.batch_size, device=args.device,
                                   dtype=args.dtype, paths=[path], repeats=repeats, warmup=3)
            except Exception as err:
                print(f"Table {TABLES[table]} path {path}: failed ({type(err).__name__}: {err})")
                continue
            print(format_bench(rows), flush=True)
            slower = ", ".join(f"{r.model} {r.speedup:.2f}x" for r in rows[1:] if r.speedup < 1)
            verdicts.append(f"{path:9s} Table {TABLES[table]}: no variant slower than "
                            f"{rows[0].model}: {'missed: ' + slower if slower else 'met'}")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
