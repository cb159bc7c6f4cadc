"""What the library needs to know of the process it runs in: the device, the memory
allocator, and how to write a file so that a crash never leaves half of it.

Torch is imported only inside :func:`resolve_device`, so that the command line can re-run
itself under jemalloc (:func:`use_fast_allocator`) before paying for ``import torch``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from .errors import DeeprootsError
from .checks import check_device

__all__ = ["check_device", "resolve_device", "allocator", "atomic_write", "write_text",
           "write_json", "to_json", "check_output_dir", "check_output_file", "openvino_refusal",
           "jemalloc_path", "use_fast_allocator", "keep_freed_memory", "ALLOCATORS",
           "JEMALLOC", "file_digest", "bytes_free",
           "check_batch_fits", "memory_size"]

JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
            "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
            "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# jemalloc configured as PyTorch's CPU launcher does: keep freed pages instead of handing
# them back to the kernel and page-faulting them in again on every batch
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:-1,muzzy_decay_ms:-1")
# --allocator: auto (jemalloc where installed, else glibc keeping freed memory), jemalloc,
# glibc (malloc told to keep freed memory: keep_freed_memory), system (as the process started)
ALLOCATORS = ("auto", "jemalloc", "glibc", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_KEPT = []  # set once keep_freed_memory has told glibc's malloc to keep freed memory


def resolve_device(name: str, accepted: Sequence[str] = ("auto", "cpu", "cuda")):
    """The torch device for ``name`` (``auto``: a GPU where there is one). Under torchrun,
    ``cuda`` is this process's GPU (``LOCAL_RANK``). ValueError for a name not accepted, or
    for cuda on a machine without one. Changes no global state."""
    import torch  # heavy: imported here so that the allocator re-exec can come first

    check_device(name, accepted)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeeprootsError("device 'cuda' was asked for, but this machine has no CUDA GPU "
                                 "(or this torch build has no CUDA); use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        name = f"cuda:{local}" if name == "cuda" else name
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise DeeprootsError(f"device {name!r}: this machine has {torch.cuda.device_count()} "
                                 f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def bytes_free(device) -> Optional[int]:
    """The memory free for tensors on ``device`` (a torch device or its name), in bytes: the
    GPU's free memory, or the machine's available memory (``MemAvailable``); None where it
    cannot be read."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_size(n: float) -> str:
    """``n`` bytes as a person reads it: GiB from 1 GiB, MiB from 1 MiB, else KiB."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_batch_fits(per_image: int, batch: int, device, doing: str) -> None:
    """A one-line error when ``batch`` images of ``per_image`` bytes of activations (see
    ``Profile.activation_bytes``) need more than ``device`` has free: on a CPU the kernel
    would kill the process part-way, with no message. ``doing``: what the batch is for
    (``"train nin"``, ``"time nin"``)."""
    free = bytes_free(device)
    if free and per_image * batch > free:
        fits = max(1, free // max(1, per_image))
        raise DeeprootsError(f"batch size {batch} needs about {memory_size(per_image * batch)} "
                             f"of activations to {doing}; {memory_size(free)} is free on "
                             f"{device}. The largest batch that fits is about {fits}")


def file_digest(path: str) -> Optional[str]:
    """The SHA-256 of a file (None if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def allocator() -> str:
    """``"jemalloc"`` when this process preloads it (LD_PRELOAD), ``"glibc-kept"`` once
    :func:`keep_freed_memory` has tuned glibc's malloc, else ``"system"``."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return "jemalloc"
    return "glibc-kept" if _KEPT else "system"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc, in this process, to keep the memory it frees instead of handing
    it back to the kernel: no allocation served by ``mmap`` (each large tensor would be
    unmapped when freed and page-faulted in again on the next batch) and no trimming of
    the heap (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``). What
    jemalloc with PyTorch's ``MALLOC_CONF`` does, where jemalloc is not installed (a
    conversion of nin: 35 s -> 23 s, the system time 24 s -> 2 s; docs/speed.md); the
    process keeps its peak memory until it exits. Returns False (nothing done) where the C
    library is not glibc or jemalloc is preloaded."""
    if _KEPT:
        return True
    if allocator() == "jemalloc" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return False
    _KEPT.append(True)
    return True


def openvino_refusal() -> Optional[str]:
    """Why OpenVINO cannot run in this process, or None: it aborts the whole process
    ("double free or corruption") under a preloaded jemalloc."""
    if allocator() == "jemalloc":
        return ("path 'openvino' aborts the process under a preloaded jemalloc (LD_PRELOAD); "
                "run it with the system allocator (--allocator system)")
    return None


def jemalloc_path() -> Optional[str]:
    """The installed libjemalloc.so.2, or None."""
    return next((p for p in JEMALLOC if os.path.exists(p)), None)


def use_fast_allocator(argv: List[str], wanted: str, paths: Sequence[str] = (),
                       script: Optional[str] = None) -> None:
    """The allocator ``wanted`` (:data:`ALLOCATORS`) for this command: ``"jemalloc"`` (or
    ``"auto"`` where it is installed) re-runs the command in place (exec) with jemalloc
    preloaded; ``"glibc"`` (or ``"auto"`` without jemalloc) keeps glibc's malloc and tells
    it to keep freed memory (:func:`keep_freed_memory`); ``"system"`` changes nothing. A
    user's own ``LD_PRELOAD`` is kept (jemalloc goes in front of it). ``paths`` are the
    inference paths the command will run: OpenVINO aborts under jemalloc, so ``"auto"``
    keeps glibc for it. ``script``: a Python file run with ``argv`` (a benchmark) instead
    of ``deeproots ARGV``. docs/speed.md has the figures."""
    if wanted == "system" or allocator() == "jemalloc":
        return
    if wanted == "glibc":
        if not keep_freed_memory():
            raise DeeprootsError("--allocator glibc: this process's C library is not glibc "
                                 "(or its malloc takes no mallopt); use --allocator auto or "
                                 "system")
        return
    lib = jemalloc_path()
    if "openvino" in paths:
        if wanted == "jemalloc":
            raise DeeprootsError("--path openvino cannot run under jemalloc (OpenVINO aborts with "
                                 "'double free or corruption'); use --allocator glibc or system")
        lib = None  # auto: OpenVINO needs glibc's malloc
    if lib is None:
        if wanted == "jemalloc":
            raise DeeprootsError("--allocator jemalloc: libjemalloc.so.2 not found in "
                                 f"{', '.join(JEMALLOC)}; on Debian: apt-get install libjemalloc2")
        keep_freed_memory()
        return
    preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    env = dict(os.environ, LD_PRELOAD=preload,
               MALLOC_CONF=os.environ.get("MALLOC_CONF", JEMALLOC_CONF))
    sys.stdout.flush()
    sys.stderr.flush()
    command = [script] if script else ["-m", "deeproots"]
    os.execve(sys.executable, [sys.executable, *command, *argv], env)


def reexec_with_jemalloc(argv: List[str], wanted: str, paths: Sequence[str] = (),
                         script: Optional[str] = None) -> None:
    """The old name of :func:`use_fast_allocator` (for this release, with a
    DeprecationWarning)."""
    import warnings

    warnings.warn("deeproots.runtime.reexec_with_jemalloc is now use_fast_allocator (the old "
                  "name goes in the next release)", DeprecationWarning, stacklevel=2)
    use_fast_allocator(argv, wanted, paths, script)


def _disk_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err``: itself, or one it was raised from or during. torch.save
    reports a full disk as a RuntimeError ("unexpected pos") raised while handling the
    file's OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: Path | str, write: Callable[[Any], None], by_path: bool = False
                 ) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder,
    flushed to disk, then renamed over ``path``: a crash leaves the old file or the new one
    (and a temporary file a killed process left is removed by the next write to that
    folder). ``by_path``: ``write`` takes the temporary file's path instead (for writers
    that open files themselves). If ``write`` raises, the temporary file is removed and
    ``path`` is untouched. A full disk, a missing folder or one that cannot be written is a
    one-line OSError naming ``path`` (the temporary file's name is short, so any valid
    ``path`` has a valid one)."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".deeproots-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        if by_path:
            write(str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001  (torch wraps the file's OSError in others)
        cause = _disk_error(err)
        if cause is None or cause.errno is None:  # not the disk's (e.g. a download's)
            raise
        if cause.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device to write {path}; the "
                                        f"old file, if any, is kept") from None
        if cause.errno == errno.ENOENT and not path.parent.is_dir():
            raise OSError(errno.ENOENT, f"cannot write {path}: the folder {path.parent} does "
                                        f"not exist") from None
        if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT):
            raise OSError(cause.errno, f"cannot write {path}: {os.strerror(cause.errno)}"
                          ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


# a temporary file of atomic_write: this version's name, and the one before it
_TEMPORARY = re.compile(r"^\.(?:deeproots-)?(\d+)-[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: Path | str) -> List[str]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its
    process was killed (kill -9, a power cut) before it could rename or remove them: those
    whose process is gone. Returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs) -> str:
    """Valid JSON (no bare NaN or Infinity: non-finite numbers become null)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def write_json(path: Path | str, value: Any) -> Path:
    """``value`` as indented, valid JSON, written atomically."""
    return write_text(path, to_json(value, indent=2) + "\n")


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_output_dir(path: Path | str, what: str = "--out") -> Path:
    """``path`` if it is, or can be made, a writable folder; a one-line ValueError if it is a
    file, lies under a file, or cannot be written. Creates nothing."""
    path = Path(path)
    probe = _nearest_existing(path)
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies under the file {probe}"
        raise DeeprootsError(f"{what} {path} {where}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DeeprootsError(f"{what} {path}: {probe} is not writable; give a folder you can "
                             f"write to")
    return path


def check_output_file(path: Path | str, what: str = "--out") -> Path:
    """``path`` if a file can be written there; a one-line ValueError if it is a folder,
    lies under a file, or its folder cannot be written. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise DeeprootsError(f"{what} {path} is a folder; give a file name, e.g. {path}/out.png")
    probe = _nearest_existing(path.parent)
    if probe.exists() and not probe.is_dir():
        raise DeeprootsError(f"{what} {path} lies under the file {probe}; give a path in a folder")
    if probe != path.parent:  # refused now, not after the work whose result it would hold
        raise DeeprootsError(f"{what} {path}: the folder {path.parent} does not exist; make it "
                             f"first (mkdir -p {path.parent}) or give a path in a folder that "
                             f"exists")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DeeprootsError(f"{what} {path}: {probe} is not writable; give a path you can "
                             f"write to")
    return path
