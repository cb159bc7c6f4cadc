"""What a GPU's compiler makes of deeproots' Triton kernels, read on any machine: each kernel
compiled ahead of time for a target (Hopper, sm_90a, by default) from the arguments its
real launcher passes, and the registers per thread, stack bytes (spilled registers), shared
memory and wgmma instructions read from the machine code. No GPU is needed: Triton's
compiler and its bundled ``cuobjdump`` run on the CPU.

    with recorded() as launches:          # launchers run, kernels are recorded, not run
        grouped_conv2d(x, w, b, 1, 1, 1, 16)
    name, args, kwargs = launches[0]
    kernel_resources(name, args, kwargs, configs(name)[0])

``benchmarks/kernel_resources.py`` prints the table for the registered models' layers.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from ..errors import DeeprootsError
from . import _common as C
from . import fused_root as R
from . import grouped_conv as G
from . import grouped_conv_grad as GG

__all__ = ["KERNELS", "Resources", "recorded", "configs", "kernel_resources", "specialization",
           "variants"]

KERNELS = {  # each autotuned kernel, by its name in its module
    "_conv_gemm": G, "_conv_depthwise": G, "_input_grad_gemm": GG, "_input_grad_direct": GG,
    "_weight_grad_gemm": GG, "_weight_grad_direct": GG, "_root_block_gemm": R,
    "_root_block_direct": R}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Resources:
    """One kernel compiled with one configuration: registers per thread (255 at most),
    stack bytes (> 0: registers spilled to local memory), shared memory bytes, and the
    number of wgmma (tensor-core) instructions in its machine code."""

    registers: int
    stack_bytes: int
    shared_bytes: int
    wgmma: int
    # global loads in the machine code (plain and asynchronous copies), by bytes per thread:
    # {16: n, 8: n, 4: n, 2: n}; 16-byte loads are what memory-bound code wants
    loads: Dict[int, int] = field(default_factory=dict)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` keeps the arguments."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


@contextlib.contextmanager
def recorded():
    """Within: the launchers run their arithmetic on any tensors (CPU ones too) as for a
    GPU, without their device check, and each kernel launch is recorded as
    ``(name, args, kwargs)`` instead of run."""
    launches: List[Tuple[str, tuple, dict]] = []
    saved = {name: getattr(module, name) for name, module in KERNELS.items()}
    flags = (C.INTERPRET, C.check_conv)  # read by every kernel file at call time
    for name, module in KERNELS.items():
        setattr(module, name, _Recorder(name, launches))
    C.INTERPRET, C.check_conv = False, (lambda *a, **k: None)
    try:
        yield launches
    finally:
        for name, module in KERNELS.items():
            setattr(module, name, saved[name])
        C.INTERPRET, C.check_conv = flags


def specialization(name: str, args: tuple, kwargs: dict) -> tuple:
    """What makes a launch a kernel variant of its own on a GPU: its compile-time constants
    (the interpreter's block sizes and bf16 upcast left out: the autotuner sets those
    there) and Triton's run-time specialisation of its arguments (dtypes, integers equal to
    1, multiples of 16, 16-byte-aligned pointers)."""
    consts = tuple(sorted((k, v) for k, v in kwargs.items()
                          if not k.startswith("BLOCK_") and k != "UPCAST"))
    return (name, consts, tuple(_spec(a) for a in args))


def variants(launches, first: bool = False) -> Dict[str, int]:
    """How many kernel variants the launches compile on a GPU, per kernel: each distinct
    :func:`specialization` once with every configuration its prune rules let it try (the
    autotuner compiles them all on the first launch), or with ``first`` (the
    ``DEEPROOTS_AUTOTUNE=first`` of a correctness run) one."""
    seen, count = set(), {}
    for name, args, kwargs in launches:
        key = specialization(name, args, kwargs)
        if key in seen:
            continue
        seen.add(key)
        count[name] = count.get(name, 0) + (1 if first else len(configs(name, args, kwargs)))
    return count


def configs(name: str, args: tuple = (), kwargs: Optional[dict] = None
            ) -> List[triton.Config]:
    """The autotune configurations listed for kernel ``name``; with a launch's ``args`` and
    ``kwargs`` (as :func:`recorded` keeps them), those its prune rules let that launch try."""
    kernel = getattr(KERNELS[name], name)
    if not hasattr(kernel, "configs"):
        raise DeeprootsError(f"kernel {name} is not autotuned here (TRITON_INTERPRET=1 is set: "
                             f"unset it before importing deeproots.kernels)")
    listed = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None or not args:
        return listed
    return prune(listed, dict(zip(kernel.arg_names, args)), **(kwargs or {}))


def _spec(value):
    """(signature type, constant or None, divisible): Triton's run-time specialisation."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPE_NAMES[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", None, False
    if value == 1:
        return "constexpr", 1, False
    return ("i32" if abs(value) < 2**31 else "i64"), None, value % 16 == 0


def _cuobjdump(*args: str) -> str:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def kernel_resources(name: str, args: tuple, kwargs: dict, config: triton.Config,
                     capability: int = 90) -> Resources:
    """Kernel ``name`` compiled for an NVIDIA GPU of compute ``capability`` (90: Hopper)
    with launch arguments ``args``/``kwargs`` (as :func:`recorded` keeps them) and
    ``config``, specialised as Triton does at run time (integers equal to 1 become
    constants; multiples of 16 and 16-byte-aligned pointers are marked divisible)."""
    jit = getattr(KERNELS[name], name).fn
    signature, constants, attrs = {}, dict(kwargs), {}
    constants.update(config.kwargs)
    for i, arg_name in enumerate(jit.arg_names):
        if i in jit.constexprs and arg_name not in constants:  # passed by position
            constants[arg_name] = args[i]
        if arg_name in constants:
            signature[arg_name] = "constexpr"
            continue
        kind, const, divisible = _spec(args[i])
        signature[arg_name] = kind
        if const is not None:
            constants[arg_name] = const
        if divisible:
            attrs[(i,)] = BaseBackend.parse_attr("D")
    kernel = triton.compile(ASTSource(jit, signature, constants, attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": config.num_warps,
                                     "num_stages": config.num_stages})
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _cuobjdump("--dump-resource-usage", path)
        sass = _cuobjdump("-sass", path)
    return Resources(int(re.search(r"REG:(\d+)", usage).group(1)),
                     int(re.search(r"STACK:(\d+)", usage).group(1)),
                     kernel.metadata.shared, len(re.findall(r"\bHGMMA", sass)), _loads(sass))


def _loads(sass: str) -> Dict[int, int]:
    """Global loads (LDG, and LDGSTS: the asynchronous copies to shared memory) by width."""
    widths: Dict[int, int] = {}
    for op in re.findall(r"\b(?:LDG|LDGSTS)\.E[.\w]*", sass):
        size = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
        nbytes = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[size.group(1)] \
            if size else 4
        widths[nbytes] = widths.get(nbytes, 0) + 1
    return dict(sorted(widths.items(), reverse=True))
