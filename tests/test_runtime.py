"""Atomic writes, device names and the allocator."""
import json
import os
import platform
import subprocess
import sys

import pytest

from deeproots.errors import DeeprootsError
from deeproots.runtime import atomic_write, check_batch_fits, check_device


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write(path, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_device_names():
    check_device("cuda:1")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N; got 'tpu'"):
        check_device("tpu")
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N; got 'auto'"):
        check_device("auto", accepted=("cpu", "cuda"))
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N; got 'cpu:1'"):
        check_device("cpu:1")  # the help's cuda:N named in the message, as it is accepted


def test_a_batch_that_does_not_fit_names_the_largest_that_does(monkeypatch):
    """1 MiB an image, 100 MiB free: 100 images fit, 101 do not (one line, the numbers by
    hand); where free memory cannot be read, nothing is refused."""
    import deeproots.runtime as R

    monkeypatch.setattr(R, "bytes_free", lambda device: 100 * 2**20)
    check_batch_fits(2**20, 100, "cpu", "time m")
    with pytest.raises(ValueError, match=r"^batch size 101 needs about 101 MiB of activations "
                                         r"to time m; 100 MiB is free on cpu\. The largest "
                                         r"batch that fits is about 100$"):
        check_batch_fits(2**20, 101, "cpu", "time m")
    monkeypatch.setattr(R, "bytes_free", lambda device: None)
    check_batch_fits(2**20, 10**9, "cpu", "time m")


_FAULTS = r'''
import json, resource, sys
import torch
from deeproots import runtime

def faults():  # minor page faults over ten batches' worth of a 64 MiB activation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.empty(16 * 2**20)
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
plain = faults()
runtime.jemalloc_path = lambda: None  # a machine without jemalloc
def no_exec(*args):
    raise SystemExit("exec'd")
runtime.os.execve = no_exec
runtime.use_fast_allocator(sys.argv[1:], "auto", paths=("fold",))
faults()
print(json.dumps({"plain": plain, "kept": faults(), "allocator": runtime.allocator()}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux")
def test_without_jemalloc_freed_memory_is_kept_not_faulted_in_again():
    """A command on a machine without jemalloc (auto) tells glibc's malloc to keep what it
    frees: a 64 MiB tensor allocated and freed ten times costs 163,840 minor page faults
    (4 KiB pages) as glibc hands each back to the kernel, and none once kept (counted by
    the kernel: getrusage)."""
    done = subprocess.run([sys.executable, "-c", _FAULTS, "bench", "nin"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LD_PRELOAD": ""})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["allocator"] == "glibc-kept"
    assert got["plain"] > 10 * 16 * 2**20 * 4 // (2 * 2**20)  # over one fault per 2 MiB page
    assert got["kept"] < got["plain"] / 100


def test_openvino_keeps_glibc_and_glibc_is_refused_where_there_is_none(monkeypatch):
    from deeproots import runtime

    real = runtime.keep_freed_memory
    monkeypatch.setattr(runtime, "jemalloc_path", lambda: "/lib/libjemalloc.so.2")
    monkeypatch.setattr(runtime.os, "execve", lambda *a: pytest.fail("re-ran under jemalloc"))
    kept = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: kept.append(1) or True)
    runtime.use_fast_allocator(["bench", "nin"], "auto", paths=("openvino",))  # no exec
    assert kept == [1]  # glibc kept instead
    with pytest.raises(DeeprootsError, match="--path openvino cannot run under jemalloc .* "
                                             "use --allocator glibc or system"):
        runtime.use_fast_allocator(["bench", "nin"], "jemalloc", paths=("openvino",))
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: False)  # musl, macOS
    with pytest.raises(DeeprootsError, match="--allocator glibc: this process's C library is "
                                             "not glibc"):
        runtime.use_fast_allocator(["bench", "nin"], "glibc")
    monkeypatch.setattr(runtime, "_KEPT", [])
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", ""))
    assert real() is False and runtime.allocator() == "system"


def test_the_old_name_of_the_allocator_choice_still_works_and_warns(monkeypatch):
    from deeproots import runtime

    seen = []
    monkeypatch.setattr(runtime, "use_fast_allocator", lambda *a: seen.append(a))
    with pytest.warns(DeprecationWarning, match="now use_fast_allocator"):
        runtime.reexec_with_jemalloc(["list"], "system")
    assert seen == [(["list"], "system", (), None)]
