"""Figures: the numbers behind them, atomic writes, and a clear error for a bad --out."""
import json

import pytest

import deeproots
from deeproots import plots
from deeproots.cli import main


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _summaries(tmp_path, runs):
    paths = []
    for i, (model, acc) in enumerate(runs):
        cost = deeproots.profile(deeproots.create_model(model))
        p = tmp_path / f"s{i}.json"
        p.write_text(json.dumps({"model": model, "top1": acc, "macs": cost.macs,
                                 "params": cost.params}))
        paths.append(p)
    return paths


def test_results_are_averaged_over_seeds_by_hand(tmp_path):
    paths = _summaries(tmp_path, [("nin", 0.90), ("nin", 0.92), ("nin", 0.97),
                                  ("nin-root-8", 0.91), ("nin-tree-4", 0.88)])
    runs = plots.summarize_runs(paths)
    assert runs["nin"]["n"] == 3 and runs["nin"]["mean"] == pytest.approx(0.93)
    # sample standard deviation: sqrt(((-0.03)^2 + (-0.01)^2 + 0.04^2) / 2) = sqrt(0.0013)
    assert runs["nin"]["std"] == pytest.approx(0.0013 ** 0.5)
    assert runs["nin-root-8"]["std"] == 0.0 and runs["nin-root-8"]["macs"] == 103_342_080
    assert [runs[m]["topology"] for m in ("nin", "nin-root-8", "nin-tree-4")] == \
        ["orig", "root", "tree"]
    out = plots.plot_results(paths, tmp_path / "results.png")
    assert _is_png(out) and [p.name for p in tmp_path.glob(".*")] == []
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "nin", "top1": NaN, "macs": 1, "params": 1}')
    with pytest.raises(ValueError, match="bad.json is not a deeproots summary.json"):
        plots.summarize_runs([bad])


def test_folders_of_runs_are_read_as_their_summaries(tmp_path):
    """A run's folder is its summary.json; a study's folder (runs/NAME/summary.json) or a
    sweep's (NAME/summary.json) every summary under it; a folder of none is one line."""
    study = tmp_path / "study"
    for i, (model, acc) in enumerate([("nin", 0.90), ("nin", 0.92), ("nin-root-8", 0.91)]):
        run = study / "runs" / f"{model}-seed{i}"
        run.mkdir(parents=True)
        (run / "summary.json").write_bytes(_summaries(tmp_path, [(model, acc)])[0].read_bytes())
    runs = plots.summarize_runs([study])
    assert runs["nin"]["n"] == 2 and runs["nin"]["mean"] == pytest.approx(0.91)
    assert plots.summarize_runs([study / "runs"])["nin-root-8"]["n"] == 1
    assert plots.summarize_runs([study / "runs" / "nin-seed0"]) == {
        "nin": {"macs": runs["nin"]["macs"], "params": runs["nin"]["params"], "n": 1,
                "mean": 0.90, "std": 0.0, "topology": "orig"}}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no summary.json: give a run's folder, "
                                         "a folder of runs"):
        plots.summarize_runs([tmp_path / "empty"])


def test_costs_of_a_checkpoint_are_its_models(tmp_path, capsys):
    """plot-costs takes a checkpoint as the model it holds, as profile does."""
    from deeproots.training.checkpoint import save_model

    model = deeproots.create_model("nin-root-8", in_channels=1)
    save_model(tmp_path / "c.pt", model, {"model_cfg": model.deeproots_cfg, "config": {},
                                          "data": {"image_size": 28, "in_channels": 1}})
    assert main(["plot-costs", str(tmp_path / "c.pt"), "nin", "--input-size", "1,28,28",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert _is_png(tmp_path / "c.png")


def test_costs_figure_and_bad_outputs(tmp_path, capsys):
    assert _is_png(plots.plot_costs("nin", "nin-root-8", tmp_path / "costs.png"))
    assert main(["plot-costs", "nin", "nin-root-8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a folder; give a file name" in err
    assert len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["plot-results", str(blocker), "--out", str(blocker / "r.png")]) == 2
    assert "lies under the file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, magic", [
    (["plot-costs", "nin", "nin-root-8", "--out", "c.svg"], b"<?xml"),
    (["plot-results", "{summary}", "--out", "r.pdf"], b"%PDF"),
])
def test_a_plot_command_runs_in_a_process_of_its_own_in_the_format_its_suffix_names(
        tmp_path, argv, magic):
    """As a user runs them (a fresh process: nothing imported before, where deeproots.plots
    and deeproots.training import each other), each writing the format of its --out's
    suffix."""
    import subprocess
    import sys

    summary = _summaries(tmp_path, [("nin", 0.9)])[0]
    argv = [a.format(summary=summary) for a in argv]
    done = subprocess.run([sys.executable, "-m", "deeproots", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / argv[-1]).read_bytes().startswith(magic)


def test_filters_figure(tmp_path):
    from deeproots.inspection.covariance import first_layer_filters

    model = deeproots.create_model("resnet50-root-8")
    name, weights, groups = first_layer_filters(model)
    assert name == "conv1" and weights.shape == (64, 3, 7, 7) and groups == 8
    assert _is_png(plots.plot_filters(name, weights, groups, tmp_path / "f.png"))


def test_a_failed_figure_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "curves.png"
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_top1": 0.5,
                "test_top1": 0.4}]
    plots.plot_training_curves(history, out, "x")
    old = out.read_bytes()
    import matplotlib.figure

    def broken(self, *a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        plots.plot_training_curves(history, out, "x")
    assert out.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
