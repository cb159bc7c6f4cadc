"""rootify: the paper's rule on deeproots' own networks (must give the registered variants)
and on CNNs written here by hand, cost budgets, block-diagonal weights, and bad input."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deeproots
from deeproots import conv_layers
from deeproots.conversion import block_diagonal_weight, rootify
import zoo
from zoo import macs


def _groups(model):
    return {name: c.groups for name, c in conv_layers(model).items()}


@pytest.mark.parametrize("family, schedules", [
    ("nin", [f"{k}-{n}" for k in ("root", "tree", "col") for n in (2, 4, 8, 16)]),
    ("resnet50", [f"root-{n}" for n in (2, 4, 8, 16, 32, 64)]),
    ("googlenet", [f"root-{n}" for n in (2, 4, 8, 16)]),
])
def test_the_rule_gives_the_registered_variants_layer_by_layer(family, schedules):
    orig = deeproots.create_model(family)
    for schedule in schedules:
        new, report = rootify(orig, schedule)
        assert _groups(new) == _groups(deeproots.create_model(f"{family}-{schedule}")), schedule
    assert set(_groups(orig).values()) == {1}  # the input model is untouched


def test_the_report_counts_match_the_paper():
    """ResNet-50 root-64 through rootify: Table 4's 2.11 x 10^9 multiply-adds and
    1.53 x 10^7 parameters, from 3.86 and 2.55."""
    _, report = rootify(deeproots.create_model("resnet50"), "root-64")
    assert round(report.macs_before / 1e9, 2) == 3.86 and round(report.macs_after / 1e9, 2) == 2.11
    assert round(report.params_after / 1e7, 2) == 1.53
    rows = {c.layer: c for c in report.layers}
    assert (rows["layer1.0.conv2"].groups_before, rows["layer1.0.conv2"].groups_after) == (1, 64)
    assert rows["conv1"].note == "stem: reads the 3-channel input"
    assert rows["layer1.0.conv1"].note.startswith("1x1")
    # 3x3, 64 -> 64 channels at 56x56 in 64 groups, by hand
    assert rows["layer1.0.conv2"].macs_after == macs(56, 56, 64, 64, 3, 64)
    text = report.table()
    assert "layer1.0.conv2" in text and "1 -> 64" in text and "(54.8%)" in text
    assert report.groups["layer4.2.conv2"] == 8 and "layer1.0.conv1" not in report.groups


def _check(model, schedule, expected, hand_macs, size=(3, 32, 32), **kwargs):
    """Groups per layer as computed by hand, output shape kept, forward and backward run,
    multiply-adds after = the hand count, the input model untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups_before = _groups(model)
    x = torch.randn(2, *size)
    new, report = rootify(model, schedule, example_input=x[:1], **kwargs)
    assert _groups(model) == groups_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    got = _groups(new)
    assert {k: got[k] for k in expected} == expected
    assert report.macs_after == hand_macs
    assert deeproots.profile(new, size).macs == hand_macs
    assert new(x).shape == model(x).shape
    new(x).sum().backward()
    return report


def test_vgg_style():
    report = _check(zoo.vgg(), "root-4", {"0": 1, "2": 4, "5": 2, "7": 2, "10": 1},
                    macs(32, 32, 3, 16) + macs(32, 32, 16, 16, 3, 4) + macs(16, 16, 16, 32, 3, 2)
                    + macs(16, 16, 32, 32, 3, 2) + macs(8, 8, 32, 64) + 64 * 10)
    assert {c.layer: c.resolution for c in report.layers}["5"] == "16x16"


def test_resnet18_style_with_strided_shortcuts():
    expected = {"stem": 1, "layer1.0.conv1": 4, "layer1.1.conv2": 4, "layer2.0.conv1": 2,
                "layer2.0.conv2": 2, "layer2.0.shortcut.0": 1, "layer3.0.conv1": 1}
    hand = (macs(32, 32, 3, 16) + 4 * macs(32, 32, 16, 16, 3, 4)
            + macs(16, 16, 16, 32, 3, 2) + 3 * macs(16, 16, 32, 32, 3, 2) + macs(16, 16, 16, 32, 1)
            + macs(8, 8, 32, 64) + macs(8, 8, 64, 64) + macs(8, 8, 32, 64, 1) + 64 * 10)
    _check(zoo.ResNet18ish(), "root-4", expected, hand)


def test_resnext_style_keeps_its_groups_unless_asked():
    model = zoo.ResNeXtish()
    hand = (macs(32, 32, 3, 32) + macs(32, 32, 32, 32, 1) + macs(32, 32, 32, 32, 3, 8)
            + macs(32, 32, 32, 32, 1) + macs(16, 16, 32, 64, 1) + macs(16, 16, 64, 64, 3, 8)
            + macs(16, 16, 64, 64, 1) + macs(16, 16, 64, 64, 3, 2) + 64 * 10)
    # the grouped convs at 32x32 set level 0, so the dense 3x3 at 16x16 gets 4 / 2
    report = _check(model, "root-4", {"block1.1": 8, "block2.1": 8, "dense": 2}, hand)
    assert {c.layer: c.note for c in report.layers}["block1.1"].startswith("already in 8 groups")
    new, _ = rootify(model, "root-4", example_input=torch.zeros(1, 3, 32, 32), regroup=True)
    assert _groups(new)["block1.1"] == 4 and _groups(new)["block2.1"] == 2


def test_mobilenet_style_leaves_depthwise_convs():
    hand = (macs(16, 16, 3, 32) + macs(16, 16, 32, 32, 3, 32) + macs(16, 16, 32, 64, 1)
            + macs(8, 8, 64, 64, 3, 64) + macs(8, 8, 64, 128, 1) + macs(8, 8, 128, 128, 3, 2)
            + 128 * 10)
    report = _check(zoo.mobilenet(), "root-4", {"2": 32, "4": 64, "6": 2}, hand)
    assert {c.layer: c.note for c in report.layers}["2"].startswith("depthwise")


def test_densenet_style_concatenations_and_the_largest_dividing_count():
    hand = (macs(32, 32, 3, 16) + macs(32, 32, 16, 8, 3, 8) + macs(32, 32, 24, 8, 3, 8)
            + macs(32, 32, 32, 16, 1) + macs(16, 16, 16, 8, 3, 8) + 24 * 10)
    # root-16: d1 and d2 write 8 channels, so 16 groups become 8; d3 at 16x16 gets 8
    report = _check(zoo.DenseBlockNet(), "root-16", {"d1": 8, "d2": 8, "d3": 8}, hand)
    notes = {c.layer: c.note for c in report.layers}
    assert notes["d1"] == "the rule's 16 does not divide 16 -> 8 channels; 8 does"
    assert notes["d3"] == ""


def test_unet_style_encoder_decoder_by_resolution():
    hand = (macs(32, 32, 3, 16) + macs(32, 32, 16, 16, 3, 4) + macs(16, 16, 16, 32, 3, 2)
            + macs(8, 8, 32, 32) + macs(16, 16, 64, 32, 3, 2) + macs(32, 32, 48, 16, 3, 4)
            + macs(32, 32, 16, 2, 1))
    _check(zoo.UNetish(), "root-4",
           {"enc1b": 4, "enc2": 2, "bottom": 1, "dec2": 2, "dec1": 4, "head": 1}, hand)


def test_dilated_convs_keep_their_dilation():
    hand = macs(32, 32, 3, 16) + macs(32, 32, 16, 32, 3, 8) + macs(16, 16, 32, 32, 3, 4) + 320
    _check(zoo.dilated(), "root-8", {"1": 8, "2": 4}, hand)
    new, _ = rootify(zoo.dilated(), "root-8", example_input=torch.zeros(1, 3, 32, 32))
    assert new[1].dilation == (2, 2) and new[2].dilation == (4, 4) and new[2].stride == (2, 2)


def test_one_channel_input():
    hand = macs(28, 28, 1, 8) + macs(28, 28, 8, 16, 3, 4) + macs(14, 14, 16, 16, 3, 2) + 160
    report = _check(zoo.one_channel(), "root-4", {"0": 1, "1": 4, "3": 2}, hand, size=(1, 28, 28))
    assert report.layers[0].note == "stem: reads the 1-channel input"


def test_mappings_by_layer_and_by_resolution():
    model = zoo.vgg()
    x = torch.zeros(1, 3, 32, 32)
    new, _ = rootify(model, {"16x16": 4, "2": 2}, example_input=x)
    assert _groups(new) == {"0": 1, "2": 2, "5": 4, "7": 4, "10": 1}


def test_a_budget_picks_the_smallest_root_that_meets_it():
    """Table 4: root-8 has 2.86 / 3.86 = 74% of ResNet-50's multiply-adds, root-4 87%;
    root-32 has 1.64 / 2.55 = 64% of its parameters, root-16 73%."""
    resnet = deeproots.create_model("resnet50")
    assert rootify(resnet, macs=0.75)[1].schedule == "root-8"
    assert rootify(resnet, params=0.7)[1].schedule == "root-32"
    with pytest.raises(ValueError, match=r"no root-N schedule brings macs to 0.1 of the "
                                         r"model's; the smallest fraction is 0\.5"):
        rootify(resnet, macs=0.1)


def test_block_diagonal_weights_compute_the_masked_dense_conv():
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    w = block_diagonal_weight(dense.weight, 4)
    assert w.shape == (12, 2, 3, 3)
    mask = torch.zeros(12, 8, 1, 1)
    for o in range(12):
        mask[o, (o // 3) * 2:(o // 3) * 2 + 2] = 1  # output group o // 3 sees inputs 2g, 2g+1
    reference = F.conv2d(x, dense.weight * mask, dense.bias, padding=1)
    assert torch.allclose(F.conv2d(x, w, dense.bias, padding=1, groups=4), reference, atol=1e-6)
    # from 2 groups to 4: each new group is half of an old one
    w2 = block_diagonal_weight(torch.randn(12, 4, 3, 3), 4, groups_before=2)
    assert w2.shape == (12, 2, 3, 3)


def test_block_diagonal_init_keeps_the_trained_blocks():
    model = zoo.vgg()
    new, _ = rootify(model, "root-4", example_input=torch.zeros(1, 3, 32, 32),
                     init="block-diagonal")
    assert torch.equal(new[2].weight, block_diagonal_weight(model[2].weight, 4))


def test_bad_input():
    only_1x1 = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    with pytest.raises(ValueError, match="has no spatial convolutions"):
        rootify(only_1x1, "root-2", example_input=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"could not run Sequential on an example input of "
                                         r"shape \(1, 1, 32, 32\)"):
        rootify(zoo.vgg(), "root-2", example_input=torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="schedule must be root-N, tree-N or col-N.*'root8'"):
        rootify(zoo.vgg(), "root8", example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="ignore 'features.3' matches no conv layer"):
        rootify(zoo.vgg(), "root-2", example_input=torch.zeros(1, 3, 32, 32),
                ignore=["features.3"])
    with pytest.raises(ValueError, match="schedule key 'enc2b' matches no conv layer or "
                                         "resolution; closest: enc2"):
        rootify(zoo.UNetish(), {"enc2b": 2}, example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="give a schedule .* or one budget"):
        rootify(zoo.vgg(), "root-2", macs=0.5, example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="has no default input size; give example_input"):
        rootify(zoo.vgg(), "root-2")
    with pytest.raises(ValueError, match="init must be one of reinit, block-diagonal"):
        rootify(zoo.vgg(), "root-2", init="copy")
