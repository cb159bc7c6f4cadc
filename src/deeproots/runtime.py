"""What the library needs to know of the process it runs in: the device, the memory
allocator, and how to write a file so that a crash never leaves half of it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import torch

__all__ = ["check_device", "resolve_device", "allocator", "atomic_write"]


def check_device(name: str, accepted: Sequence[str] = ("auto", "cpu", "cuda")) -> None:
    """ValueError unless ``name`` is one of ``accepted`` (or ``cuda:N`` when cuda is)."""
    if name in accepted or ("cuda" in accepted and str(name).startswith("cuda:")):
        return
    listed = ", ".join(accepted[:-1]) + f" or {accepted[-1]}" if len(accepted) > 1 else accepted[0]
    raise ValueError(f"device must be {listed}; got {name!r}")


def resolve_device(name: str, accepted: Sequence[str] = ("auto", "cpu", "cuda")) -> torch.device:
    """The torch device for ``name`` (``auto``: a GPU where there is one). Under torchrun,
    ``cuda`` is this process's GPU (``LOCAL_RANK``). ValueError for a name not accepted, or
    for cuda on a machine without one."""
    check_device(name, accepted)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but this machine has no CUDA GPU "
                             "(or this torch build has no CUDA); use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        name = f"cuda:{local}" if name == "cuda" else name
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def allocator() -> str:
    """``"jemalloc"`` when this process preloads it (LD_PRELOAD), else ``"system"``."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder,
    flushed to disk, then renamed over ``path``: a crash leaves the old file or the new one.
    If ``write`` raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
