"""Ways to run a root network's grouped convolutions, measured one layer at a time.

    python benchmarks/kernel_ideas.py [--threads 2] [--repeats 7] [--models nin-root-8 ...]
                                      [--sections grouped gemm own openvino]
    python benchmarks/kernel_ideas.py --device cuda --dtype bfloat16 --batch-size 256 \
        --models resnet50-root-64 googlenet-root-16        # Section 5 on a GPU: cuDNN vs bmm

For every distinct grouped conv of the named models (NiN at batch 128, ResNet-50 at batch 16,
float32, channels-last), each lowering below runs the same layer on the same input; GFLOP/s is
2 x the grouped layer's multiply-adds / time (padded variants are charged only the real
work), next to the ungrouped layer of the orig network on the same input:

    onednn   torch's grouped conv (oneDNN), what the fold/script/compile paths run
    split    one dense conv per group on its channel slice, then concatenated
    bmm      Section 5's idea: im2col (unfold), then all groups in one batched GEMM
    pad16    each group's channels zero-padded to a multiple of 16 (one AVX-512 register)

Then (section gemm) the rate of a 1x1 conv (one GEMM) as its input channels K grow, which
bounds what the many 1x1 convs of a root network can reach on this CPU, and the same GEMM in
MKL and OpenBLAS; (own) a 1x1 conv kernel of our own, benchmarks/kernels/gemm1x1.c (AVX-512 C,
built with the system's gcc), against oneDNN's; (openvino) OpenVINO's two ways of using the
cores on whole NiN networks: one request over all of them (LATENCY) or single-threaded
streams each on part of the batch (THROUGHPUT).
"""
import argparse

import torch
from torch.nn import functional as F

from deeproots import create_model
from deeproots.speed.timing import interleaved
from deeproots.models.layers import conv_layers


def seconds(fn, repeats):
    """Median seconds per call, after 2 warm-up calls (deeproots' own timer, GPU-synced)."""
    return interleaved({"fn": fn}, images=1, repeats=repeats, warmup=2)["fn"].median_s


def grouped_layers(name, batch):
    """(layer, conv, input) for each distinct grouped conv of model ``name``."""
    model = create_model(name).eval()
    inputs = {}

    def keep(name):
        def hook(module, args, out):  # returns None: the output is left as it is
            inputs.setdefault(name, args[0])
        return hook

    hooks = [conv.register_forward_hook(keep(n))
             for n, conv in conv_layers(model).items() if conv.groups > 1]
    with torch.no_grad():
        model(torch.randn(batch, *model.default_input_size))
    for h in hooks:
        h.remove()
    seen = {}
    for n, x in inputs.items():
        conv = conv_layers(model)[n]
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.groups,
               tuple(x.shape))
        seen.setdefault(key, (n, conv, x))
    return list(seen.values())


def lowerings(conv, x, device="cpu", dtype=torch.float32):
    g, k = conv.groups, conv.kernel_size[0]
    stride, pad = conv.stride, conv.padding
    x = x.to(device, dtype)
    w = conv.weight.detach().to(device, dtype)
    b = None if conv.bias is None else conv.bias.detach().to(device, dtype)
    new = dict(device=device, dtype=dtype)
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    cl = torch.channels_last
    xc, wc = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
    n, _, h, wd = x.shape
    ho = (h + 2 * pad[0] - k) // stride[0] + 1
    wo = (wd + 2 * pad[1] - k) // stride[1] + 1

    def onednn():
        return F.conv2d(xc, wc, b, stride, pad, groups=g)

    parts = [(xc[:, i * cin_g:(i + 1) * cin_g], wc[i * cout_g:(i + 1) * cout_g],
              None if b is None else b[i * cout_g:(i + 1) * cout_g]) for i in range(g)]

    def split():
        return torch.cat([F.conv2d(xi, wi, bi, stride, pad) for xi, wi, bi in parts], 1)

    wg = w.reshape(g, cout_g, cin_g * k * k)

    def bmm():
        cols = F.unfold(x, k, padding=pad, stride=stride).view(n, g, cin_g * k * k, ho * wo)
        out = torch.matmul(wg, cols).view(n, g * cout_g, ho, wo)
        return out if b is None else out + b.view(1, -1, 1, 1)

    cin_p, cout_p = -(-cin_g // 16) * 16, -(-cout_g // 16) * 16
    wp = torch.zeros(g, cout_p, cin_p, k, k, **new)
    wp[:, :cout_g, :cin_g] = w.view(g, cout_g, cin_g, k, k)
    wp = wp.view(g * cout_p, cin_p, k, k).contiguous(memory_format=cl)
    bp = None
    if b is not None:
        bp = torch.zeros(g, cout_p, **new)
        bp[:, :cout_g] = b.view(g, cout_g)
        bp = bp.view(-1)

    def pad16():
        xp = F.pad(x.view(n, g, cin_g, h, wd), (0, 0, 0, 0, 0, cin_p - cin_g))
        xp = xp.view(n, g * cin_p, h, wd).contiguous(memory_format=cl)
        y = F.conv2d(xp, wp, bp, stride, pad, groups=g)
        return y.view(n, g, cout_p, ho, wo)[:, :, :cout_g].reshape(n, g * cout_g, ho, wo)

    dense_w = torch.randn(conv.out_channels, conv.in_channels, k, k, **new).contiguous(
        memory_format=cl)

    def dense():
        return F.conv2d(xc, dense_w, b, stride, pad)

    macs = n * ho * wo * conv.out_channels * cin_g * k * k
    return macs, {"onednn": onednn, "split": split, "bmm": bmm, "pad16": pad16}, dense


def grouped_section(models, repeats, device="cpu", dtype=torch.float32, batch_size=None):
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    print(f"Grouped convs on {device}, {dtype}: GFLOP/s of each lowering (onednn: torch's own "
          f"grouped conv, cuDNN on a GPU; max |diff| vs it checked <= {tol} x max |out|)")
    head = f"{'model':18s} {'layer':22s} {'shape':34s} {'dense':>6s}"
    names = ["onednn", "split", "bmm", "pad16"]
    print(head + "".join(f" {n:>7s}" for n in names), flush=True)
    for name in models:
        batch = batch_size or (128 if name.startswith("nin") else 16)
        for layer, conv, x in grouped_layers(name, batch):
            macs, ways, dense = lowerings(conv, x, device, dtype)
            with torch.inference_mode():
                ref = ways["onednn"]()
                rates = {}
                for way, fn in ways.items():
                    err = (fn() - ref).abs().max().item()
                    if err > tol * max(1.0, ref.abs().max().item()):
                        raise AssertionError(f"{way} differs from onednn by {err}")
                    rates[way] = 2 * macs / seconds(fn, repeats) / 1e9
                dense_rate = 2 * macs * conv.groups / seconds(dense, repeats) / 1e9
            k = conv.kernel_size[0]
            shape = (f"{conv.in_channels}->{conv.out_channels} {k}x{k}/{conv.stride[0]} "
                     f"g{conv.groups} {x.shape[2]}x{x.shape[3]}")
            print(f"{name:18s} {layer:22s} {shape:34s} {dense_rate:6.0f}"
                  + "".join(f" {rates[n]:7.0f}" for n in names), flush=True)


def gemm_section(repeats):
    print("\n1x1 conv (one GEMM, oneDNN, channels-last, 131072 pixels = NiN conv1 at batch 128): "
          "GFLOP/s by input channels K")
    pixels_side = 32
    for cin, cout in [(64, 192), (160, 96), (192, 160), (192, 192), (384, 192), (768, 192),
                      (2400, 192)]:
        x = torch.randn(128, cin, pixels_side, pixels_side).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 1, 1).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            s = seconds(lambda: F.conv2d(x, w), repeats)
        print(f"  K={cin:5d} N={cout:4d}: {2 * 128 * 32 * 32 * cin * cout / s / 1e9:6.0f}",
              flush=True)
    import numpy as np

    a, b = torch.randn(128 * 32 * 32, 192), torch.randn(192, 160)
    out = torch.empty(len(a), 160)
    an, bn, outn = a.numpy(), b.numpy(), out.numpy()
    flops = 2 * len(a) * 192 * 160
    mkl = flops / seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e9
    blas = flops / seconds(lambda: np.matmul(an, bn, out=outn), repeats) / 1e9
    print(f"  the same K=192 N=160 GEMM as a plain matrix product: torch.mm (MKL) {mkl:.0f}, "
          f"numpy.matmul (its OpenBLAS) {blas:.0f}")


def own_kernel_section(repeats, threads):
    """Our own 1x1 conv kernel (benchmarks/kernels/gemm1x1.c) against oneDNN's, on the
    1x1 layers of NiN at batch 128."""
    import ctypes
    import os
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        print("\n(no C compiler: own-kernel comparison skipped)")
        return
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "gemm1x1.c")
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = os.path.join(tmp, "libgemm1x1.so")
        built = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                                source, "-o", lib_path], capture_output=True, text=True)
        if built.returncode != 0:  # e.g. a CPU without AVX-512
            print(f"\n(own kernel did not build here: {built.stderr.strip()[:200]})")
            return
        lib = ctypes.CDLL(lib_path)
    p = ctypes.c_void_p
    variants = [(12, 2), (6, 4), (8, 3)]
    for mr, nv in variants:
        getattr(lib, f"gemm_{mr}x{nv}").argtypes = [p, p, p, p, ctypes.c_long, ctypes.c_int,
                                                    ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                    ctypes.c_int]
    print(f"\nOur own 1x1 conv + bias + ReLU (AVX-512 C, benchmarks/kernels/gemm1x1.c, "
          f"gcc -O3 -march=native) vs oneDNN's conv + ReLU, GFLOP/s, NiN's 1x1 layers at "
          f"batch 128 (pixels x K -> N)")
    for side, k, n in [(32, 192, 160), (32, 160, 96), (16, 192, 192), (8, 192, 192)]:
        m = 128 * side * side
        x = torch.randn(128, k, side, side).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(n, k), torch.randn(n)
        a = x.permute(0, 2, 3, 1).reshape(m, k)  # channels-last memory, viewed as pixels x K
        out = torch.empty(m, n)
        w4 = w.view(n, k, 1, 1).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = torch.relu(F.conv2d(x, w4, b))
            onednn = 2 * m * k * n / seconds(lambda: torch.relu_(F.conv2d(x, w4, b)),
                                             repeats) / 1e9
        rates = []
        for mr, nv in variants:
            nr = 16 * nv
            panels = -(-n // nr)
            wp = torch.zeros(panels * nr, k)
            wp[:n] = w
            wp = wp.view(panels, nr, k).transpose(1, 2).contiguous()
            bp = torch.zeros(panels * nr)
            bp[:n] = b
            fn = getattr(lib, f"gemm_{mr}x{nv}")
            call = (lambda fn=fn, wp=wp, bp=bp, mr=mr: fn(
                a.data_ptr(), wp.data_ptr(), bp.data_ptr(), out.data_ptr(), m, k, n, 1,
                threads, 16 * mr))
            call()
            got = out.view(128, side, side, n).permute(0, 3, 1, 2)
            err = (got - ref).abs().max().item()
            if err > 1e-3 * ref.abs().max().item():
                raise AssertionError(f"own kernel {mr}x{nr} differs from oneDNN by {err}")
            rates.append(f"{mr}x{nr} {2 * m * k * n / seconds(call, repeats) / 1e9:4.0f}")
        print(f"  {m:6d} x {k:3d} -> {n:3d}: oneDNN {onednn:4.0f} | ours " + ", ".join(rates),
              flush=True)


def openvino_section(repeats, threads):
    try:
        import numpy as np
        import openvino as ov
    except ImportError:
        print("\n(OpenVINO not installed: streams comparison skipped)")
        return
    from deeproots.speed.export import onnx_bytes
    from deeproots.speed.deploy import available_paths
    from deeproots.speed.fold import fold_batchnorm

    if "openvino" not in available_paths():
        print("\n(OpenVINO cannot run under a preloaded jemalloc: streams comparison skipped)")
        return
    core = ov.Core()
    x = torch.randn(128, 3, 32, 32)
    data = x.numpy()
    halves = [np.ascontiguousarray(data[:64]), np.ascontiguousarray(data[64:])]
    work = {}
    for name in ["nin", "nin-root-8", "nin-root-16"]:
        model = core.read_model(onnx_bytes(fold_batchnorm(create_model(name).eval()), x))
        latency = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY"})
        streams = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": threads})
        requests = [streams.create_infer_request() for _ in halves]

        def both(requests=requests):
            for r, half in zip(requests, halves):
                r.start_async({0: half})
            for r in requests:
                r.wait()

        work[f"{name} latency"] = lambda c=latency: c(data)
        work[f"{name} streams"] = both
    t = interleaved(work, 128, repeats=repeats, warmup=2)
    print(f"\nOpenVINO f32, whole NiN networks, batch 128, {threads} threads: ms per image "
          "(speedup over nin in the same mode)")
    for mode in ("latency", "streams"):
        base = t[f"nin {mode}"].median_s
        print(f"  {mode:8s}" + "".join(
            f"  {n}: {t[f'{n} {mode}'].ms_per_image:.3f} ({base / t[f'{n} {mode}'].median_s:.2f}x)"
            for n in ["nin", "nin-root-8", "nin-root-16"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sections", nargs="+", default=["grouped", "gemm", "own", "openvino"],
                   choices=["grouped", "gemm", "own", "openvino"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the grouped section on a GPU (cuDNN vs batched GEMM)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="for the grouped section")
    p.add_argument("--batch-size", type=int,
                   help="for the grouped section (default: 128 for NiN, 16 for ResNet)")
    p.add_argument("--models", nargs="+",
                   default=["nin-root-8", "nin-root-16", "resnet50-root-64"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from deeproots.runtime import allocator

    print(f"torch {torch.__version__}, {args.threads} threads, allocator {allocator()}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this machine has no CUDA GPU")
    if "grouped" in args.sections:
        grouped_section(args.models, args.repeats, args.device,
                        getattr(torch, args.dtype), args.batch_size)
    if args.device == "cuda":
        return  # the other sections are about this CPU
    if "gemm" in args.sections:
        gemm_section(args.repeats)
    if "own" in args.sections:
        own_kernel_section(args.repeats, args.threads)
    if "openvino" in args.sections:
        openvino_section(args.repeats, args.threads)


if __name__ == "__main__":
    main()
