"""Atomic writes and device names."""
import pytest

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
