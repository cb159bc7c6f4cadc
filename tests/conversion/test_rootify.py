"""rootify: the paper's rule on deeproots' own networks (must give the registered variants)
and on CNNs written here by hand, cost budgets, block-diagonal weights, and bad input."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deeproots
from deeproots import conv_layers
from deeproots.conversion.rule import block_diagonal_weight, rootify
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


X32 = torch.zeros(1, 3, 32, 32)


def test_a_conv_subclass_keeps_its_class_or_is_left_with_the_reason():
    """timm's Conv2dSame pads in forward, a gain conv has an extra parameter: both are
    regrouped in place, as what they are. A weight-standardised conv would standardise over
    other statistics in groups: left as it was, and the report says why."""
    model = zoo.SubclassNet()
    new, report = rootify(model, "root-4", example_input=X32)
    assert type(new.same) is zoo.SamePadConv2d and type(new.gained) is zoo.GainConv2d
    assert (new.same.groups, new.gained.groups, new.standardised.groups) == (4, 4, 1)
    assert new.same.padding == (0, 0)  # still padding in forward, not a Conv2d(padding=0)
    assert new.same(torch.zeros(1, 16, 16, 16)).shape == (1, 16, 16, 16)
    assert torch.equal(new.gained.gain, model.gained.gain)  # its own parameter, kept
    notes = {c.layer: c.note for c in report.layers}
    assert "StdGainConv2d computes something else in 4 groups" in notes["standardised"]
    # multiply-adds after, by hand: stem 3->16 s2, same 16->16 g4, gained 16->32 g4,
    # standardised 32->32 dense, all at 16x16; fc
    assert report.macs_after == (macs(16, 16, 3, 16) + macs(16, 16, 16, 16, 3, 4)
                                 + macs(16, 16, 16, 32, 3, 4) + macs(16, 16, 32, 32) + 320)
    with pytest.raises(ValueError, match=r"layer 'standardised': StdGainConv2d computes "
                                         r"something else in 2 groups"):
        deeproots.convert(zoo.SubclassNet(), {"standardised": 2})


def test_a_regrouped_subclass_computes_its_block_diagonal_dense_form():
    from deeproots.models.layers import expand_groups, regroup

    torch.manual_seed(0)
    dense = zoo.SamePadConv2d(8, 8, 3, stride=2)
    grouped = regroup(zoo.SamePadConv2d(8, 8, 3, stride=2), 4)
    with torch.no_grad():
        dense.weight.copy_(expand_groups(grouped.weight, 4))
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(grouped(x), dense(x), atol=1e-6) and grouped(x).shape[-1] == 5


def test_a_shared_conv_stays_one_module():
    model = zoo.SharedConvNet()
    new, report = rootify(model, "root-2", example_input=X32)
    assert new.again is new.block and new.block.groups == 2
    rows = {c.layer: c for c in report.layers}
    assert rows["block"].note == "one module, also reached as again"
    # params by hand: stem 3*8*9, block 8*8*9 -> 8*4*9, fc 8*10 + 10
    assert (report.params_before, report.params_after) == (216 + 576 + 90, 216 + 288 + 90)
    assert report.macs_after == macs(32, 32, 3, 8) + 2 * macs(32, 32, 8, 8, 3, 2) + 80


def test_a_budget_no_schedule_can_reach_says_why():
    depthwise = nn.Sequential(zoo.conv(3, 16), zoo.conv(16, 16, groups=16), zoo.conv(16, 32, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match=r"no root-N schedule brings macs to 0.5 of the "
                                         r"model's: root-N changes nothing here \(its spatial "
                                         r"convs after the stem are depthwise or already "
                                         r"grouped; regroup=True"):
        rootify(depthwise, macs=0.5, example_input=X32)
    with pytest.raises(ValueError, match=r"every spatial conv after the stem is ignored"):
        rootify(zoo.vgg(), macs=0.5, example_input=X32, ignore=["*"])


def test_a_huge_count_is_refused_at_once():
    with pytest.raises(ValueError, match=r"schedule root-99999999999999: 99999999999999 groups "
                                         r"is more than the channels of any conv it groups "
                                         r"\(at most 192\); give N from 1 to 192"):
        rootify(deeproots.create_model("nin"), "root-99999999999999")
    new, _ = rootify(deeproots.create_model("nin"), "root-192", allow_depthwise=True)
    assert conv_layers(new)["conv2a"].groups == 96  # the largest that divides 96 -> 192


def test_a_conv_becomes_depthwise_only_when_asked():
    """root-32 on a 16 -> 16 conv: rounding 32 down to a divisor gives 16 groups, depthwise
    (DLA-34's level0 at root-32); by default the largest count below that, 8."""
    model = nn.Sequential(zoo.conv(3, 16), zoo.conv(16, 16), nn.MaxPool2d(2), zoo.conv(16, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    new, report = rootify(model, "root-32", example_input=X32)
    assert new[1].groups == 8 and "keeps it from becoming depthwise" in report.layers[1].note
    assert new[3].groups == 16  # 16x16, level 1: the rule's own 16, followed
    new, _ = rootify(model, "root-32", example_input=X32, allow_depthwise=True)
    assert new[1].groups == 16
    # a rule that asks for the channel count itself is followed: ResNet-50 root-64
    new, _ = rootify(deeproots.create_model("resnet50"), "root-64")
    assert conv_layers(new)["layer1.0.conv2"].groups == 64


def test_levels_can_count_from_the_blocks_after_a_deep_stem():
    """ResNet-D's deep stem: by the paper's rule its 2nd and 3rd 3x3 convs take the N
    groups; with stem='resolution' they are stem, and the blocks start at level 0."""
    model = zoo.DeepStemNet()
    new, _ = rootify(model, "root-8", example_input=X32)
    assert _groups(new) == {"stem.0": 1, "stem.2": 8, "stem.4": 8, "layer1": 4, "layer2": 2}
    new, report = rootify(model, "root-8", example_input=X32, stem="resolution")
    assert _groups(new) == {"stem.0": 1, "stem.2": 1, "stem.4": 1, "layer1": 8, "layer2": 4}
    assert "stem: at the first conv's resolution (16x16" in report.layers[1].note
    with pytest.raises(ValueError, match="stem must be one of input, resolution; got 'deep'"):
        rootify(model, "root-8", example_input=X32, stem="deep")


class _NeverRun(nn.Module):
    """A model whose forward pass must not be reached (a model that takes minutes, or hangs,
    to run)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.body = nn.Conv2d(16, 32, 3)

    def forward(self, x):
        raise AssertionError("the forward pass ran")


@pytest.mark.parametrize("args, kwargs, message", [
    (("root-99999999999999",), {}, r"99999999999999 groups is more than the channels of any "
                                   r"conv it groups \(at most 32\)"),
    (("root8",), {}, "schedule must be root-N, tree-N or col-N"),
    ((), {"macs": float("nan")}, "macs must be a finite number > 0; got nan"),
    (("root-2",), {"ignore": ["bdy"]}, "ignore 'bdy' matches no conv layer; closest: body"),
    (("root-2",), {"ignore": "body"}, "ignore takes a list of layer names or patterns"),
    (({"body": 0},), {}, "groups for 'body' must be a whole number >= 1; got 0"),
])
def test_arguments_are_checked_before_the_model_runs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rootify(_NeverRun(), *args, example_input=torch.zeros(1, 3, 8, 8), **kwargs)


def test_a_schedule_that_groups_nothing_says_why_and_what_would():
    root8 = deeproots.create_model("nin-root-8")
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"groups no conv of NiN here: its spatial convs after "
                                         r"the stem are grouped already; regroup=True"):
        rootify(root8, "root-8", example_input=x[:1], calibration=x)
    with pytest.raises(ValueError, match=r"it gives each conv it reaches the groups it has "
                                         r"already \(conv2a: 8\); give another N"):
        rootify(root8, "root-8", example_input=x[:1], calibration=x, regroup=True)


def test_the_command_takes_per_layer_groups_as_a_budget_prints_them(capsys):
    """``--schedule conv2a=4,conv3a=2`` is nin-root-4's schedule (Table 8: conv2a 4 groups,
    conv3a 2), the form a budgeted conversion prints; a malformed one is one line."""
    import json

    from deeproots.cli import main

    assert main(["rootify", "nin", "--schedule", "conv2a=4,conv3a=2", "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)
    assert main(["rootify", "nin", "--schedule", "root-4", "--json"]) == 0
    root4 = json.loads(capsys.readouterr().out)
    assert {r["layer"]: r["groups_after"] for r in mine["layers"]
            if r["groups_after"] > 1} == {"conv2a": 4, "conv3a": 2}
    assert mine["macs_after"] == root4["macs_after"]
    assert main(["rootify", "nin", "--schedule", "conv2a=four"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deeproots rootify: error: --schedule takes LAYER=GROUPS (e.g. conv2a=8 or "
                   "'layer1.*.conv2=4'); got 'conv2a=four'"]


def test_the_command_builds_a_named_model_for_the_channels_of_its_input_size(capsys):
    """``rootify resnet50 --input-size 1,28,28`` (Fashion-MNIST's images) builds resnet50 for
    one channel, as bench and roofline do: the command has no --in-channels, and the
    refusal it gave advised building the model with in_channels=1. By hand at 28x28: the
    stem (7x7, stride 2) reads 1 channel at 14x14 (1 x 64 x 49 x 196 multiply-adds), the
    max pool halves it to 7x7 for layer1, layer2 runs at 4x4, layer3 at 2x2 and layer4 at
    1x1; root-8 gives them 8, 4, 2 and 1 groups."""
    import json

    from deeproots.cli import main

    assert main(["rootify", "resnet50", "--schedule", "root-8", "--input-size", "1,28,28",
                 "--json"]) == 0
    rows = {r["layer"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["conv1"]["macs_before"] == 1 * 64 * 7 * 7 * 14 * 14
    for stage, (side, groups) in enumerate([(7, 8), (4, 4), (2, 2), (1, 1)], 1):
        row = rows[f"layer{stage}.0.conv2"]
        assert (row["resolution"], row["groups_after"]) == (f"{side}x{side}", groups)


def test_a_schedule_that_groups_nothing_names_the_convs_it_leaves_first():
    """Every spatial conv after the stem weight-standardised (timm's NF-ResNet): root-N groups
    nothing, and the reason is theirs (another N would not group them), not the rule's."""
    import zoo

    class AllStandardised(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = zoo.StdGainConv2d(16, 32)
            self.b = zoo.StdGainConv2d(32, 32)

        def forward(self, x):
            return self.b(self.a(self.stem(x))).mean((2, 3))

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"groups no conv of AllStandardised here: 2 of its "
                                         r"spatial convs would compute something else grouped "
                                         r"\(StdGainConv2d, e.g. a: "):
        rootify(AllStandardised(), "root-4", example_input=x[:1], calibration=x)


def test_a_latency_budget_asked_of_rootify_points_to_convert_model():
    """rootify counts its budgets; a latency budget is one line naming the call that
    measures one, before the model runs."""
    with pytest.raises(ValueError, match=r"^rootify's budgets are counted \(macs, params\); a "
                                         r"latency budget \(0.7\) is measured and searched, "
                                         r"layer by layer: deeproots.convert_model\(model, "
                                         r"latency=0.7, calibration=images, select=\(x, y\)\)$"):
        rootify(_NeverRun(), latency=0.7, example_input=torch.zeros(1, 3, 8, 8))


def _channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("calibrated", [False, True], ids=["structural", "calibrated"])
def test_the_root_network_is_held_as_the_model_is(calibrated):
    """A channels-last model gives a channels-last root network (its grouped convs' new
    weights too), a contiguous one a contiguous network, with or without calibration (the
    calibration passes run channels-last)."""
    x = torch.randn(16, 3, 16, 16)
    options = dict(calibration=x) if calibrated else dict(example_input=x[:1])
    for fmt, want in ((torch.channels_last, True), (torch.contiguous_format, False)):
        model = zoo.NormActNet().eval().to(memory_format=fmt)
        new, _ = rootify(model, "root-4", **options)
        assert new.conv2.groups == 4
        assert [_channels_last(c.weight) for c in (new.stem, new.conv1, new.conv2)] == \
            [want] * 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_calibrated_in_float32_and_returned_in_its_own(dtype):
    """A calibrated conversion of a float16 or bfloat16 model (one line from inside torch
    before: float images against half weights) computes on a float32 copy: its weights are
    those of the same conversion of the float32 model it holds, cast to its dtype; the
    model is unchanged; convert_model alike."""
    from deeproots.conversion.checkpoint import convert_model

    torch.manual_seed(0)
    model = zoo.NormActNet().eval().to(dtype)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 3, 16, 16)
    new, _ = rootify(model, "root-4", calibration=x)
    held = copy.deepcopy(model).float()  # the float32 model it holds
    want, _ = rootify(held, "root-4", calibration=x)
    for name, t in new.state_dict().items():
        assert t.dtype == kept[name].dtype, name
        assert torch.equal(t, want.state_dict()[name].to(t.dtype)), name
    assert all(model.state_dict()[k].dtype == dtype and torch.equal(model.state_dict()[k], v)
               for k, v in kept.items() if v.is_floating_point())
    with torch.no_grad():
        assert new(x[:2].to(dtype)).dtype == dtype
    converted, _, _ = convert_model(model, "root-4", calibration=x)
    want, _, _ = convert_model(held, "root-4", calibration=x)
    for name, t in converted.state_dict().items():
        assert t.dtype == kept[name].dtype, name
        assert torch.equal(t, want.state_dict()[name].to(t.dtype)), name
