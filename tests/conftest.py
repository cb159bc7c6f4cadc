import os

import pytest
import torch

if not torch.cuda.is_available():
    # GPU kernels run on the CPU through Triton's interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
