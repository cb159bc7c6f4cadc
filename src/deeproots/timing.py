"""The one way deeproots measures speed: workloads interleaved in one process (A, B, A, B,
...) after a warm-up, so drift in the machine's speed hits every workload alike, and the
median of the repeats reported with its spread. The ground floor under ``bench`` and
``deploy``."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

from .checks import check_positive, check_whole

__all__ = ["Timing", "interleaved"]


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

    def to_dict(self) -> dict:
        """The repeats and the derived figures, JSON-ready."""
        return {**asdict(self), "median_s": self.median_s, "spread": self.spread,
                "ms_per_image": self.ms_per_image}


def interleaved(workloads: Dict[str, Callable[[], None]], images: int, repeats: int = 5,
                warmup: int = 2) -> Dict[str, Timing]:
    """Time each workload ``repeats`` times, taking turns, after ``warmup`` untimed rounds."""
    check_positive("repeats", repeats)
    check_whole("warmup", warmup)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in workloads.values():
            fn()
    seconds: Dict[str, List[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        for name, fn in workloads.items():
            sync()  # GPU work is asynchronous: start and stop on an idle queue
            t0 = time.perf_counter()
            fn()
            sync()
            seconds[name].append(time.perf_counter() - t0)
    return {name: Timing(name, s, images) for name, s in seconds.items()}
