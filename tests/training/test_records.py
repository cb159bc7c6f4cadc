"""A run a person can watch: step records every --log-every steps (and every 30 s) in
metrics.jsonl, curves.png and TensorBoard, continued by a resumed run without gaps or
duplicates; and the step's memory layout, kept on resume."""
import json
import os
import signal

import pytest
import torch

from deeproots.cli import main
from deeproots.training.loop import Interrupted, train
from deeproots.training.checkpoint import load_checkpoint
from helpers import train_cfg, write_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_mnist(folder, n_train=64, n_test=32, size=8)  # 4 steps of 16 an epoch
    return folder


def _records(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "images_per_s", "epoch_s",
                                                      "compile_s")} for r in records]


def test_step_records_every_n_steps_by_hand(data_dir, tmp_path):
    losses = []
    train(train_cfg(data_dir, tmp_path, epochs=2, log_every=2),
          callbacks=[lambda info: losses.append(info["loss"])])
    records = _records(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("step", 2), ("step", 4), ("epoch", 4), ("step", 6), ("step", 8), ("epoch", 8)]
    steps = [r for r in records if r["kind"] == "step"]
    # each record: the mean loss of its two steps (every batch holds 16 images)
    for r, pair in zip(steps, (losses[0:2], losses[2:4], losses[4:6], losses[6:8])):
        assert r["train_loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)
        assert r["images_per_s"] > 0 and 0 < r["lr"] <= 0.05
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("kind,epoch,step")  # the epochs only
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_record_at_least_every_30_seconds(data_dir, tmp_path, monkeypatch):
    import deeproots.training.loop as T

    monkeypatch.setattr(T, "LOG_EVERY_S", 0.0)  # every step is 30 s late
    train(train_cfg(data_dir, tmp_path, epochs=1, log_every=1000))
    assert [r["step"] for r in _records(tmp_path) if r["kind"] == "step"] == [1, 2, 3, 4]


def test_a_resumed_run_continues_its_records_without_gaps_or_duplicates(data_dir, tmp_path):
    train(train_cfg(data_dir, tmp_path / "a", epochs=3, log_every=3, tensorboard=True,
                    memory_format="channels-last"))

    def stop_at_step_6(info):
        if info["global_step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(train_cfg(data_dir, tmp_path / "b", epochs=3, log_every=3, tensorboard=True,
                        memory_format="channels-last"), callbacks=[stop_at_step_6])
    # a step record appended after the checkpoint, as a crash would leave it
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 9, "trai')
    train(train_cfg(data_dir, tmp_path / "b", epochs=3, log_every=3, tensorboard=True,
                    memory_format="channels-last", resume=True))
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [(r["kind"], r["step"]) for r in b] == [
        ("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8), ("step", 9), ("step", 12),
        ("epoch", 12)]
    assert _untimed(b) == _untimed(a)  # the same records, value for value
    # interrupted and uninterrupted channels-last runs end with identical weights
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in ("a", "b"):
        events = EventAccumulator(str(tmp_path / run / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("step/train_loss")] == [3, 6, 9, 12]
        assert [e.step for e in events.Scalars("epoch/test_top1")] == [4, 8, 12]


def test_the_layout_is_recorded_and_kept_on_resume(data_dir, tmp_path):
    summary = train(train_cfg(data_dir, tmp_path / "auto", epochs=1))
    assert summary.memory_format == "channels-last"  # auto, on the CPU too
    train(train_cfg(data_dir, tmp_path / "nchw", epochs=1, memory_format="contiguous"))
    assert load_checkpoint(tmp_path / "nchw" / "last.pt")["memory_format"] == "contiguous"
    resumed = train(train_cfg(data_dir, tmp_path / "nchw", epochs=2, resume=True,
                              change=["epochs"]))  # memory_format auto: the run's own
    assert resumed.memory_format == "contiguous"


def test_plot_results_draws_runs_side_by_side(data_dir, tmp_path, capsys):
    for seed in (0, 1):
        train(train_cfg(data_dir, tmp_path / f"r{seed}", epochs=1, log_every=2, seed=seed))
    out = tmp_path / "curves.png"
    assert main(["plot-results", str(tmp_path / "r0" / "summary.json"),
                 str(tmp_path / "r1" / "summary.json"), "--curves", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bench_times_both_layouts_side_by_side():
    from deeproots.speed.bench import bench_models

    rows = bench_models(["nin", "nin-root-8"], batch_size=2, modes=["train"], repeats=1,
                        warmup=0, input_size=(3, 8, 8),
                        memory_formats=["contiguous", "channels-last"])
    assert [r.path for r in rows] == ["eager/contiguous"] * 2 + ["eager/channels-last"] * 2


def test_tensorboard_without_the_package_is_one_line_and_writes_nothing(data_dir, tmp_path,
                                                                        monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    out = tmp_path / "run"
    rc = main(["train", "nin", "--data-dir", str(data_dir), "--out", str(out), "--epochs",
               "1", "--batch-size", "16", "--device", "cpu", "--tensorboard", "--no-progress",
               "--allocator", "system"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--tensorboard needs the tensorboard package" in err[0]
    assert not out.exists()
