"""The benchmark scripts' own arithmetic, checked by hand (their timings need a GPU)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
gpu_targets = pytest.importorskip("gpu_targets")


def test_the_bounds_of_nin_root_8s_conv2a_block_by_hand():
    from deeproots.roofline import HARDWARE

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
    assert zoo.DeepStemNet  # the stand-in the row is built from
