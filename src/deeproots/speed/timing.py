"""The one way deeproots measures speed: workloads interleaved in one process (A, B, A, B,
...) after a warm-up, so drift in the machine's speed hits every workload alike, and the
median of the repeats reported with its spread, and the share of the CPUs other processes
held meanwhile (:class:`OthersShare`: drift is evened out, another process's load is not).
The ground floor under ``bench`` and ``deploy``."""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..checks import check_positive, check_whole

__all__ = ["Timing", "interleaved", "Mark", "UNRELIABLE_SPREAD", "EVENT_MIN_S", "EVENT_MAX_CALLS",
           "OthersShare", "CONTENDED", "contention_note"]

WARMUP_S_GPU = 1.0  # the least warm-up, in seconds, whatever the rounds asked for
WARMUP_S_CPU = 0.5
UNRELIABLE_SPREAD = 0.5  # (max - min) / median above which a figure is flagged
CONTENDED = 0.10  # other processes' share of this process's CPUs while timing, above which
# the figures are flagged: on this project's 2-core machine a training run beside the timing
# moved nin root-4's time from 0.67 of the dense model's to 0.80 (docs/speed.md)


@dataclass
class Timing:
    """Seconds per call of one workload over the repeats; ``images`` per call."""

    name: str
    seconds: List[float]
    images: int
    others: Optional[float] = None  # other processes' share of the CPUs while it was timed

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


class OthersShare:
    """How much of the CPUs this process may run on went to other processes (and, in a
    virtual machine, to other guests: the time the hypervisor stole) while the ``with``
    block ran: their busy time in ``/proc/stat`` less this process's own CPU time, over the
    block's wall time and the number of those CPUs. ``share`` is None where it cannot be
    known (no ``/proc/stat``, or a block too short for its 10 ms ticks to count).

        with OthersShare() as load:
            ...                           # the timed work
        load.share                        # e.g. 0.48: a training run beside it
    """

    MIN_CPU_S = 1.0  # the block's wall time x CPUs below which no share is given

    def __init__(self, stat: str = "/proc/stat"):
        self.stat = stat
        self.share: Optional[float] = None

    def __enter__(self) -> "OthersShare":
        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else []
        self._busy = busy_cpu_s(self._cpus, self.stat)
        self._own = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = busy_cpu_s(self._cpus, self.stat)
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall * len(self._cpus) < self.MIN_CPU_S:
            return
        others = (busy - self._busy) - (time.process_time() - self._own)
        self.share = min(1.0, max(0.0, others / (wall * len(self._cpus))))


def busy_cpu_s(cpus: Sequence[int], stat: str = "/proc/stat") -> Optional[float]:
    """Seconds the CPUs ``cpus`` have spent busy since boot (user, nice, system, irq,
    softirq and steal time of their ``cpuN`` lines in ``stat``), or None where it cannot
    be read."""
    wanted = {f"cpu{c}" for c in cpus}
    try:
        with open(stat) as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
        ticks = sum(sum(int(v) for i, v in enumerate(fields[1:9]) if i not in (3, 4))
                    for fields in lines if fields[0] in wanted)
    except (OSError, ValueError):
        return None
    if not wanted or not any(fields[0] in wanted for fields in lines):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def contention_note(share: Optional[float], what: str = "these figures") -> Optional[str]:
    """One line for a timing taken while other processes held more than :data:`CONTENDED`
    of the CPUs, or None."""
    if share is None or share <= CONTENDED:
        return None
    return (f"other processes used {100 * share:.0f}% of the CPUs while {what} were timed: "
            f"a loaded machine, whose ratios differ from a quiet one's; time again when "
            f"nothing else runs")


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
    with OthersShare() as load:
        for _ in range(repeats):
            for name, fn in workloads.items():
                seconds[name].append(_time_call(fn, sync, events, gpu, per_pair[name]))
    return {name: Timing(name, s, images, load.share) for name, s in seconds.items()}


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
