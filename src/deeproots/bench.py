"""Timing, the one way deeproots measures speed: models interleaved in one process
(A, B, A, B, ...) after a warm-up, so drift in the machine's speed hits every model alike,
and the median of the repeats reported with its spread."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Timing", "interleaved", "train_step_fn", "bench_models", "format_bench"]


@dataclass
class Timing:
    """Seconds per call of one workload over the repeats; ``images`` per call."""

    name: str
    seconds: List[float]
    images: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats."""
        return (max(self.seconds) - min(self.seconds)) / self.median_s

    @property
    def images_per_s(self) -> float:
        return self.images / self.median_s

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.median_s / self.images


def interleaved(workloads: Dict[str, Callable[[], None]], images: int, repeats: int = 5,
                warmup: int = 2) -> Dict[str, Timing]:
    """Time each workload ``repeats`` times, taking turns, after ``warmup`` untimed rounds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in workloads.values():
            fn()
    seconds: Dict[str, List[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        for name, fn in workloads.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - t0)
    return {name: Timing(name, s, images) for name, s in seconds.items()}


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  lr: float = 0.01) -> Callable[[], None]:
    """One SGD training step (forward, backward, update) of ``model`` on a fixed batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


MODES = ("inference", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bench_models(names: Sequence[str], *, batch_size: int = 128, device: str = "cpu",
                 threads: Optional[int] = None, dtype: str = "float32",
                 paths: Sequence[str] = ("fold",), modes: Sequence[str] = ("inference",),
                 repeats: int = 10, warmup: int = 3, input_size=None,
                 progress: bool = False) -> List[dict]:
    """Time models the paper's way (footnote 1: per image, forward pass, large batch).

    For each path and mode, the models take turns in one process; each row gives ms per
    image (median of ``repeats``), the spread, the speedup over the first model, the ideal
    speedup from multiply-adds, and the achieved GFLOP/s (2 x multiply-adds / time).
    ``modes`` may add ``"train"``: one SGD step (forward, backward, update), eager."""
    from .deploy import PATHS, build_path
    from .layers import check_positive
    from .runtime import resolve_device
    from .profile import parse_input_size, profile
    from .registry import create_model, model_entry

    if not names:
        raise ValueError("name at least one model to time")
    for name in names:
        model_entry(name)  # unknown names fail before anything is built
    check_positive("batch size", batch_size)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"unknown path {p!r}; accepted: {', '.join(PATHS)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; accepted: {', '.join(MODES)}")
    device = str(resolve_device(device, accepted=("cpu", "cuda")))
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {n: create_model(n).eval().to(device) for n in names}
    first = models[names[0]]
    size = parse_input_size(input_size, first)
    x = torch.randn(batch_size, *size, device=device)
    y = torch.randint(0, first.num_classes, (batch_size,), device=device)
    macs = {n: profile(m, size).macs for n, m in models.items()}
    rows = []
    for mode in modes:
        for path in (paths if mode == "inference" else ["eager"]):
            if mode == "inference":
                built = {n: build_path(m, x, path, DTYPES[dtype]) for n, m in models.items()}
                work = {n: (lambda f=f: f(x)) for n, f in built.items()}
            else:
                work = {n: train_step_fn(m, x, y) for n, m in models.items()}
            timings = interleaved(work, batch_size, repeats, warmup)
            base = timings[names[0]].median_s
            for n in names:
                t = timings[n]
                factor = 3 if mode == "train" else 1  # backward costs about twice the forward
                rows.append({
                    "model": n, "mode": mode, "path": path, "dtype": dtype, "device": device,
                    "batch_size": batch_size, "threads": torch.get_num_threads(),
                    "ms_per_image": t.ms_per_image, "spread": t.spread,
                    "speedup": base / t.median_s, "ideal_speedup": macs[names[0]] / macs[n],
                    "gflops": 2 * factor * macs[n] * batch_size / t.median_s / 1e9,
                    "macs": macs[n],
                })
            for m in models.values():
                m.eval()
    return rows


def format_bench(rows: List[dict]) -> str:
    """Bench rows as a readable table."""
    from .profile import format_table

    head = ("model", "mode", "path", "ms/img", "spread", "speedup", "ideal", "GFLOP/s")
    body = [(r["model"], r["mode"], r["path"], f"{r['ms_per_image']:.3f}",
             f"{100 * r['spread']:.0f}%", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
             f"{r['gflops']:.0f}") for r in rows]
    r0 = rows[0]
    title = (f"batch {r0['batch_size']}, {r0['dtype']}, {r0['device']}, {r0['threads']} "
             f"threads, torch {torch.__version__}")
    return title + "\n" + format_table(head, body, align="lllrrrrr")
