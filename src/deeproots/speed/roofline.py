"""What the hardware allows: per layer, the roofline lower bound on its time,
max(2 x multiply-adds / peak FLOP/s, bytes moved / memory bandwidth), whether it is compute-
or memory-bound, and the whole model's bound; beside measured times, the fraction of the
bound each layer reaches.

Bytes moved are counted unfused: every layer (conv, linear, batch norm, activation, pooling)
reads its inputs and its parameters once and writes its output once. The second total,
``fused_s``, counts convs and linear layers alone, as if every elementwise layer were fused
into the conv before it. Residual additions and concatenations written in ``forward`` (not
modules) are not counted, so both totals are lower bounds.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..checks import check_choice, check_positive, check_range
from ..capture import hooks
from ..errors import DeeprootsError
from ..config import ROOFLINE_DEVICES, ROOFLINE_DTYPES
from ..inspection.costs import parse_input_size, profile
from ..models.layers import layer_name
from ..models.registry import build_model
from ..text import format_table

__all__ = ["HARDWARE", "Hardware", "LayerBound", "Roofline", "roofline", "measure_cpu", "machine",
           "format_roofline"]


@dataclass(frozen=True)
class Hardware:
    """Peak dense matrix FLOP/s per dtype (tensor cores where there are), and memory
    bandwidth in bytes/s; from the vendor's data sheet."""

    name: str
    peak_flops: Dict[str, float]
    bandwidth: float


HARDWARE = {
    # SXM parts, dense (no sparsity) tensor-core peaks; fp32 runs as TF32 on tensor cores
    "h100": Hardware("NVIDIA H100 SXM (80 GB HBM3)", {"bfloat16": 989e12, "float16": 989e12,
                                                     "float32": 495e12}, 3.35e12),
    "h200": Hardware("NVIDIA H200 SXM (141 GB HBM3e)", {"bfloat16": 989e12, "float16": 989e12,
                                                       "float32": 495e12}, 4.8e12),
    "a100": Hardware("NVIDIA A100 SXM (80 GB HBM2e)", {"bfloat16": 312e12, "float16": 312e12,
                                                      "float32": 156e12}, 2.039e12),
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# sane overrides of the roofs: a CPU core to far beyond any chip (outside them the bounds
# are 0, inf or nan), and a batch whose tensors can still be described
PEAK_TFLOPS = (1e-3, 1e5)
BANDWIDTH_TBS = (1e-4, 1e3)
MAX_BATCH = 2**24
assert tuple(DTYPE_BYTES) == ROOFLINE_DTYPES and (*HARDWARE, "cpu") == ROOFLINE_DEVICES


@dataclass
class LayerBound:
    """One layer's bound for the whole batch: seconds, and which roof sets it."""

    layer: str
    kind: str
    macs: int
    bytes: int
    bound_s: float
    limit: str  # "compute" or "memory"
    measured_s: Optional[float] = None

    @property
    def fraction(self) -> Optional[float]:
        """bound / measured: 1.0 runs at the roofline."""
        return self.bound_s / self.measured_s if self.measured_s else None


@dataclass
class Roofline:
    """A model's roofline on one machine: per layer, and the totals (``unfused_s``: every
    layer; ``fused_s``: convs and linear layers only)."""

    model: str
    hardware: str
    dtype: str
    batch_size: int
    peak_flops: float
    bandwidth: float
    layers: List[LayerBound] = field(default_factory=list)

    @property
    def unfused_s(self) -> float:
        return sum(r.bound_s for r in self.layers)

    @property
    def fused_s(self) -> float:
        return sum(r.bound_s for r in self.layers if r.kind in ("Conv2d", "Linear"))

    @property
    def measured_s(self) -> Optional[float]:
        times = [r.measured_s for r in self.layers if r.measured_s is not None]
        return sum(times) if times else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(unfused_s=self.unfused_s, fused_s=self.fused_s, measured_s=self.measured_s)
        for row, layer in zip(d["layers"], self.layers):
            row["fraction"] = layer.fraction
        return d


def machine(device: str) -> Tuple[Hardware, str]:
    """The roofs of the machine the benchmarks run on, and a line naming it: for ``cuda`` the
    data sheet of this GPU (H200 or A100 by name, else H100), for ``cpu`` this CPU, measured.
    SystemExit with a one-line message when ``cuda`` is asked for and there is none."""
    import platform  # only for the CPU's name

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: this machine has no CUDA GPU; use --device "
                             "cpu")
        gpu = torch.cuda.get_device_name()
        hw = HARDWARE["h200" if "H200" in gpu else "a100" if "A100" in gpu else "h100"]
        return hw, (f"{gpu}, torch {torch.__version__}, cuDNN "
                    f"{torch.backends.cudnn.version()}")
    return measure_cpu(), (f"{platform.processor() or platform.machine()}, torch "
                           f"{torch.__version__}, {torch.get_num_threads()} threads")


def measure_cpu(seconds: float = 0.5) -> Hardware:
    """This CPU's roofs, measured: float32 GEMM FLOP/s (torch.mm, 1024^2) and copy
    bandwidth (a 256 MB tensor copied, read and written)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.empty(32 * 2**20), torch.empty(32 * 2**20)

    def rate(fn, work):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            fn()
            n += 1
        return work * n / (time.perf_counter() - t0)

    flops = rate(lambda: torch.mm(a, b), 2 * 1024**3)
    bandwidth = rate(lambda: dst.copy_(src), 2 * src.numel() * 4)
    return Hardware(f"this CPU ({torch.get_num_threads()} threads, measured)",
                    {"float32": flops, "bfloat16": flops, "float16": flops}, bandwidth)


def roofline(model, *, hardware: str | Hardware = "h100", dtype: str = "bfloat16",
             batch_size: int = 256, input_size=None, peak_tflops: Optional[float] = None,
             bandwidth_tbs: Optional[float] = None) -> Roofline:
    """The roofline of ``model`` (an ``nn.Module``, a registered name or FILE.py:FUNCTION)
    for a batch on ``hardware`` (``h100``, ``h200``, ``a100``, ``cpu`` or a
    :class:`Hardware`); ``peak_tflops`` and ``bandwidth_tbs`` override its roofs."""
    check_choice("dtype", dtype, ROOFLINE_DTYPES)
    check_positive("batch_size", batch_size)
    if batch_size > MAX_BATCH:
        raise DeeprootsError(f"batch_size must be a whole number from 1 to {MAX_BATCH:,}; got "
                             f"{batch_size}")
    if isinstance(hardware, str):
        check_choice("device", hardware, ROOFLINE_DEVICES)
        hw = measure_cpu() if hardware == "cpu" else HARDWARE[hardware]
    else:
        hw = hardware
    peak = hw.peak_flops[dtype] if peak_tflops is None else \
        check_range("peak_tflops", peak_tflops, *PEAK_TFLOPS) * 1e12
    bw = hw.bandwidth if bandwidth_tbs is None else \
        check_range("bandwidth_tbs", bandwidth_tbs, *BANDWIDTH_TBS) * 1e12
    name = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
    if isinstance(model, nn.Module):  # a copy: the caller's model is not moved
        net = copy.deepcopy(model).to("meta")
    else:
        with torch.device("meta"):  # shapes only: no weights allocated, nothing computed
            net = build_model(model)
    net.eval()
    size = parse_input_size(input_size, net)
    macs = {c.name: c.macs for c in profile(net, size).layers}
    per_item = DTYPE_BYTES[dtype]
    result = Roofline(name, hw.name, dtype, batch_size, peak, bw)
    calls: Dict[str, List[int]] = {}

    def hook(mod, inputs, out, name):
        moved = sum(x.numel() for x in inputs if isinstance(x, torch.Tensor))
        moved += out.numel() if isinstance(out, torch.Tensor) else 0
        moved += sum(p.numel() for p in mod.parameters(recurse=False))
        m = macs.get(layer_name(name), 0) * batch_size if isinstance(
            mod, (nn.Conv2d, nn.Linear)) else 0
        calls.setdefault(name, [0, 0])
        calls[name][0] += m
        calls[name][1] += moved * per_item

    leaves = [(n, m) for n, m in net.named_modules()
              if n and not list(m.children()) and not isinstance(m, (nn.Identity, nn.Dropout))]
    with hooks(leaves, after=lambda n, mod, i, o: hook(mod, i, o, n)), torch.no_grad():
        net(torch.zeros(batch_size, *size, device="meta"))
    kinds = {n: type(m).__name__ for n, m in leaves}
    for layer, (m, moved) in calls.items():
        compute, memory = 2 * m / peak, moved / bw
        result.layers.append(LayerBound(layer, kinds[layer], m, moved, max(compute, memory),
                                        "compute" if compute >= memory else "memory"))
    return result


def format_roofline(r: Roofline, per_layer: bool = True) -> str:
    """A roofline as a readable table, with measured times and fractions where there are."""
    measured = r.measured_s is not None
    head = ("layer", "kind", "GMACs", "MB moved", "bound us", "limit") + (
        ("measured us", "of bound") if measured else ())
    rows = []
    for x in r.layers:
        row = (x.layer, x.kind, f"{x.macs / 1e9:.2f}" if x.macs else "", f"{x.bytes / 1e6:.1f}",
               f"{1e6 * x.bound_s:.1f}", x.limit)
        if measured:
            row += (f"{1e6 * x.measured_s:.1f}" if x.measured_s is not None else "",
                    f"{100 * x.fraction:.0f}%" if x.fraction else "")
        rows.append(row)
    peak = (f"{r.peak_flops / 1e12:.0f} TFLOP/s" if r.peak_flops >= 1e13 else
            f"{r.peak_flops / 1e12:.3g} TFLOP/s")  # a CPU's: 0.0761, not 0
    lines = [f"{r.model}: batch {r.batch_size}, {r.dtype} on {r.hardware} (peak {peak}, "
             f"{r.bandwidth / 1e12:.3g} TB/s)"]
    if per_layer:
        lines.append(format_table(head, rows, align="llrrrl" + ("rr" if measured else "")))
    memory = sum(x.bound_s for x in r.layers if x.limit == "memory")
    lines.append(f"bound: {1e3 * r.unfused_s:.3f} ms unfused (every layer), "
                 f"{1e3 * r.fused_s:.3f} ms with elementwise layers fused into the convs; "
                 f"{100 * memory / max(r.unfused_s, 1e-30):.0f}% of it memory-bound")
    if measured:
        lines.append(f"measured: {1e3 * r.measured_s:.3f} ms, {100 * r.unfused_s / r.measured_s:.0f}% "
                     f"of the unfused bound")
    return "\n".join(lines)
