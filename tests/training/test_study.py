"""The accuracy study: aggregation and Welch's test against hand and reference values,
resume of an interrupted study, the report rebuilt from summaries, and bad input."""
import json
import math

import pytest

from deeproots.cli import main
from deeproots.training.study import run_study, study_report, study_variants, welch
from helpers import write_fashion_mnist


def test_welch_by_hand_and_against_scipys_reference():
    from scipy import stats

    a, b = [0.90, 0.92, 0.94], [0.88, 0.89, 0.90]
    diff, low, high, p = welch(a, b)
    # by hand: var a = 0.0004, var b = 0.0001; se = sqrt(0.0004/3 + 0.0001/3)
    se = math.sqrt(0.0005 / 3)
    assert diff == pytest.approx(0.03)
    df = (0.0005 / 3) ** 2 / ((0.0004 / 3) ** 2 / 2 + (0.0001 / 3) ** 2 / 2)
    assert df == pytest.approx(2.9412, abs=1e-4)
    assert high - diff == pytest.approx(stats.t.ppf(0.975, df) * se)
    assert diff - low == pytest.approx(high - diff)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert welch([0.9], b) is None
    assert welch([0.9, 0.9], [0.9, 0.9])[3] == 1.0


def test_variants_of_a_study():
    assert study_variants("nin", ["root"]) == ["nin", "nin-root-2", "nin-root-4", "nin-root-8",
                                              "nin-root-16"]
    assert study_variants("nin", ["root-8", "col-8"]) == ["nin", "nin-root-8", "nin-col-8"]
    assert len(study_variants("nin")) == 13 and len(study_variants("resnet50")) == 7
    with pytest.raises(ValueError, match="unknown model family 'vgg'; accepted: .*nin"):
        study_variants("vgg")
    with pytest.raises(ValueError, match="unknown variant 'root-3' of nin"):
        study_variants("nin", ["root-3"])
    with pytest.raises(ValueError, match="resnet50 has no tree variants"):
        study_variants("resnet50", ["tree"])


def _fake_study(out, runs, epochs=2):
    """A study folder of made-up summaries: {model: [top1 per seed]}."""
    seeds = max(len(v) for v in runs.values())
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({
        "family": "nin", "data": "cifar10", "epochs": epochs, "models": list(runs),
        "seeds": list(range(seeds)), "settings": {}}))
    macs = {"nin": 222_487_552, "nin-root-8": 103_342_080, "nin-tree-8": 99_360_256}
    for model, accs in runs.items():
        for seed, acc in enumerate(accs):
            folder = out / "runs" / f"{model}-seed{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps({
                "model": model, "data": "cifar10", "top1": acc, "top5": 0.99,
                "macs": macs[model], "params": macs[model] // 100,
                "train_images_per_s": 100.0 + seed, "epochs": epochs,
                "config": {"model": model, "seed": seed, "data": "cifar10"}}))


def test_the_report_from_summaries_alone(tmp_path):
    out = tmp_path / "s"
    _fake_study(out, {"nin": [0.90, 0.92, 0.94], "nin-root-8": [0.88, 0.89, 0.90],
                      "nin-tree-8": [0.93, 0.93, 0.93]})
    report = study_report(out)
    rows = {v.model: v for v in report.variants}
    assert rows["nin"].top1_mean == pytest.approx(0.92)
    assert rows["nin"].top1_std == pytest.approx(0.02)  # sample std, by hand
    assert rows["nin-root-8"].top1_std == pytest.approx(0.01)
    assert rows["nin-root-8"].macs_fraction == pytest.approx(103_342_080 / 222_487_552)
    assert rows["nin-root-8"].diff == pytest.approx(-0.03)
    assert rows["nin-root-8"].images_per_s == pytest.approx(101.0)
    # the paper's CIFAR-10 accuracy column (Table 8) beside ours
    assert rows["nin-root-8"].paper_top1 == "0.9215" and rows["nin"].paper_top1 == "0.9211"
    # nin-tree-8: fewer multiply-adds and higher accuracy than both others
    assert [v.model for v in report.variants if v.pareto] == ["nin-tree-8"]
    assert rows["nin-root-8"].verdict in ("within noise of orig", "worse by 3.00 points")
    md = (out / "study.md").read_text()
    assert "| nin-root-8 | 3 | 0.8900 ± 0.0100 |" in md
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "study.json").read_text())["variants"][0]["model"] == "nin"
    assert (out / "study.csv").read_text().splitlines()[0].startswith("model,topology,n,")


def test_a_corrupt_summary_is_reported_never_averaged_in(tmp_path, capsys):
    out = tmp_path / "s"
    _fake_study(out, {"nin": [0.90, 0.92], "nin-root-8": [0.88, 0.89]})
    (out / "runs" / "nin-root-8-seed1" / "summary.json").write_text('{"top1": NaN')
    report = study_report(out)
    rows = {v.model: v for v in report.variants}
    assert rows["nin-root-8"].n == 1 and report.corrupt == ["nin-root-8-seed1"]
    assert main(["study", "--report", str(out)]) == 0
    assert "summary unreadable, run again by the study: nin-root-8-seed1" in \
        capsys.readouterr().out


@pytest.mark.parametrize("drop", ["top5", "macs", "train_images_per_s", "config", "model"])
def test_a_summary_lacking_a_field_is_reported_as_unreadable(tmp_path, capsys, drop):
    out = tmp_path / "s"
    _fake_study(out, {"nin": [0.90, 0.92], "nin-root-8": [0.88, 0.89]})
    path = out / "runs" / "nin-root-8-seed1" / "summary.json"
    summary = json.loads(path.read_text())
    del summary[drop]
    path.write_text(json.dumps(summary))
    assert main(["study", "--report", str(out)]) == 0
    assert "summary unreadable, run again by the study: nin-root-8-seed1" in \
        capsys.readouterr().out


def test_another_run_in_a_studys_folder_is_named_never_averaged_in(tmp_path, capsys):
    """A nin-root-16 run trained into the study's runs/nin-root-8-seed1."""
    out = tmp_path / "s"
    _fake_study(out, {"nin": [0.90, 0.92], "nin-root-8": [0.88, 0.89]})
    path = out / "runs" / "nin-root-8-seed1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["model"] = summary["config"]["model"] = "nin-root-16"
    summary["top1"] = 0.125
    path.write_text(json.dumps(summary))
    report = study_report(out)
    rows = {v.model: v for v in report.variants}
    assert rows["nin-root-8"].n == 1 and rows["nin-root-8"].top1_mean == pytest.approx(0.88)
    assert report.foreign == ["nin-root-8-seed1 holds a run of nin-root-16 with seed 1 on "
                              "cifar10, not this study's nin-root-8 seed 1 on cifar10"]
    assert main(["study", "--report", str(out)]) == 0
    assert "not this study's run, left out: nin-root-8-seed1 holds a run of nin-root-16" in \
        capsys.readouterr().out
    assert "Not this study's runs, left out" in (out / "study.md").read_text()
    summary["model"], summary["config"]["seed"] = "nin-root-8", 0  # right model, wrong seed
    path.write_text(json.dumps(summary))
    assert study_report(out).foreign[0].startswith("nin-root-8-seed1 holds a run of "
                                                   "nin-root-8 with seed 0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_mnist(folder, n_train=32, n_test=16, size=8)
    return str(folder)


def test_a_tiny_study_end_to_end_and_its_resume(data_dir, tmp_path):
    out = tmp_path / "study"
    settings = dict(data_dir=data_dir, batch_size=16, device="cpu", download=False,
                    limit_train_batches=1)
    calls = []
    import deeproots.training.loop as L

    real_open = L.open_run

    def spy(cfg, **kwargs):  # each run as opened: resumed, or started
        opened = real_open(cfg, **kwargs)
        calls.append((opened.cfg.model, opened.cfg.seed, opened.cfg.resume))
        return opened

    L.open_run = spy
    try:
        report = run_study("nin", variants=["root-4"], seeds=2, epochs=1, out=out,
                           progress=False, **settings)
        assert [v.model for v in report.variants] == ["nin", "nin-root-4"]
        assert all(v.n == 2 for v in report.variants) and len(calls) == 4
        finished = (out / "runs" / "nin-seed0" / "summary.json").read_bytes()
        # one run interrupted mid-way (its checkpoint kept, its summary gone), one folder
        # half written before any checkpoint
        (out / "runs" / "nin-root-4-seed1" / "summary.json").unlink()
        half = out / "runs" / "nin-root-4-seed0"
        for name in ("summary.json", "last.pt", "best.pt"):
            (half / name).unlink()
        calls.clear()
        report = run_study("nin", variants=["root-4"], seeds=2, epochs=1, out=out,
                           progress=False, **settings)
        assert sorted(calls) == [("nin-root-4", 0, False), ("nin-root-4", 1, True)]
        assert (out / "runs" / "nin-seed0" / "summary.json").read_bytes() == finished
        assert all(v.n == 2 for v in report.variants)
    finally:
        L.open_run = real_open


def test_a_study_is_continued_with_its_own_settings_and_variants(data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """``deeproots study nin --out S --seeds 3``, nothing else, on a study of root-4 run with
    1 epoch, batch 16, its own data folder and 2 seeds: the third seed of its two models is
    trained with those settings (not every variant with 10 epochs and batch 128, and not
    refused as another study); a seed asked for of one variant alone is named as not
    finished, with the command that finishes it."""
    import deeproots.training.loop as L

    out = tmp_path / "study"
    run_study("nin", variants=["root-4"], seeds=2, epochs=1, out=out, progress=False,
              data_dir=data_dir, batch_size=16, device="cpu", download=False,
              limit_train_batches=1)
    before = json.loads((out / "manifest.json").read_text())
    opened, real_open = [], L.open_run

    def spy(cfg, **kwargs):
        opened.append((cfg.model, cfg.seed, cfg.epochs, cfg.batch_size))
        return real_open(cfg, **kwargs)

    monkeypatch.setattr(L, "open_run", spy)
    assert main(["study", "nin", "--out", str(out), "--seeds", "3", "--no-progress"]) == 0
    assert sorted(opened) == [("nin", 2, 1, 16), ("nin-root-4", 2, 1, 16)]
    after = json.loads((out / "manifest.json").read_text())
    assert after["models"] == before["models"] and after["settings"] == before["settings"]
    assert after["seeds"] == [0, 1, 2]
    capsys.readouterr()
    assert main(["study", "nin", "--out", str(out), "--seeds", "1", "--variants", "root-8",
                 "--no-progress"]) == 0  # root-8 at seed 0 only, in a study of 3 seeds
    assert (f"not finished: nin-root-8-seed1, nin-root-8-seed2 (deeproots study nin --out "
            f"{out} --seeds 3 trains them)") in capsys.readouterr().out


def test_a_study_started_with_a_relative_data_dir_continues_from_anywhere(data_dir, tmp_path,
                                                                          monkeypatch):
    """--data-dir given relative to where the study started is kept as the folder it named:
    the study continues from another folder with --out alone."""
    import os

    monkeypatch.chdir(os.path.dirname(data_dir))
    out = tmp_path / "study"
    assert main(["study", "nin", "--variants", "root-4", "--seeds", "1", "--epochs", "1",
                 "--data-dir", os.path.basename(data_dir), "--batch-size", "16",
                 "--limit-train-batches", "1", "--device", "cpu", "--no-download",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["data_dir"] == data_dir
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["study", "nin", "--out", str(out), "--seeds", "2", "--no-progress"]) == 0
    assert (out / "runs" / "nin-root-4-seed1" / "summary.json").exists()


def test_bad_studies(data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    _fake_study(out, {"nin": [0.9]})
    # the data not given is the study's own; the epochs given differ from its own
    with pytest.raises(ValueError, match=r"holds a study of nin on cifar10 with 2 epochs; this "
                                         r"one is nin on cifar10 with 1 epochs"):
        run_study("nin", seeds=1, epochs=1, out=out, variants=["root-2"], data_dir=data_dir)
    with pytest.raises(ValueError, match=r"holds a study of nin on cifar10 with 2 epochs; this "
                                         r"one is nin on fashion-mnist with 2 epochs"):
        run_study("nin", seeds=1, data="fashion-mnist", out=out, data_dir=data_dir)
    with pytest.raises(ValueError, match="seeds must be a whole number >= 1; got 0"):
        run_study("nin", seeds=0, out=tmp_path / "t")
    with pytest.raises(ValueError, match="a study sets seed itself"):
        run_study("nin", seed=3, out=tmp_path / "t")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no study"):
        run_study("nin", out=tmp_path / "busy", data_dir=data_dir)
    for argv, phrase in ((["study", "vgg"], "unknown model family 'vgg'"),
                         (["study", "nin", "--variants", "root-3", "--out", str(tmp_path / "u")],
                          "unknown variant 'root-3'"),
                         (["study", "--report", str(tmp_path / "none")], "holds no study"),
                         (["study", "nin", "--lr", "nan", "--out", str(tmp_path / "v")],
                          "lr must be a finite number > 0")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert phrase in err and len(err.strip().splitlines()) == 1


def test_an_interrupted_study_says_how_to_continue(monkeypatch, capsys, tmp_path):
    import signal

    import deeproots.training.study as S
    from deeproots.training.loop import Interrupted

    def stopped(*a, **k):
        raise Interrupted(signal.SIGTERM, tmp_path / "runs" / "nin-seed0" / "last.pt")

    monkeypatch.setattr(S, "run_study", stopped)
    assert main(["study", "nin", "--out", str(tmp_path)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Run the same command again to continue the study" in err and "Traceback" not in err


def test_a_run_another_study_is_training_is_skipped_and_never_touched(data_dir, tmp_path,
                                                                       capsys):
    """Two studies into one --out: the second sees the first's lock on a run and leaves that
    folder alone (it used to remove it before taking the lock)."""
    import subprocess
    import sys

    out = tmp_path / "study"
    settings = dict(data_dir=data_dir, batch_size=16, device="cpu", download=False,
                    limit_train_batches=1)
    busy = out / "runs" / "nin-seed0"
    busy.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (busy / ".lock").write_text(f"{sleeper.pid}\n")
        (busy / "metrics.jsonl").write_text("")  # the other study's run, before its checkpoint
        (out / "manifest.json").write_text(json.dumps({
            "family": "nin", "data": "fashion-mnist", "epochs": 1,
            "models": ["nin", "nin-root-4"], "seeds": [0], "settings": {
                "epochs": 1, "data": "fashion-mnist", **settings}}))
        with pytest.raises(ValueError, match="has no finished run of nin"):
            run_study("nin", variants=["root-4"], seeds=1, epochs=1, out=out, progress=False,
                      **settings)
        assert sorted(p.name for p in busy.iterdir()) == [".lock", "metrics.jsonl"]
        assert "nin-seed0 is being trained by process" in capsys.readouterr().err
        assert (out / "runs" / "nin-root-4-seed0" / "summary.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    report = run_study("nin", variants=["root-4"], seeds=1, epochs=1, out=out, progress=False,
                       **settings)  # its process is gone: the run is trained now
    assert [v.n for v in report.variants] == [1, 1] and report.held == []
