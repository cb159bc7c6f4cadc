"""The one way deeproots measures speed: workloads interleaved in one process (A, B, A, B,
...) after a warm-up, so drift in the machine's speed hits every workload alike, and the
median of the repeats reported with its spread. The ground floor under ``bench`` and
``deploy``."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..checks import check_positive, check_whole

__all__ = ["Timing", "interleaved", "Mark", "UNRELIABLE_SPREAD", "EVENT_MIN_S", "EVENT_MAX_CALLS"]

WARMUP_S_GPU = 1.0  # the least warm-up, in seconds, whatever the rounds asked for
WARMUP_S_CPU = 0.5
UNRELIABLE_SPREAD = 0.5  # (max - min) / median above which a figure is flagged


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


EVENT_MIN_S = 1e-3  # a GPU timing interval at least this long: host launch latency
# (microseconds) is then a small part of it
EVENT_MAX_CALLS = 200  # calls back to back per pair of events, at most


def interleaved(workloads: Dict[str, Callable[[], None]], images: int, repeats: int = 5,
                warmup: int = 2, warmup_s: float | None = None,
                cuda: bool | None = None, device=None,
                calls: Optional[int] = None) -> Dict[str, Timing]:
    """Time each workload ``repeats`` times, taking turns, after ``warmup`` untimed rounds.

    The warm-up also lasts at least ``warmup_s`` seconds, whatever ``warmup`` says: by
    default 1 with ``cuda=True`` (clocks ramp up, cuDNN tunes its algorithms) and 0.5 on
    the CPU (oneDNN creates its primitives, the allocator settles; a batch of 2 timed after
    one warm-up call once read 40x its steady time). ``cuda=True`` (the workloads run on
    the GPU): each repeat is ``calls`` calls back to back between two CUDA events on
    ``device``'s current stream (default: the current GPU), after the queue is drained, and
    its seconds are divided by ``calls``: one call of a kernel that runs for microseconds
    between two events measures the host's launch latency, not the kernel; back to back,
    the host runs ahead and the GPU stays busy. ``calls=None``: as many as make the interval
    at least :data:`EVENT_MIN_S` (from the last warm-up call, at most
    :data:`EVENT_MAX_CALLS`). Otherwise each call is timed by the host clock, the GPU (if
    any) synchronised around it."""
    check_positive("repeats", repeats)
    check_whole("warmup", warmup)
    events = bool(cuda)
    cuda = torch.cuda.is_available()
    gpu = torch.device(device) if device is not None and torch.device(device).type == "cuda" \
        else None
    sync = (lambda: torch.cuda.synchronize(gpu)) if cuda else (lambda: None)
    warmup_s = (WARMUP_S_GPU if events else WARMUP_S_CPU) if warmup_s is None else warmup_s
    started = time.perf_counter()
    rounds = 0
    while rounds < warmup or time.perf_counter() - started < warmup_s:
        for fn in workloads.values():
            fn()
        rounds += 1
        sync()
    per_pair = {name: calls or 1 for name in workloads}
    if events and calls is None:  # enough calls per pair to fill EVENT_MIN_S
        for name, fn in workloads.items():
            one = _time_call(fn, sync, True, gpu, 1)
            per_pair[name] = max(1, min(EVENT_MAX_CALLS, math.ceil(EVENT_MIN_S / max(one,
                                                                                     1e-9))))
    seconds: Dict[str, List[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        for name, fn in workloads.items():
            seconds[name].append(_time_call(fn, sync, events, gpu, per_pair[name]))
    return {name: Timing(name, s, images) for name, s in seconds.items()}


def _time_call(fn: Callable[[], None], sync: Callable[[], None], events: bool,
               gpu=None, calls: int = 1) -> float:
    """Seconds of one call of ``fn``: ``calls`` calls timed together, divided by ``calls``."""
    if not events:
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls
    sync()  # start on an idle queue
    stream = torch.cuda.current_stream(gpu)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(calls):
        fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1000 / calls


class Mark:
    """A point in time on ``device``'s queue (a CUDA event on that GPU's current stream,
    whichever GPU is current) or the host's clock."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.t = 0.0

    def record(self) -> None:
        if self.cuda:
            self.event.record(torch.cuda.current_stream(self.device))
        else:
            self.t = time.perf_counter()

    def seconds_to(self, later: "Mark") -> float:
        if self.cuda:
            later.event.synchronize()
            return self.event.elapsed_time(later.event) / 1000
        return later.t - self.t
