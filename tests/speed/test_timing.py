"""Other processes' share of the CPUs while something is timed: by hand from a /proc/stat
written here, and from a real busy process beside a sleeping one."""
import os
import subprocess
import sys
import time

import pytest

import deeproots.speed.timing as T
from deeproots.speed.bench import BenchRow, format_bench
from deeproots.speed.timing import OthersShare, busy_cpu_s, contention_note

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
linux = pytest.mark.skipif(not os.path.exists("/proc/stat") or not CPUS,
                           reason="reads /proc/stat")


def _stat(path, per_cpu):
    """A /proc/stat whose cpuN lines give each CPU ``per_cpu`` (user, nice, system, idle,
    iowait, irq, softirq, steal) ticks, with a machine-wide line and CPUs not ours."""
    lines = ["cpu  9 9 9 9 9 9 9 9 0 0"]
    lines += [f"cpu{c} " + " ".join(map(str, per_cpu)) + " 0 0" for c in CPUS]
    lines += [f"cpu{max(CPUS) + 1} 500 500 500 500 500 500 500 500 0 0", "intr 1 2 3"]
    path.write_text("\n".join(lines) + "\n")


@linux
def test_busy_seconds_are_user_nice_system_irq_softirq_and_steal(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, (100, 5, 50, 1000, 20, 3, 2, 7))  # idle 1000 and iowait 20 are not busy
    hz = os.sysconf("SC_CLK_TCK")
    assert busy_cpu_s(CPUS, str(stat)) == pytest.approx(len(CPUS) * 167 / hz)
    assert busy_cpu_s(CPUS, str(tmp_path / "none")) is None


@linux
def test_the_share_by_hand(tmp_path, monkeypatch):
    """2 s of wall time on each of our CPUs; the CPUs' busy ticks grow by 1.5 s each and
    this process used 0.5 s: others had (1.5 n - 0.5) / 2 n of them."""
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    _stat(stat, (100, 0, 0, 0, 0, 0, 0, 0))

    class Clock:
        wall, cpu = 10.0, 3.0

        def perf_counter(self):
            return self.wall

        def process_time(self):
            return self.cpu

    clock = Clock()
    monkeypatch.setattr(T, "time", clock)
    with OthersShare(str(stat)) as load:
        _stat(stat, (100 + int(1.5 * hz), 0, 0, 0, 0, 0, 0, 0))
        clock.wall, clock.cpu = 12.0, 3.5
    n = len(CPUS)
    assert load.share == pytest.approx((1.5 * n - 0.5) / (2 * n))
    with OthersShare(str(stat)) as short:  # 0.1 s: too few ticks to tell
        clock.wall += 0.1 / n
    assert short.share is None


@linux
def test_a_busy_process_beside_a_sleeping_one_is_seen():
    """A child spinning for 1.5 s while this process sleeps: it alone holds one CPU of ours
    (more where other work runs too), so others held at least about 1/n of them."""
    spin = ("import os, time\nos.sched_setaffinity(0, {%d})\nend = time.time() + 1.5\n"
            "while time.time() < end: pass\n" % CPUS[0])
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # the child started
        with OthersShare() as load:
            time.sleep(1.0)
    finally:
        child.wait()
    assert load.share is not None and load.share >= 0.7 / len(CPUS)


def test_interleaved_timings_carry_the_share():
    got = T.interleaved({"a": lambda: time.sleep(0.01)}, images=1, repeats=2, warmup=0,
                        warmup_s=0)
    assert got["a"].others is None  # 0.02 s: too short to tell


def _row(others):
    return BenchRow("nin", "inference", "fold", "float32", "cpu", 8, 2, 1.0, 0.1, 1.0, 1.0,
                    1.0, 1, "jemalloc", others=others)


def test_bench_says_when_the_machine_was_loaded():
    loaded = format_bench([_row(0.48)])
    assert "other processes used 48% of the CPUs while these figures were timed" in loaded
    assert "other processes" not in format_bench([_row(0.05)])
    assert "other processes" not in format_bench([_row(None)])
    assert contention_note(0.10) is None and contention_note(0.11) is not None
