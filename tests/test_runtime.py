"""Atomic writes and device names."""
import pytest

from deeproots.runtime import atomic_write, check_device


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
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda; got 'tpu'"):
        check_device("tpu")
    with pytest.raises(ValueError, match="device must be cpu or cuda; got 'auto'"):
        check_device("auto", accepted=("cpu", "cuda"))
