"""Every Triton kernel of deeproots compiled for a Hopper GPU (sm_90a) on this machine, no GPU
needed: for representative layers of the registered models and each autotune configuration,
the registers per thread, the bytes of stack (local memory: spilled registers), the shared
memory, how many wgmma instructions (HGMMA in the machine code) the matrix multiplies
became, and the global loads by width (16-byte vectors are what memory-bound code wants). What the device's compiler does to a kernel, read at no device time: a
configuration that spills or misses the tensor cores is slow however it is timed.

    python benchmarks/kernel_resources.py            # every kernel and configuration
    python benchmarks/kernel_resources.py --only root

The launch arguments are the real launchers' own (:mod:`deeproots.kernels.resources`).
"""
import argparse
import os
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

from deeproots.kernels import fused_root as R  # noqa: E402
from deeproots.kernels import grouped_conv as G  # noqa: E402
from deeproots.kernels import grouped_conv_grad as GG  # noqa: E402
from deeproots.kernels.resources import configs, kernel_resources, recorded  # noqa: E402


DTYPE = [torch.bfloat16]  # the dtype the layers are launched in (--dtype)


def _cl(*shape):
    return torch.randn(*shape, dtype=DTYPE[0]).contiguous(memory_format=torch.channels_last)


def _conv_layer(cin, cout, k, groups, size, batch=4):
    x = _cl(batch, cin, size, size)
    w = torch.randn(cout, cin // groups, k, k, dtype=DTYPE[0])
    pad = k // 2
    dy = _cl(batch, cout, size, size)
    G.grouped_conv2d(x, w, torch.randn(cout, dtype=DTYPE[0]), 1, pad, 1, groups)
    GG.conv2d_input_grad(dy, w, x.shape, (1, 1), (pad, pad), (1, 1), groups)
    GG.conv2d_weight_grad(x, dy, w.shape, (1, 1), (pad, pad), (1, 1), groups)


def _root(cin, c2, c3, k, groups, size, residual, batch=4):
    x = _cl(batch, cin, size, size)
    r = _cl(batch, c3, size, size) if residual else None
    t = lambda *s: torch.randn(*s, dtype=DTYPE[0])  # noqa: E731
    R.fused_root_conv(x, t(c2, cin // groups, k, k), t(c2), t(c3, c2, 1, 1), t(c3), 1, k // 2,
                      1, groups, r, True)


LAYERS = {  # the layers whose launches are compiled: (what, how to launch them)
    "nin-root-8 conv2a 96->192 5x5 g8": lambda: _conv_layer(96, 192, 5, 8, 16),
    "resnet50-root-64 layer3 256 3x3 g16": lambda: _conv_layer(256, 256, 3, 16, 14),
    "resnet50-root-64 layer1 64 3x3 g64": lambda: _conv_layer(64, 64, 3, 64, 56),
    "root nin-root-8 conv2a->conv2b": lambda: _root(96, 192, 192, 5, 8, 16, False),
    "root resnet50-root-64 layer1 (direct)": lambda: _root(64, 64, 256, 3, 64, 56, True),
    "root resnet50-root-64 layer3": lambda: _root(256, 256, 1024, 3, 16, 14, True),
    "root resnet50-root-64 layer4": lambda: _root(512, 512, 2048, 3, 8, 7, True),
    "root resnet50 layer3 (ungrouped)": lambda: _root(256, 256, 1024, 3, 1, 14, True),
}


def _compile(job):
    layer, name, args, kwargs, config = job
    r = kernel_resources(name, args, kwargs, config)
    blocks = "/".join(f"{v}" for v in config.kwargs.values())
    loads = "/".join(str(r.loads.get(n, 0)) for n in (16, 8, 4, 2))
    return (layer, name.lstrip("_"), f"{blocks} w{config.num_warps} s{config.num_stages}",
            r.registers, r.stack_bytes, r.shared_bytes, r.wgmma, loads)


def jobs(only=None):
    """One job per recorded launch and autotune configuration of the kernel launched."""
    out = []
    for layer, launch in LAYERS.items():
        if only and only not in layer:
            continue
        with recorded() as launches:
            launch()
        for name, args, kwargs in launches:
            out += [(layer, name, args, kwargs, config)
                    for config in configs(name, args, kwargs)]  # as the launch prunes them
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="layers whose name contains this text")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = p.parse_args()
    DTYPE[0] = getattr(torch, args.dtype)
    todo = jobs(args.only)
    print(f"triton {triton.__version__}, target sm_90a (Hopper), {len(todo)} compilations; "
          f"{args.dtype}; registers per thread (255 at most), stack bytes (> 0: registers spilled "
          f"to local memory), shared memory KB, wgmma instructions, global loads of "
          f"16/8/4/2 bytes", flush=True)
    print(f"{'layer':38s} {'kernel':18s} {'blocks warps stages':24s} {'regs':>4s} "
          f"{'stack':>5s} {'smem':>5s} {'wgmma':>5s}  loads")
    with ProcessPoolExecutor(args.workers) as pool:
        for layer, kernel, conf, regs, stack, smem, wgmma, loads in pool.map(_compile, todo):
            flag = "  SPILLS" if stack else ""
            print(f"{layer:38s} {kernel:18s} {conf:24s} {regs:4d} {stack:5d} "
                  f"{smem / 1024:5.0f} {wgmma:5d}  {loads}{flag}", flush=True)


if __name__ == "__main__":
    main()
