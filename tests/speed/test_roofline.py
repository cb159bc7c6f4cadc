"""The roofline bound against hand computations, and the command."""
import json

import pytest
from torch import nn

from deeproots.cli import main
from deeproots.speed.roofline import HARDWARE, Hardware, format_roofline, roofline

TOY = Hardware("toy", {"bfloat16": 100e12, "float32": 50e12, "float16": 100e12}, 1e12)


class OneConv(nn.Module):
    default_input_size = (64, 56, 56)

    def __init__(self, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def test_a_conv_and_a_relu_by_hand():
    r = roofline(OneConv(), hardware=TOY, dtype="bfloat16", batch_size=8)
    conv, relu = r.layers
    macs = 8 * 56 * 56 * 64 * 64 * 9
    acts = 8 * 64 * 56 * 56  # elements of the input, and of the output
    assert conv.macs == macs and conv.bytes == 2 * (2 * acts + 64 * 64 * 9)
    assert conv.bound_s == pytest.approx(max(2 * macs / 100e12, conv.bytes / 1e12))
    assert conv.limit == "compute"  # 14.8 GFLOP at 100 TFLOP/s > 6.4 MB at 1 TB/s
    assert relu.bytes == 2 * 2 * acts and relu.limit == "memory"
    assert r.unfused_s == pytest.approx(conv.bound_s + relu.bound_s)
    assert r.fused_s == pytest.approx(conv.bound_s)
    depthwise = roofline(OneConv(groups=64), hardware=TOY, batch_size=8).layers[0]
    assert depthwise.macs == macs // 64 and depthwise.limit == "memory"


def test_the_data_sheet_roofs_and_overrides():
    assert HARDWARE["h100"].bandwidth == 3.35e12 and HARDWARE["h200"].bandwidth == 4.8e12
    r = roofline("nin", hardware="h100", batch_size=2, peak_tflops=1.0, bandwidth_tbs=0.5)
    assert r.peak_flops == 1e12 and r.bandwidth == 0.5e12
    with pytest.raises(ValueError, match="device must be one of h100, h200, a100, cpu; got 'v100'"):
        roofline("nin", hardware="v100")
    model = OneConv().train()
    roofline(model, hardware=TOY)
    assert model.training and model.conv.weight.device.type == "cpu"  # untouched


def test_a_cpus_small_peak_is_printed_in_its_digits_not_as_zero():
    """A 2-core CPU's 76.1 GFLOP/s is 0.0761 TFLOP/s (it was printed as 0); a data sheet's
    989 stays whole."""
    cpu = Hardware("a small CPU", {"bfloat16": 7.61e10, "float32": 7.61e10,
                                   "float16": 7.61e10}, 3.2e10)
    head = format_roofline(roofline(OneConv(), hardware=cpu, batch_size=2)).splitlines()[0]
    assert head.endswith("(peak 0.0761 TFLOP/s, 0.032 TB/s)"), head
    head = format_roofline(roofline(OneConv(), hardware="h100", batch_size=2)).splitlines()[0]
    assert head.endswith("(peak 989 TFLOP/s, 3.35 TB/s)"), head


def test_root_networks_are_memory_bound_on_an_h100(capsys):
    """The GPU issue's point: with elementwise layers fused, NiN root-8's best speedup over
    NiN on an H100 is 1.32x in bf16 at batch 256, against 2.15x in multiply-adds."""
    assert main(["roofline", "nin", "nin-root-8", "--json"]) == 0
    nin, root = json.loads(capsys.readouterr().out)
    assert round(nin["fused_s"] / root["fused_s"], 2) == 1.32
    assert main(["roofline", "nin", "nin-root-8"]) == 0
    assert "nin-root-8 over nin: at best" in capsys.readouterr().out
