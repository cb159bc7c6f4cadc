"""The GPU targets of the grouped-convolution issue, in one command: whole models (root over
orig, each path, beside the roofline bound) and every grouped conv layer (each lowering:
cuDNN, deeproots' Triton kernel, block-diagonal dense, split per group, against its
roofline bound). Prints the device; every step is timed with CUDA events after a
synchronised warm-up, the models of a pair side by side in one process.

    python benchmarks/gpu_targets.py                        # H100/H200: bf16, batch 256
    python benchmarks/gpu_targets.py --device cpu --dtype float32 --batch-size 4 --quick
"""
import argparse

import torch

from deeproots.bench import bench_models, format_bench
from deeproots.kernels.modules import _time_ms, lowerings
from deeproots.layers import grouped_convs
from deeproots.registry import create_model
from deeproots.roofline import machine, roofline

PAIRS = [("resnet50", "resnet50-root-64", 1.15), ("googlenet", "googlenet-root-16", 1.15),
         ("nin", "nin-root-8", 1.25)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def grouped_layers(name: str):
    """(layer, conv, input shape of one image) of every grouped conv, in model order."""
    model = create_model(name).eval()
    return grouped_convs(model, torch.zeros(1, *model.default_input_size))


def layer_table(name, batch, dtype, device, hw, repeats):
    peak, bw = hw.peak_flops[dtype], hw.bandwidth
    size = torch.finfo(DTYPES[dtype]).bits // 8
    print(f"\n{name}: grouped conv layers, batch {batch}, {dtype}, channels-last "
          f"(us per batch; TFLOP/s; fraction of the roofline bound)")
    head = f"{'layer':26s} {'shape':28s} {'bound':>7s}"
    lows = ("native", "triton", "dense", "split")
    print(head + "".join(f" {k:>16s}" for k in lows) + "  best   within 2x")
    seen = set()
    for layer, conv, shape in grouped_layers(name):
        key = (tuple(shape), conv.out_channels, conv.kernel_size, conv.stride, conv.groups)
        if key in seen:
            continue
        seen.add(key)
        conv = conv.to(device, DTYPES[dtype])
        x = torch.randn(batch, *shape, device=device, dtype=DTYPES[dtype]).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            y = conv(x)
        macs = y.numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * \
            conv.kernel_size[1]
        moved = (x.numel() + y.numel() + conv.weight.numel()) * size
        bound = max(2 * macs / peak, moved / bw)
        with torch.no_grad():
            ms = {k: _time_ms(lambda fn=fn: fn(conv, x, conv.weight, conv.bias), x.is_cuda,
                              repeats=repeats)
                  for k, fn in lowerings(conv, x.device).items()}
        cells = "".join(
            f" {1e3 * ms[k]:7.0f} {2 * macs / ms[k] / 1e9:4.0f}T{1e3 * bound / ms[k]:4.0%}"
            if k in ms else f" {'-':>16s}" for k in lows)
        best = min(ms, key=ms.get)
        desc = f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x" \
               f"{conv.kernel_size[1]}/{conv.stride[0]} g{conv.groups} {shape[1]}x{shape[2]}"
        print(f"{layer:26s} {desc:28s} {1e6 * bound:7.0f}{cells}  {best:6s} "
              f"{'yes' if ms[best] <= 2e3 * bound else 'NO'}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--paths", nargs="+", default=["fold", "triton", "dispatch", "compile"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="NiN only, few repeats: a smoke test")
    p.add_argument("--skip-layers", action="store_true")
    args = p.parse_args()
    hw, where = machine(args.device)
    print(where)
    if args.device != "cuda":
        args.paths = [x for x in args.paths if x != "triton"]
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        args.paths = [x for x in args.paths if x != "triton"]
    pairs = PAIRS[2:] if args.quick else PAIRS
    repeats = 3 if args.quick else args.repeats
    verdicts = []
    for orig, root, target in pairs:
        bound = {r.model: r for r in (roofline(m, hardware=hw, dtype=args.dtype,
                                               batch_size=args.batch_size)
                                      for m in (orig, root))}
        ideal = bound[orig].fused_s / bound[root].fused_s
        for path in args.paths:
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
                        repeats)
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
