"""The benchmark scripts' own arithmetic, checked by hand (their timings need a GPU)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deeproots
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
gpu_targets = pytest.importorskip("gpu_targets")


def test_the_bounds_of_nin_root_8s_conv2a_block_by_hand():
    from deeproots.speed.roofline import HARDWARE

    with torch.device("meta"):
        block = SimpleNamespace(conv=nn.Conv2d(96, 192, 5, padding=2, groups=8),
                                pointwise=nn.Conv2d(192, 192, 1), residual=False)
    apart, fused = gpu_targets.block_bounds(block, torch.Size([1, 96, 16, 16]), 256,
                                            "bfloat16", HARDWARE["h100"])
    pixels = 256 * 16 * 16
    macs = pixels * 192 * (12 * 25) + pixels * 192 * 192  # grouped 5x5, then the 1x1
    moved = 2 * (pixels * 96 + pixels * 192 + 192 * 12 * 25 + 192 * 192)  # x, y, weights
    compute = 2 * macs / 989e12
    assert fused == pytest.approx(max(compute, moved / 3.35e12))
    assert fused == pytest.approx(12.52e-6, rel=1e-3)  # compute-bound
    # apart, the 192-channel intermediate goes to memory and comes back
    assert apart == pytest.approx((moved + 2 * 2 * pixels * 192) / 3.35e12)
    assert apart == pytest.approx(26.35e-6, rel=1e-3)


def test_the_family_table_of_the_stand_ins():
    """benchmarks/rootify_families.py on tests/zoo.py's stand-ins: classes and resolutions
    kept everywhere; the weight-standardised conv left; the deep stem's option counted."""
    import rootify_families
    import zoo

    rows = {r[0]: r for r in (rootify_families._row(name, build, size, "root-8")
                              for name, (build, size) in rootify_families._zoo().items())}
    assert all(r[8] == "yes" and r[9] == "yes" for r in rows.values())
    assert rows["subclasses (timm-ish)"][7] == "1"  # StdGainConv2d, left with its reason
    assert rows["mobilenet-ish"][6] == "2"  # two depthwise convs left
    deep = rows["deep-stem (resnet-d-ish)"]
    assert float(deep[4]) > float(deep[3])  # stem='resolution' keeps the stem dense
    # the row is the stand-in's: its stem is three convs at 16x16 (ResNet-D's), so the rule
    # leaves three more convs dense with stem='resolution' than with stem='input'
    stem = deeproots.rootify(zoo.DeepStemNet(), "root-8", stem="resolution",
                             example_input=torch.zeros(1, 3, 32, 32))[1]
    kept = [c.layer for c in stem.layers if c.note.startswith("stem")]
    assert kept == ["stem.0", "stem.2", "stem.4"]


def test_the_calibrated_family_table_of_the_stand_ins():
    """--calibrated: each stand-in converted by deeproots.convert_model; every grouped conv
    is refit within its groups but SubclassNet's that rescales its output after its conv
    (its SAME-padded one is), and torch.fx cannot trace SubclassNet (the padding's
    arithmetic on shapes); the U-Net, which returns a map, not class scores, converts too;
    permutations fold through a batch norm subclass with its activation (timm's) and
    through a frozen batch norm (torchvision's)."""
    import rootify_families

    rows = {r[0]: r for r in (rootify_families._calibrated_row(name, build, size, "root-8")
                              for name, (build, size) in rootify_families._zoo().items())}
    assert rows["subclasses (timm-ish)"][3:8] == ("2/4", "1/2", "0/2", "0", "no")
    assert rows["resnet18-ish"][3:5] == ("10/11", "10/10")
    assert rows["unet-ish"][3:5] == ("5/6", "5/5")
    # timm's BatchNormAct2d kept whole in the trace: conv1 permuted on its input side (from
    # the stem), conv2 on its output side (to the 1x1 conv3, which is refit)
    assert rows["norm-act (timm-ish)"][3:8] == ("2/3", "2/2", "2/2", "1", "yes")
    # the same through a frozen batch norm (torchvision's detection backbones), no subclass
    assert rows["frozen-norm (detection-ish)"][3:8] == ("2/3", "2/2", "2/2", "1", "yes")
    assert all(r[8] == "yes" for r in rows.values())
    assert all(r[7] == "yes" for n, r in rows.items() if n != "subclasses (timm-ish)")


def test_the_family_table_takes_the_models_named(monkeypatch, capsys):
    """--models: only the stand-ins whose names match a pattern are in the table; a pattern
    that matches none is one line naming the models there are."""
    import rootify_families

    monkeypatch.setattr(sys, "argv", ["rootify_families.py", "--models", "vgg-ish", "unet*"])
    rootify_families.main()
    out = capsys.readouterr().out
    assert "rootify root-8 on 2 models" in out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == ["vgg-ish", "unet-ish"]
    monkeypatch.setattr(sys, "argv", ["rootify_families.py", "--models", "tv/*"])
    with pytest.raises(SystemExit):
        rootify_families.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--models tv/* matches none of the 11 models: vgg-ish, resnet18-ish" in err


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3: says what it was asked to run; "bench ... fused" hangs
echo "ran: $*"
case "$*" in *"--path fused"*) sleep 30;; esac
exit 0
"""


def test_the_gpu_session_is_one_call_that_always_leaves_its_archive(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in for python (the steps' own programs are
    tested elsewhere): it exits 0, leaves at most 8 files in $OUT (the device tool returns
    8), one archive holding every step's log, and a summary line per step; a step that
    hangs is stopped at its limit and the steps before and after it keep their logs."""
    import os
    import subprocess
    import tarfile

    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "QUICK": "1", "L_BENCH": "3",
           "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["session.tar.gz", "summary.txt"] and len(files) <= 8
    with tarfile.open(out / "session.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames() if n.endswith(".txt")}
    steps = ["machine", "tests", "check", "train-nin-native", "train-nin-triton",
             "train-nin-root-8-native", "train-nin-root-8-triton", "bench-fold",
             "bench-dispatch", "bench-fused", "targets"]
    assert logs == {f"{s}.txt" for s in steps}
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary[:-1]] == steps
    fused = next(line for line in summary if line.startswith("bench-fused"))
    assert "exit 124" in fused and "(limit 3 s)" in fused  # stopped at its limit
    assert "exit 0" in next(line for line in summary if line.startswith("targets"))
    assert summary[-1].startswith("session: ")


def test_every_schedule_the_front_and_the_most_a_search_gains_by_hand():
    """benchmarks/conversion_search.py exhaustive: the Pareto front of hand-made points and,
    at a budget, the best of all against the best uniform one, with the 5% rule and
    without."""
    import conversion_search as cs
    from deeproots.conversion.frontier import Frontier, Point

    def point(label, kind, time, top1):
        return Point(label, kind, {}, top1, time, 0.0, 0.0, 0.0, 0.0)

    a, b = point("root-8", "uniform", 0.61, 0.900), point("root-4", "uniform", 0.66, 0.920)
    c, d = point("c", "other", 0.629, 0.915), point("d", "other", 0.599, 0.905)
    e, f = point("e", "other", 0.70, 0.910), point("f", "other", 0.64, 0.915)
    result = Frontier("m", "data", "cpu", 128, 0.93, points=[a, b, c, d, e, f])
    # fastest first, each more accurate than all faster: d, c, b (a, e under; f ties c)
    assert cs._pareto(result.points) == [d, c, b]
    # within 0.6 + 5% (0.63): c (0.915) against a (0.900), +1.5 points
    assert cs._best_within(result, 0.6, 0.05) == (c, a)
    # at most 0.6: d alone, and no uniform schedule is that fast
    assert cs._best_within(result, 0.6, 0.0) == (d, None)
    # within 0.7 (+5%): b, c and f; the best of all is the uniform b itself
    assert cs._best_within(result, 0.7, 0.05) == (b, b)
    # two as accurate: the faster (c at 0.629, not f at 0.64)
    assert cs._best_within(Frontier("m", "data", "cpu", 128, 0.93, points=[f, c]), 0.65,
                           0.0)[0] is c
