import os
import sys
from pathlib import Path

import pytest
import torch

# the tests' own helpers (helpers.py, zoo.py), for the test files in the folders below
sys.path.insert(0, str(Path(__file__).resolve().parent))

if not torch.cuda.is_available():
    # GPU kernels run on the CPU through Triton's interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _threads_per_worker():
    """Under pytest-xdist, each worker's share of the CPUs as its torch threads: two workers
    of two threads each on the 2-core machine oversubscribe it, and OpenMP's spinning
    threads then wait on each other (resnet200's forward and backward: 1 s alone, 31 s in
    the suite; the suite 5 to 10 minutes from one hour to the next)."""
    from deeproots.training.data import usable_cpus

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, usable_cpus() // workers))


_threads_per_worker()


def _interpret_without_overflow_checks():
    """The interpreter checks every integer add and multiply of a kernel for int32 overflow
    (an int64 recomputation and an assert per operation): 8x the time of a kernel test
    (measured: one 96->192 5x5 g16 forward+backward, 48 s -> 6 s). The tests' tensors are
    far too small to overflow; the 32-bit guard has tests of its own (test_kernels.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import dataclasses

        from triton.runtime import interpreter
    except ImportError:  # no Triton: the kernel tests skip themselves
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is not None and hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


_interpret_without_overflow_checks()


def _record_launches(path):
    """DEEPROOTS_RECORD_LAUNCHES=FILE: every kernel launch the tests make is appended to FILE
    (one JSON line: kernel, arguments with tensors as their dtype, constants) and then run as
    usual; benchmarks/gpu_plan.py counts the kernel variants a GPU would compile from it."""
    import json

    from deeproots.kernels.resources import KERNELS

    def encode(value):
        if isinstance(value, torch.Tensor):
            return {"tensor": str(value.dtype).removeprefix("torch.")}
        return value

    class Recording:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                with open(path, "a") as f:
                    f.write(json.dumps([self.name, [encode(a) for a in args],
                                        {k: encode(v) for k, v in kwargs.items()}]) + "\n")
                return launch(*args, **kwargs)
            return run

    for name, module in KERNELS.items():
        setattr(module, name, Recording(name, getattr(module, name)))


if os.environ.get("DEEPROOTS_RECORD_LAUNCHES"):
    _record_launches(os.environ["DEEPROOTS_RECORD_LAUNCHES"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
