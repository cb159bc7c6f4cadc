"""Every Triton kernel of deeproots compiled for a Hopper GPU (sm_90a) on this machine, no GPU
needed: for representative layers of the registered models and each autotune configuration,
the registers per thread, the bytes of stack (local memory: spilled registers), the shared
memory, and how many wgmma instructions (HGMMA in the machine code) the matrix multiplies
became. What the device's compiler does to a kernel, read at no device time: a
configuration that spills or misses the tensor cores is slow however it is timed.

    python benchmarks/kernel_resources.py            # every kernel and configuration
    python benchmarks/kernel_resources.py --only root

The launch arguments are the real launchers' own (the kernels' launch is recorded, not run),
specialised as Triton specialises them at run time (integers equal to 1 become constants,
multiples of 16 and 16-byte-aligned pointers are marked divisible).
"""
import argparse
import contextlib
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deeproots.kernels import fused_root as R  # noqa: E402
from deeproots.kernels import grouped_conv as G  # noqa: E402
from deeproots.kernels import grouped_conv_grad as GG  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
MODULES = (G, GG, R)
KERNELS = {  # module attribute -> module
    "_conv_gemm": G, "_conv_depthwise": G, "_input_grad_gemm": GG, "_input_grad_direct": GG,
    "_weight_grad_gemm": GG, "_weight_grad_direct": GG, "_root_block_gemm": R,
    "_root_block_direct": R}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` keeps the arguments."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


@contextlib.contextmanager
def recorded():
    """Within: the launchers run their checks and arithmetic on CPU tensors, as for a GPU,
    and every kernel launch is recorded instead of run."""
    launches, saved = [], {}
    for name, module in KERNELS.items():
        saved[name] = getattr(module, name)
        setattr(module, name, _Recorder(name, launches))
    flags = {m: (m.INTERPRET, m.check_conv) for m in MODULES}
    for m in MODULES:
        m.INTERPRET, m.check_conv = False, (lambda *a, **k: None)
    try:
        yield launches
    finally:
        for name, module in KERNELS.items():
            setattr(module, name, saved[name])
        for m, (interpret, check) in flags.items():
            m.INTERPRET, m.check_conv = interpret, check


def _cl(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _conv_layer(cin, cout, k, groups, size, batch=4):
    x = _cl(batch, cin, size, size)
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.bfloat16)
    pad = k // 2
    dy = _cl(batch, cout, size, size)
    G.grouped_conv2d(x, w, torch.randn(cout, dtype=torch.bfloat16), 1, pad, 1, groups)
    GG.conv2d_input_grad(dy, w, x.shape, (1, 1), (pad, pad), (1, 1), groups)
    GG.conv2d_weight_grad(x, dy, w.shape, (1, 1), (pad, pad), (1, 1), groups)


def _root(cin, c2, c3, k, groups, size, residual, batch=4):
    x = _cl(batch, cin, size, size)
    r = _cl(batch, c3, size, size) if residual else None
    t = lambda *s: torch.randn(*s, dtype=torch.bfloat16)  # noqa: E731
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
}


def _spec(value):
    """(signature type, constant or None, divisible) as Triton's run-time specialisation."""
    if isinstance(value, torch.Tensor):
        kind = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16",
                      torch.float32: "fp32"}[value.dtype]
        return kind, None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", None, False
    if value == 1:
        return "constexpr", 1, False
    return ("i32" if abs(value) < 2**31 else "i64"), None, value % 16 == 0


def compile_one(job):
    """Compile one launch with one configuration for sm_90a; returns the resource line."""
    layer, name, args, kwargs, config = job
    jit = getattr(KERNELS[name], name).fn
    signature, constants, attrs = {}, dict(kwargs), {}
    constants.update(config.kwargs)
    for i, arg_name in enumerate(jit.arg_names):
        if arg_name in constants:
            signature[arg_name] = "constexpr"
            continue
        kind, const, divisible = _spec(args[i])
        signature[arg_name] = kind
        if const is not None:
            constants[arg_name] = const
        if divisible:
            attrs[(i,)] = BaseBackend.parse_attr("D")
    src = ASTSource(jit, signature, constants, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.num_warps,
                                     "num_stages": config.num_stages})
    path = f"/tmp/deeproots-{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                           capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path],
                          capture_output=True, text=True).stdout
    os.unlink(path)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    blocks = "/".join(f"{v}" for v in config.kwargs.values())
    return (layer, name.lstrip("_"), f"{blocks} w{config.num_warps} s{config.num_stages}",
            regs, stack, kernel.metadata.shared, len(re.findall(r"\bHGMMA", sass)))


def jobs(only=None):
    """One job per recorded launch and autotune configuration of the kernel launched."""
    out = []
    for layer, launch in LAYERS.items():
        if only and only not in layer:
            continue
        with recorded() as launches:
            launch()
        for name, args, kwargs in launches:
            for config in getattr(KERNELS[name], name).configs:
                out.append((layer, name, args, kwargs, config))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="layers whose name contains this text")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args()
    todo = jobs(args.only)
    print(f"triton {triton.__version__}, target sm_90a (Hopper), {len(todo)} compilations; "
          f"bf16; registers per thread (255 at most), stack bytes (> 0: registers spilled "
          f"to local memory), shared memory KB, wgmma instructions", flush=True)
    head = f"{'layer':38s} {'kernel':18s} {'blocks warps stages':24s} {'regs':>4s} " \
           f"{'stack':>5s} {'smem':>5s} {'wgmma':>5s}"
    print(head)
    with ProcessPoolExecutor(args.workers) as pool:
        for layer, kernel, conf, regs, stack, smem, wgmma in pool.map(compile_one, todo):
            flag = "  SPILLS" if stack else ""
            print(f"{layer:38s} {kernel:18s} {conf:24s} {regs:4d} {stack:5d} "
                  f"{smem / 1024:5.0f} {wgmma:5d}{flag}", flush=True)


if __name__ == "__main__":
    main()
