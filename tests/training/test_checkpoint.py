"""Checkpoints: an edited or foreign one is refused by field before anything is written, and
one rule resumes a run, from the command line and from Python alike."""
import json
import os

import pytest
import torch

from deeproots.training.checkpoint import CheckpointError, load_checkpoint, resume_config, validate_state
from deeproots.cli import main
from deeproots.config import TrainConfig
from deeproots.training.run import resume_command
from deeproots.training.loop import train
from helpers import train_cfg, write_fashion_mnist


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run and its data."""
    root = tmp_path_factory.mktemp("ckpt")
    write_fashion_mnist(root / "data", n_train=32, n_test=16, size=8)
    train(train_cfg(root / "data", root / "run", epochs=1))
    return root


def _edited(finished, tmp_path, **fields):
    out = tmp_path / "run"
    out.mkdir()
    for p in (finished / "run").iterdir():
        if p.is_file() and p.name != ".lock":
            (out / p.name).write_bytes(p.read_bytes())
    state = torch.load(out / "last.pt", weights_only=True)
    state.update(fields)
    torch.save(state, out / "last.pt")
    return out


@pytest.mark.parametrize("fields, message", [
    ({"epoch": -3}, "field 'epoch' is -3; expected a whole number from 0 to the run's 1"),
    ({"epoch": 7}, "field 'epoch' is 7"),
    ({"history": "abc"}, "field 'history' is 'abc'; expected a list of 1 epoch records"),
    ({"history": []}, "field 'history' is []"),
    ({"step": 2.5}, "field 'step' is 2.5"),
    ({"best_top1": float("nan")}, "field 'best_top1' is nan"),
    ({"rng_cpu": torch.zeros(3)}, "field 'rng_cpu' is 'a torch.float32 tensor of shape (3,)'"),
    ({"epoch_sums": [1.0]}, "field 'epoch_sums' is [1.0]"),
    ({"optimizer": "x"}, "field 'optimizer' is 'str'"),
    ({"config": {"epochs": -1}}, "its config is not a run's settings (epochs must be"),
    ({"model_cfg": {"kwargs": {}}}, "field 'model_cfg'"),
])
def test_an_edited_checkpoint_is_refused_by_field_and_nothing_is_written(
        finished, tmp_path, capsys, fields, message):
    out = _edited(finished, tmp_path, **fields)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", "--resume", "--out", str(out), "--change", "epochs", "--epochs", "2",
                 "--data-dir", str(finished / "data"), "--no-progress",
                 "--allocator", "system"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(CheckpointError):
        validate_state(torch.load(out / "last.pt", weights_only=True))


def test_resuming_a_finished_run_trains_nothing_and_rewrites_nothing(finished, tmp_path):
    """The summary it wrote when it finished comes back, marked already finished, and every
    file of the run keeps its bytes (the wall time grew by each resume's set-up before)."""
    import json

    out = _edited(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    summary = train(TrainConfig(resume=True, out=str(out)))
    assert summary.already_finished and summary.epochs == 1
    written = json.loads(before["summary.json"])
    assert (summary.top1, summary.wall_s) == (written["top1"], written["wall_s"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
    (out / "summary.json").unlink()  # stopped before the summary: it is written on resume
    summary = train(TrainConfig(resume=True, out=str(out)))
    assert not summary.already_finished and (out / "summary.json").is_file()


def test_the_python_api_resumes_with_the_folder_alone(finished, tmp_path):
    out = _edited(finished, tmp_path)
    saved = load_checkpoint(out / "last.pt")["config"]
    cfg = resume_config(out, TrainConfig(resume=True, out=str(out), change=["epochs"],
                                         epochs=2))
    # the run's own settings, not TrainConfig's defaults
    assert (cfg.model, cfg.lr, cfg.batch_size) == (saved["model"], saved["lr"], 16)
    assert cfg.epochs == 2 and cfg.resume
    summary = train(TrainConfig(resume=True, out=str(out), change=["epochs"], epochs=2))
    assert summary.epochs == 2 and summary.model == "nin-root-4"
    assert summary.changes == [{"setting": "epochs", "from": 1, "to": 2, "epoch": 1,
                                "step": 0}]
    with pytest.raises(ValueError, match=r"started with lr = 0.05, not 0.3; leave lr out to "
                                         r"keep the run's value, or allow the change with "
                                         r"change=\['lr'\]"):
        train(TrainConfig(resume=True, out=str(out), lr=0.3))


SOURCE = '''
from torch import nn


def small(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
'''


def test_a_model_of_your_own_resumes_from_any_folder(finished, tmp_path, monkeypatch, capsys):
    home = tmp_path / "project"
    home.mkdir()
    (home / "mine.py").write_text(SOURCE)
    monkeypatch.chdir(home)
    cfg = train_cfg(finished / "data", "run", model="mine.py:small", epochs=1)
    train(cfg)
    state = load_checkpoint(home / "run" / "last.pt")
    spec = f"{home / 'mine.py'}:small"
    assert state["config"]["model"] == spec  # recorded resolved
    assert len(state["model_cfg"]["source_sha256"]) == 64
    command = resume_command(TrainConfig(**{**state["config"], "resume": False}), "run")
    assert command == f"deeproots train {spec} --resume --out {home / 'run'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (home / "mine.py").write_text(SOURCE + "\n# edited\n")
    argv = command.split()[2:] + ["--change", "epochs", "--epochs", "2", "--no-progress",
                                  "--allocator", "system"]
    assert main(["train", *argv]) == 0
    err = capsys.readouterr().err
    assert f"warning: {home / 'mine.py'} changed since this run started" in err
    summary = json.loads((home / "run" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["model"] == spec
    # without the model named, the checkpoint never makes deeproots run the file
    with pytest.raises(CheckpointError, match=rf"resume with deeproots train {spec} --resume"):
        train(TrainConfig(resume=True, out=str(home / "run")))
    assert os.getcwd() == str(elsewhere)


# ---------------------------------------------------------------------------------------------
# What a hostile user found: code named in an --init checkpoint, a model name ignored, a
# teacher or layout changed under a resumed run, an --init file gone, an optimizer edited


def test_init_never_runs_code_a_checkpoint_names(finished, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    gift_code = tmp_path / "gift.py"
    gift_code.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                         f"def f(**kw):\n    raise SystemExit('never')\n")
    state = torch.load(finished / "run" / "last.pt", weights_only=True)
    state["model_cfg"]["name"] = f"{gift_code}:f"
    gift = tmp_path / "gift.pt"
    torch.save(state, gift)
    assert main(["train", "--init", str(gift), "--data-dir", str(finished / "data"),
                 "--out", str(tmp_path / "g"), "--no-progress", "--allocator", "system"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--init {gift} holds a model of your own, built by " \
        f"{gift_code}:f; deeproots never runs code named in a checkpoint: name the model " \
        f"yourself, deeproots train FILE.py:FUNCTION --init {gift}" in err[0], err
    assert not marker.exists() and not (tmp_path / "g").exists()


def test_init_trains_the_checkpoints_model_and_refuses_another_name(finished, tmp_path,
                                                                    capsys):
    ckpt = finished / "run" / "last.pt"
    assert main(["train", "googlenet", "--init", str(ckpt), "--data-dir",
                 str(finished / "data"), "--out", str(tmp_path / "g"), "--no-progress",
                 "--allocator", "system"]) == 2
    err = capsys.readouterr().err
    assert f"--init {ckpt} holds a trained nin-root-4, not googlenet" in err
    assert not (tmp_path / "g").exists()
    # the same name in another spelling is the same model
    summary = train(train_cfg(finished / "data", tmp_path / "same", model="nin_root_4",
                              init=str(ckpt), epochs=1))
    assert summary.model == "nin-root-4"


def _teacher_run(finished, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes((finished / "run" / "last.pt").read_bytes())
    out = tmp_path / "student"
    train(train_cfg(finished / "data", out, epochs=1, distill=str(teacher)))
    return teacher, out


def test_a_teacher_replaced_under_a_resumed_run_is_refused_unless_changed(finished, tmp_path,
                                                                         capsys):
    teacher, out = _teacher_run(finished, tmp_path)
    assert len(load_checkpoint(out / "last.pt")["distill_sha256"]) == 64
    state = torch.load(teacher, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name] + 1  # another teacher, same file name
    torch.save(state, teacher)
    before = _files(out)
    args = ["train", "--resume", "--out", str(out), "--change", "epochs", "--epochs", "2",
            "--no-progress", "--allocator", "system"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--distill {teacher} changed since this run started" in err[0]
    assert _files(out) == before
    assert main(["train", "--resume", "--out", str(out), "--change", "epochs", "distill",
                 "--epochs", "2", "--no-progress", "--allocator", "system"]) == 0
    change = load_checkpoint(out / "last.pt")["changes"][-1]
    assert change["setting"] == "distill" and change["from"] != change["to"]


def test_an_init_file_deleted_before_resume_is_not_needed(finished, tmp_path):
    init = tmp_path / "init.pt"
    init.write_bytes((finished / "run" / "last.pt").read_bytes())
    out = tmp_path / "tune"
    train(train_cfg(finished / "data", out, epochs=1, init=str(init), model=None))
    init.unlink()  # the run's own checkpoint holds its model and groups
    summary = train(TrainConfig(resume=True, out=str(out), change=["epochs"], epochs=2))
    assert summary.epochs == 2 and summary.model == "nin-root-4"


def test_another_memory_format_on_resume_is_a_change_to_allow_and_record(finished, tmp_path,
                                                                         capsys):
    out = _edited(finished, tmp_path)
    base = ["train", "--resume", "--out", str(out), "--no-progress", "--allocator", "system",
            "--epochs", "2"]
    assert main(base + ["--memory-format", "contiguous", "--change", "epochs"]) == 2
    err = capsys.readouterr().err
    assert "started with memory_format = 'channels-last', not 'contiguous'" in err
    # the layout it already has, named: nothing to allow
    cfg = resume_config(out, {"memory_format": "channels-last", "epochs": 2,
                              "change": ["epochs"]})
    assert cfg.memory_format == "channels-last"
    assert main(base + ["--memory-format", "contiguous", "--change", "epochs",
                        "memory_format"]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["memory_format"] == "contiguous"
    assert {"setting": "memory_format", "from": "channels-last", "to": "contiguous",
            "epoch": 1, "step": 0} in state["changes"]


def test_an_optimizer_state_of_the_wrong_shape_is_one_line(finished, tmp_path, capsys):
    state = torch.load(finished / "run" / "last.pt", weights_only=True)
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3)
    out = _edited(finished, tmp_path, optimizer=state["optimizer"])
    before = _files(out)
    assert main(["train", "--resume", "--out", str(out), "--change", "epochs", "--epochs", "2",
                 "--no-progress", "--allocator", "system"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'optimizer' holds a momentum_buffer of shape (3,)" in err[0]
    assert _files(out) == before


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
