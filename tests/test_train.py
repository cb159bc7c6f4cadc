"""Training end to end on small Fashion-MNIST-format files: learning, checkpoints, resume,
divergence, records, evaluation and data-parallel runs."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeproots.cli import main
from deeproots.train import (CheckpointError, Interrupted, TrainConfig, TrainingDiverged,
                             load_checkpoint, lr_at, train)
from helpers import write_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_mnist(folder, n_train=64, n_test=32, size=8)
    return folder


def _cfg(data_dir, out, **kw):
    base = dict(model="nin-root-4", data="fashion-mnist", data_dir=str(data_dir), out=str(out),
                epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5, device="cpu",
                progress=False, download=False)
    base.update(kw)
    return TrainConfig(**base)


def test_learns_the_stripe_rule(data_dir, tmp_path):
    summary = train(_cfg(data_dir, tmp_path, epochs=6))
    assert summary["top1"] >= 0.75  # chance is 0.25
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,lr,train_loss") and len(csv_lines) == 7
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("model", "macs", "params", "top1", "top5", "wall_s", "train_images_per_s",
                "device", "versions"):
        assert key in saved
    assert saved["macs"] > 0 and saved["versions"]["torch"] == torch.__version__
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint loads with weights_only=True, and eval reports the same accuracy
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 6 and state["model_cfg"]["name"] == "nin-root-4"
    rc = main(["eval", str(tmp_path / "last.pt"), "--data-dir", str(data_dir), "--json",
               "--no-download", "--device", "cpu"])
    assert rc == 0


def test_eval_json(data_dir, tmp_path, capsys):
    train(_cfg(data_dir, tmp_path, epochs=1))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "last.pt"), "--data-dir", str(data_dir), "--json",
                 "--device", "cpu", "--no-download"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert metrics["n"] == 32
    assert metrics["top1"] == pytest.approx(summary["top1"])
    assert metrics["top5"] == pytest.approx(summary["top5"])
    assert metrics["loss"] == pytest.approx(summary["loss"], rel=1e-5)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(data_dir, tmp_path):
    reference = train(_cfg(data_dir, tmp_path / "a", epochs=3))

    def sigterm_at_step_6(info):  # epoch 2 (index 1), mid-epoch
        if info["global_step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as stop:
        train(_cfg(data_dir, tmp_path / "b", epochs=3), callbacks=[sigterm_at_step_6])
    assert stop.value.signum == signal.SIGTERM
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = train(_cfg(data_dir, tmp_path / "b", epochs=3, resume=True))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["top1"] == reference["top1"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_ctrl_c_in_a_subprocess_leaves_a_resumable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deeproots", "train", "nin-root-4", "--data-dir", str(data_dir),
           "--epochs", "200", "--batch-size", "16", "--out", str(out), "--device", "cpu",
           "--no-download", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for a finished epoch, then interrupt the next one
        if line.startswith("epoch 2/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Resume with: deeproots train nin-root-4" in err
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] >= 2 and state["config"]["epochs"] == 200


def test_nan_loss_stops_with_epoch_and_step(data_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at epoch \d+, step \d+.*lower --lr"):
        train(_cfg(data_dir, tmp_path, epochs=3, lr=1e12, warmup_epochs=0))
    # no checkpoint of the diverged state; any that exists is from a finished epoch
    if (tmp_path / "last.pt").exists():
        state = load_checkpoint(tmp_path / "last.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values()
                   if v.is_floating_point())


def test_corrupt_checkpoint(tmp_path, data_dir):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="last.pt is corrupt or not a PyTorch file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        train(_cfg(data_dir, tmp_path, resume=True))
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a deeproots checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_lr_schedule_by_hand():
    cfg = TrainConfig(epochs=4, lr=0.4, warmup_epochs=1, schedule="cosine")
    assert lr_at(cfg, 0, 10) == pytest.approx(0.04)
    assert lr_at(cfg, 9, 10) == pytest.approx(0.4)
    assert lr_at(cfg, 10, 10) == pytest.approx(0.4)
    assert lr_at(cfg, 25, 10) == pytest.approx(0.2)  # half-way through the cosine
    assert lr_at(cfg, 39, 10) < 0.002
    step = TrainConfig(epochs=4, lr=0.4, warmup_epochs=0, schedule="step")
    assert [lr_at(step, s, 10) for s in (0, 19, 20, 30)] == pytest.approx([0.4, 0.4, 0.04, 0.004])


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be a whole number >= 1; got 0"),
    ({"batch_size": -2}, "batch_size must be"),
    ({"schedule": "linear"}, "schedule must be one of cosine, step; got 'linear'"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda; got 'tpu'"),
    ({"data": "mnist"}, "unknown data 'mnist'; accepted: fashion-mnist, cifar10"),
    ({"batch_size": 1000}, "batch size 1000 is larger than the training set"),
])
def test_bad_settings(data_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train(_cfg(data_dir, tmp_path, **kwargs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_machine(data_dir, tmp_path, capsys):
    assert main(["train", "nin", "--device", "cuda", "--data-dir", str(data_dir),
                 "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_agree_with_one(data_dir, tmp_path):
    """torchrun, 2 CPU processes on loopback, global batch 16 (8 each) against 1 process.
    Batch norm sees 8 images per process instead of 16, so the runs differ a little."""
    args = ["train", "nin-root-4", "--data-dir", str(data_dir), "--epochs", "2",
            "--batch-size", "16", "--lr", "0.05", "--warmup-epochs", "0.5", "--device", "cpu",
            "--no-download", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "deeproots",
           *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = train(_cfg(data_dir, tmp_path / "one", epochs=2))
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    # Stated tolerance: every conv and linear weight within 10% (relative L2) of the
    # single-process run (measured: at most 4.5%). With 1 process torchrun gives identical
    # weights; with 2 the difference is batch norm over 8 images per process instead of 16.
    for key in a:
        if a[key].is_floating_point() and a[key].dim() > 1:
            assert (a[key] - b[key]).norm() / a[key].norm() < 0.10, key
    assert abs(ddp["loss"] - single["loss"]) < 0.1 * single["loss"] + 0.05
