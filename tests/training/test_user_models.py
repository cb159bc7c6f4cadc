"""A model of the user's own through the whole tool: rootify on the command line, train,
resume, eval, bench and export from FILE.py:FUNCTION, and `train(model=...)`."""
import json

import pytest
import torch

import deeproots
from deeproots.cli import main
from deeproots.training.loop import CheckpointError, train
from deeproots.config import TrainConfig
from deeproots.training.checkpoint import load_checkpoint
from helpers import write_fashion_mnist

SOURCE = '''
import torch
from torch import nn


def small_cnn(num_classes=10, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
'''


@pytest.fixture()
def mine(tmp_path):
    (tmp_path / "mine.py").write_text(SOURCE)
    write_fashion_mnist(tmp_path / "data", n_train=32, n_test=16, size=8)
    return tmp_path, f"{tmp_path / 'mine.py'}:small_cnn"


def test_rootify_from_the_command_line(mine, capsys):
    _, spec = mine
    assert main(["rootify", spec, "--schedule", "root-4", "--input-size", "3,32,32",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = {r["layer"]: r["groups_after"] for r in report["layers"]}
    assert groups == {"0": 1, "3": 4, "7": 2}  # stem; 32x32 -> 4; 16x16 -> 2
    # 3x3 16 -> 32 at 32x32 in 4 groups, by hand
    assert {r["layer"]: r["macs_after"] for r in report["layers"]}["3"] == 32 * 32 * 32 * 4 * 9
    assert main(["rootify", spec, "--macs", "0.5", "--input-size", "3,32,32"]) == 0
    assert "rootify root-" in capsys.readouterr().out


def test_train_resume_eval_bench_export_a_model_of_your_own(mine, capsys):
    tmp, spec = mine
    out = tmp / "run"
    common = ["--data-dir", str(tmp / "data"), "--batch-size", "16", "--device", "cpu",
              "--no-download", "--no-progress", "--allocator", "system"]
    assert main(["train", spec, "--rootify", "root-4", "--epochs", "1", "--out", str(out),
                 *common]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["model_cfg"]["name"] == spec
    assert state["model_cfg"]["groups"] == {"3": 4, "7": 2}
    assert state["model_cfg"]["kwargs"] == {"num_classes": 10, "in_channels": 1}
    capsys.readouterr()
    # a checkpoint never makes deeproots run the code it names
    assert main(["eval", str(out / "last.pt"), "--device", "cpu", "--data-dir",
                 str(tmp / "data")]) == 2
    assert f"pass --model {spec}" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--allocator", "system"]) == 2
    assert f"resume with deeproots train {spec} --resume" in capsys.readouterr().err
    assert main(["train", spec, "--resume", "--out", str(out), "--change", "epochs",
                 "--epochs", "2", "--allocator", "system", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "last.pt"), "--model", spec, "--device", "cpu",
                 "--data-dir", str(tmp / "data"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["top1"] == pytest.approx(summary["top1"]) and metrics["n"] == 16
    assert main(["bench", spec, "--input-size", "3,16,16", "--batch-size", "2", "--repeats",
                 "1", "--warmup", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] == spec
    assert main(["export", spec, "--checkpoint", str(out / "last.pt"), "--format",
                 "torchscript", "--out", str(tmp / "m.pt"), "--input-size", "1,8,8"]) == 0


def test_train_takes_a_module(mine):
    tmp, _ = mine
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(model="my-net", data_dir=str(tmp / "data"), out=str(tmp / "run"),
                      epochs=1, batch_size=16, device="cpu", progress=False, download=False)
    summary = train(cfg, model=model)
    assert summary.model == "my-net" and summary.epochs == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy
    from deeproots.training.checkpoint import model_from_checkpoint

    state = load_checkpoint(tmp / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="pass the model it was trained as"):
        model_from_checkpoint(state)
    rebuilt = model_from_checkpoint(state, model=model)
    assert torch.equal(rebuilt[0].weight, state["model"]["0.weight"])
    wrong = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"gives outputs of shape \(1, 5\).*needs \(1, 10\)"):
        train(TrainConfig(model="x", data_dir=str(tmp / "data"), out=str(tmp / "r2"),
                          epochs=1, batch_size=16, device="cpu", progress=False,
                          download=False), model=wrong)
    assert deeproots.build_model is not None
