"""Every registered model builds, runs forward and backward, and is grouped as its table says."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deeproots
import deeproots.models.registry
from deeproots import conv_layers, create_model, list_models
from deeproots.models import GoogLeNetOutputs

# Small inputs where the architecture allows (global pooling); GoogLeNet's paper layout has
# fixed-size classifiers and needs 223..238 pixels.
SMALL = {"nin": (3, 32, 32), "resnet": (3, 32, 32), "googlenet": (3, 224, 224)}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    family = deeproots.models.registry.model_entry(name).family
    model = create_model(name, num_classes=7)
    x = torch.randn(2, *SMALL[family])
    out = model(x)
    if isinstance(out, GoogLeNetOutputs):
        assert out.aux_logits1.shape == out.aux_logits2.shape == (2, 7)
        loss = F.cross_entropy(out.logits, torch.tensor([1, 2])) + 0.3 * sum(
            F.cross_entropy(a, torch.tensor([1, 2])) for a in out[1:])
        out = out.logits
    else:
        loss = F.cross_entropy(out, torch.tensor([1, 2]))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "name, layer, shape",
    [
        ("nin-root-8", "conv2a", (192, 96 // 8, 5, 5)),
        ("nin-root-8", "conv3a", (192, 192 // 4, 3, 3)),
        ("nin-tree-4", "conv3a", (192, 192 // 8, 3, 3)),
        ("nin-col-16", "conv3a", (192, 192 // 16, 3, 3)),
        ("resnet50-root-64", "layer1.2.conv2", (64, 1, 3, 3)),
        ("resnet50-root-64", "layer4.0.conv2", (512, 512 // 8, 3, 3)),
        ("resnet200-root-32", "layer3.30.conv2", (256, 256 // 8, 3, 3)),
        ("googlenet-root-16", "conv3", (192, 64 // 16, 3, 3)),
        ("googlenet-root-16", "inception3a.branch3.1", (32, 16 // 8, 5, 5)),
        ("googlenet-root-16", "inception5b.branch2.1", (384, 192 // 2, 3, 3)),
    ],
)
def test_grouped_weight_shape(name, layer, shape):
    assert tuple(conv_layers(create_model(name))[layer].weight.shape) == shape


def test_table3_schedule_is_n_n2_n4_n8():
    for n in (2, 4, 8, 16, 32, 64):
        model = create_model(f"resnet50-root-{n}")
        convs = conv_layers(model)
        for stage, div in zip(range(1, 5), (1, 2, 4, 8)):
            assert convs[f"layer{stage}.0.conv2"].groups == max(n // div, 1)
        assert all(c.groups == 1 for name, c in convs.items() if not name.endswith("conv2"))


def test_table7_schedule_groups_only_spatial_convs():
    convs = conv_layers(create_model("googlenet-root-8"))
    assert convs["conv3"].groups == 8
    assert convs["inception3b.branch3.1"].groups == 4
    assert convs["inception4e.branch2.1"].groups == 2
    assert convs["inception5a.branch2.1"].groups == 1
    one_by_one = [c for c in convs.values() if c.kernel_size == (1, 1)]
    assert one_by_one and all(c.groups == 1 for c in one_by_one)


def test_a_grouped_layers_weight_expands_to_the_block_diagonal_dense_weight():
    """deeproots' expansion of a grouped weight (what the block-diagonal init, the dispatch's
    dense lowering and the covariance analysis use) against a dense weight built here by
    hand: run through F.conv2d, both compute what the grouped conv does."""
    from deeproots.models.layers import expand_groups

    model = create_model("nin-root-4").eval()
    conv = model.conv2a.conv
    g, cout, cin_g = conv.groups, conv.out_channels, conv.in_channels // conv.groups
    by_hand = torch.zeros(cout, conv.in_channels, 5, 5)
    for i in range(g):
        rows = slice(i * cout // g, (i + 1) * cout // g)
        by_hand[rows, i * cin_g:(i + 1) * cin_g] = conv.weight[rows]
    expanded = expand_groups(conv.weight.detach(), g)
    torch.testing.assert_close(expanded, by_hand.detach(), rtol=0, atol=0)
    x = torch.randn(2, conv.in_channels, 9, 9)
    torch.testing.assert_close(F.conv2d(x, expanded, conv.bias, padding=2), conv(x),
                               rtol=1e-4, atol=1e-4)


def test_fashion_mnist_shaped_input():
    model = create_model("nin-root-8", in_channels=1, num_classes=10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_he_initialisation_scale():
    conv = create_model("nin").conv2b.conv  # 1x1, 192 inputs: std sqrt(2/192)
    assert abs(conv.weight.std().item() - (2 / 192) ** 0.5) < 0.01


def test_explicit_groups_override_schedule():
    model = create_model("resnet50-root-8", groups={"layer4.*.conv2": 4, "layer1.0.conv2": 1})
    convs = conv_layers(model)
    assert convs["layer4.2.conv2"].groups == 4
    assert convs["layer1.0.conv2"].groups == 1 and convs["layer1.1.conv2"].groups == 8


def test_heterogeneous_schedule_on_orig():
    model = create_model("nin", groups={"conv2a": 3, "conv3a": 6, "conv1b": 2})
    assert [model.conv2a.conv.groups, model.conv3a.conv.groups, model.conv1b.conv.groups] == [
        3, 6, 2]


def test_standard_googlenet_layout():
    model = create_model("googlenet", layout="standard", aux_logits=False).eval()
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)
    assert model.aux1 is None


def test_resnet_stride_placement_costs():
    """torchvision's stride-on-3x3 layout costs more than the paper's stride-on-1x1."""
    for name in ("resnet50", "resnet50-root-64"):  # 6.0% and 10.9% more
        paper = deeproots.profile(create_model(name)).macs
        tv = deeproots.profile(create_model(name, stride_in_1x1=False)).macs
        assert 1.05 < tv / paper < 1.12


def test_convert_a_users_cnn():
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(64, 64, 1))
    deeproots.convert(net, {"2": 8})
    assert net[2].groups == 8 and tuple(net[2].weight.shape) == (64, 4, 3, 3)
    assert net(torch.randn(1, 3, 8, 8)).shape == (1, 64, 8, 8)
    # per pixel: 32 filters of 3x3x3, 64 of 3x3x(32/8), 64 of 1x1x64; 8x8 pixels
    assert deeproots.profile(net, (3, 8, 8)).macs == 64 * (32 * 27 + 64 * 4 * 9 + 64 * 64)


def test_input_size_limits_are_the_real_ones():
    """At min_input_size the layers run; one pixel less, torch itself fails."""
    for name, kwargs in [("nin", {}), ("googlenet", {"layout": "standard"})]:
        model = create_model(name, **kwargs).eval()
        s = model.min_input_size
        model(torch.zeros(1, 3, s, s))
        with pytest.raises(ValueError, match=f"at least {s}"):
            model(torch.zeros(1, 3, s - 1, s - 1))
        model.min_input_size = 1
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, s - 1, s - 1))
    model = create_model("googlenet")
    model(torch.zeros(2, 3, 223, 223))
    model(torch.zeros(2, 3, 238, 238))
    for bad in (222, 239):
        with pytest.raises(ValueError, match="from 223 to 238"):
            model(torch.zeros(2, 3, bad, bad))


def test_torchvision_layout_has_torchvisions_published_counts():
    """stride_in_1x1=False is torchvision's ResNet-50 ("v1.5"): its model card publishes
    25,557,032 parameters and 4.09 GFLOPS (multiply-adds) at 224x224."""
    cost = deeproots.profile(create_model("resnet50", stride_in_1x1=False))
    assert cost.total_params == 25_557_032
    assert round(cost.macs / 1e9, 2) == 4.09


def test_an_override_of_a_schedule_key_replaces_that_row():
    model = create_model("resnet50-root-8", groups={"layer1.*.conv2": 2, "layer3.*.conv2": 1})
    groups = {name: conv.groups for name, conv in conv_layers(model).items()}
    assert groups["layer1.0.conv2"] == groups["layer1.2.conv2"] == 2  # not the schedule's 8
    assert groups["layer2.0.conv2"] == 4  # the schedule's, untouched
    assert groups["layer3.5.conv2"] == 1  # ungrouped by the override
    assert model.groups["layer1.1.conv2"] == 2
