"""The run folder owns what lies in a run's --out: its lock, the refusal of a run's own files
to every other command, and an --overwrite that keeps the old run whole until the new one
has its first checkpoint, whatever stops the new run (a crash, a full disk)."""
import errno
import json
import os
import subprocess
import sys

import pytest

from deeproots import runtime
from deeproots.cli import main
from deeproots.errors import DeeprootsError, RunFolderError
from deeproots.training.folder import RunFolder, RunLock, check_new_file, lock_holder
from deeproots.training.checkpoint import load_checkpoint
from deeproots.training.loop import train
from helpers import train_cfg, write_fashion_mnist, write_image_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_mnist(folder, n_train=32, n_test=16, size=8)
    return folder


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_lock_is_reentrant_in_a_process_and_refuses_another(tmp_path):
    with RunLock(tmp_path) as outer:
        with RunLock(tmp_path):  # a study holds it while train takes it again
            pass
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())  # still held
        assert lock_holder(tmp_path) is None  # this process is not "another"
    assert not (tmp_path / ".lock").exists() and outer.path.name == ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{sleeper.pid}\n")
        assert lock_holder(tmp_path) == sleeper.pid
        with pytest.raises(RunFolderError, match=rf"in use by another run \(process "
                                                 rf"{sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock_holder(tmp_path) is None  # gone: stale, taken over
    with RunLock(tmp_path):
        pass


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    """A corrupt image met in the first batch: the --out folders the run made (two levels
    here) are gone with it; a folder that was there before stays, and so does one with a
    file of the user's in it."""
    write_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=8)
    (tmp_path / "imgs" / "train" / "class0" / "0.png").write_bytes(b"not a png")
    argv = ["train", "nin", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "8",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "new" / "run")]) == 2
    assert "0.png is not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main([*argv, "--out", str(tmp_path / "mine" / "run")]) == 2
    assert os.listdir(tmp_path / "mine") == []
    with RunLock(tmp_path / "mine" / "made") as lock:
        (lock.folder / "notes.txt").write_text("the user's")
    assert (tmp_path / "mine" / "made" / "notes.txt").exists()


def test_a_runs_own_files_are_never_an_output(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    for name in ("last.pt", "summary.json", "best.pt", "metrics.jsonl", "curves.png"):
        with pytest.raises(RunFolderError, match=rf"{name} is a file of the run in .*run; "
                                                 r"another command never replaces it"):
            check_new_file(run / name, overwrite=True)  # not even when asked
    check_new_file(run / "model.onnx")  # a new file beside the run is fine
    study = tmp_path / "study"
    study.mkdir()
    (study / "manifest.json").write_text("{}")
    with pytest.raises(RunFolderError, match="is a file of the study in"):
        check_new_file(study / "accuracy.png", overwrite=True)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"mine")
    with pytest.raises(RunFolderError, match=r"mine.png already exists; add --overwrite to "
                                             r"replace it"):
        check_new_file(mine)
    assert check_new_file(mine, overwrite=True) == mine
    # a file that other commands write too does not make its folder a run's
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("converted.pt", "curves.png", "summary.json"):
        (alone / name).write_bytes(b"mine")
        assert check_new_file(alone / name, overwrite=True) == alone / name


def test_an_interrupted_replacement_is_undone_or_finished(tmp_path):
    old = {"last.pt": b"old last", "metrics.jsonl": b"{}\n", "summary.json": b"{}"}
    for name, blob in old.items():
        (tmp_path / name).write_bytes(blob)
    folder = RunFolder(tmp_path)
    folder.begin(overwrite=True)

    def crash():
        raise SystemExit("killed while writing the new last.pt")

    with pytest.raises(SystemExit):
        folder.write_checkpoint(crash)
    assert _files(tmp_path) == old  # put back at once
    # a kill -9 between moving aside and writing: the next lock puts the old run back
    aside = tmp_path / ".replaced"
    aside.mkdir()
    for name in old:
        os.replace(tmp_path / name, aside / name)
    with RunFolder(tmp_path).lock():
        pass
    assert _files(tmp_path) == old and not aside.exists()
    # killed after the new last.pt: the old files go
    aside.mkdir()
    os.replace(tmp_path / "summary.json", aside / "summary.json")
    (tmp_path / "last.pt").write_bytes(b"new last")
    with RunFolder(tmp_path).lock():
        pass
    assert not aside.exists() and not (tmp_path / "summary.json").exists()


def test_overwrite_keeps_the_old_run_until_the_first_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    train(train_cfg(data_dir, out, epochs=1))
    before = _files(out)

    def crash(info):  # the new run dies at its first step, before any checkpoint
        raise SystemExit("kill -9")

    with pytest.raises(SystemExit):
        train(train_cfg(data_dir, out, epochs=1, seed=1, overwrite=True), callbacks=[crash])
    assert _files(out) == before  # every old file, unchanged
    replaced = train(train_cfg(data_dir, out, epochs=1, seed=1, overwrite=True))
    assert replaced.config["seed"] == 1
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 1
    assert not (out / ".replaced").exists() and not (out / ".lock").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]  # the new run's, none of the old's


def _full_after(limit):
    """An ``open`` whose files take ``limit`` bytes, then say the disk is full."""
    real = open

    def fake(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        written = [0]
        write = f.write

        def full_write(b):
            written[0] += len(b)
            if written[0] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(b)

        f.write = full_write
        return f

    return fake


def test_a_full_disk_keeps_the_old_checkpoint_and_is_one_line(data_dir, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "run"
    args = ["train", "nin-root-4", "--data-dir", str(data_dir), "--epochs", "1",
            "--batch-size", "16", "--out", str(out), "--device", "cpu", "--no-download",
            "--no-progress", "--allocator", "system"]
    assert main(args) == 0
    before = _files(out)
    capsys.readouterr()
    # torch.save meets the full disk inside its zip writer and raises a RuntimeError
    monkeypatch.setattr(runtime, "open", _full_after(4096), raising=False)
    assert main(["train", "--resume", "--out", str(out), "--change", "epochs", "--epochs", "2",
                 "--no-progress", "--allocator", "system"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device to write" in err[0], err
    assert "last.pt; the old file, if any, is kept" in err[0]
    assert _files(out) == before and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    (out / "best.pt").unlink()  # the best epoch's file lost: a resume must not claim it
    assert main(["train", "--resume", "--out", str(out), "--change", "epochs", "--epochs", "2",
                 "--no-progress", "--allocator", "system"]) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote {out}/: last.pt") and "metrics.jsonl" in wrote
    assert ("best.pt" in wrote) == (out / "best.pt").exists()


def test_a_long_name_and_a_missing_folder(tmp_path):
    long = tmp_path / ("m" * 245 + ".bin")  # 249 characters: a valid file name
    runtime.atomic_write(long, lambda f: f.write(b"1"))
    assert long.read_bytes() == b"1"
    missing = tmp_path / "nowhere" / "x.bin"
    with pytest.raises(OSError, match=rf"cannot write {missing}: the folder "
                                      rf"{missing.parent} does not exist"):
        runtime.atomic_write(missing, lambda f: f.write(b"1"))


def test_every_kind_of_bad_input_error_is_one_line_and_exit_2(capsys, monkeypatch):
    """Each kind of deeproots' own errors, raised inside a command, reaches the user as one
    line and exit status 2 (as bad input), and a ValueError of its own (the one
    ``except ValueError`` in library code catches too) - never as a traceback."""
    import deeproots.cli as cli
    from deeproots.errors import CheckpointError, DataError, GroupsError

    for kind in (CheckpointError, DataError, GroupsError, RunFolderError, DeeprootsError):
        def raising(args, kind=kind):
            raise kind(f"{kind.__name__} for the test\nsecond line")

        monkeypatch.setattr(cli, "cmd_list", raising)
        parser_list = cli._parser_list
        monkeypatch.setattr(cli, "COMMAND_PARSERS", (parser_list,))
        assert cli.main(["list"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"deeproots list: error: {kind.__name__} for the test"]
        try:
            raise kind("x")
        except ValueError:  # library code that catches bad values catches these
            pass


# ---------------------------------------------------------------------------------------------
# What a hostile user found: a run finished by another process while this one started, an
# interrupted --overwrite judged before it was undone, a kill between last.pt and best.pt


def test_a_run_finished_while_this_one_was_starting_is_never_replaced(data_dir, tmp_path,
                                                                      monkeypatch):
    """Two `train --out race` a few seconds apart, the first finishing while the second
    builds its model: the folder is judged again once the lock is held."""
    import deeproots.training.loop as T

    first = tmp_path / "first"
    train(train_cfg(data_dir, first, epochs=1))
    out = tmp_path / "race"
    real_build = T._build

    def slow_build(run, spec, model):  # the other run finishes here, meanwhile
        out.mkdir(exist_ok=True)
        for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json"):
            (out / name).write_bytes((first / name).read_bytes())
        return real_build(run, spec, model)

    monkeypatch.setattr(T, "_build", slow_build)
    with pytest.raises(RunFolderError, match=r"race already holds a run .* \(it changed while "
                                             r"this run was starting; nothing was written"):
        train(train_cfg(data_dir, out, epochs=1, seed=3))
    assert _files(out) == {n: (first / n).read_bytes()
                           for n in ("best.pt", "last.pt", "metrics.jsonl", "summary.json")}
    assert not (out / ".lock").exists()


def test_an_interrupted_overwrite_is_undone_before_a_new_run_is_judged(data_dir, tmp_path,
                                                                       capsys):
    """`train --overwrite` killed after moving the old run aside, before its first
    checkpoint; then a run *without* --overwrite is refused (the old run is back), and
    --resume continues the old run."""
    out = tmp_path / "ow"
    train(train_cfg(data_dir, out, epochs=1))
    old = _files(out)
    aside = out / ".replaced"
    aside.mkdir()
    for name in old:
        os.replace(out / name, aside / name)
    (out / ".lock").write_text("999999999\n")  # the killed process's lock: stale
    args = ["train", "nin-root-4", "--data-dir", str(data_dir), "--epochs", "1",
            "--batch-size", "16", "--out", str(out), "--device", "cpu", "--no-download",
            "--no-progress", "--allocator", "system"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "restored the run that an interrupted --overwrite was replacing" in err
    assert "already holds a run" in err and _files(out) == old and not aside.exists()
    aside.mkdir()
    for name in old:  # interrupted again; this time --resume comes first
        os.replace(out / name, aside / name)
    assert main(["train", "--resume", "--out", str(out), "--change", "epochs", "--epochs",
                 "2", "--no-progress", "--allocator", "system"]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["history"][0] == json.loads(
        old["metrics.jsonl"].decode().splitlines()[-1])


class _Killed(BaseException):
    """kill -9, as far as the code under test can tell."""


def test_a_kill_between_best_and_last_leaves_a_resumable_run_with_its_best(data_dir, tmp_path,
                                                                          monkeypatch):
    import deeproots.training.loop as T

    out = tmp_path / "run"
    real = T.save_checkpoint
    calls = []

    def killed_at_the_second_epochs_last(path, state):
        calls.append(os.path.basename(path))
        if os.path.basename(path) == "last.pt" and state["epoch"] == 2 and state["step"] == 0:
            raise _Killed
        return real(path, state)

    monkeypatch.setattr(T, "save_checkpoint", killed_at_the_second_epochs_last)
    with pytest.raises(_Killed):
        train(train_cfg(data_dir, out, epochs=3, lr=0.05))
    monkeypatch.undo()
    # best.pt, if this epoch was the best, came first; last.pt is still epoch 1's
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    summary = train(train_cfg(data_dir, out, epochs=3, lr=0.05, resume=True))
    tops = [h["test_top1"] for h in load_checkpoint(out / "last.pt")["history"]]
    best = load_checkpoint(out / "best.pt")
    assert summary.best_top1 == max(tops) == best["history"][-1]["test_top1"]
    assert best["epoch"] == 1 + tops.index(max(tops))


def test_a_resumed_run_writes_the_best_pt_an_older_run_lost(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(train_cfg(data_dir, out, epochs=1))
    (out / "best.pt").unlink()  # killed between last.pt and best.pt by an older deeproots
    train(train_cfg(data_dir, out, epochs=2, resume=True, change=["epochs"]))
    assert "best.pt: written again from" in capsys.readouterr().err
    history = load_checkpoint(out / "last.pt")["history"]
    best = load_checkpoint(out / "best.pt")
    assert best["best_top1"] == max(h["test_top1"] for h in history)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """kill -9 while rootify or export writes: the next write to that folder removes the
    hidden temporary file the dead process left; one of a live process stays."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / ".deeproots-999999999-0123abcd.tmp"  # no such process
        older = tmp_path / ".999999998-89abcdef.tmp"  # the name the version before used
        live = tmp_path / f".deeproots-{sleeper.pid}-00000000.tmp"
        mine = tmp_path / "keep.tmp"
        for f in (dead, older, live, mine):
            f.write_bytes(b"x" * 1000)
        runtime.atomic_write(tmp_path / "out.bin", lambda f: f.write(b"1"))
        assert not dead.exists() and not older.exists()
        assert live.exists() and mine.exists() and (tmp_path / "out.bin").read_bytes() == b"1"
    finally:
        sleeper.kill()
        sleeper.wait()
