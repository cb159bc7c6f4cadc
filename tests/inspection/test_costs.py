"""The cost counter against hand computations, on our models and on plain torch modules."""
import json

import pytest
import torch
from torch import nn

import deeproots
from deeproots import profile


def test_grouped_conv_by_hand():
    # 16 filters of 3x3x(8/4) over a 5x5 output: 16*2*9*25 multiply-adds.
    layer = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    cost = profile(layer, (8, 5, 5))
    assert cost.macs == 16 * 2 * 9 * 25 == 7200
    assert cost.params == 16 * 2 * 9 + 16
    assert cost.conv_bias_params == 16
    (row,) = cost.layers
    assert (row.groups, row.kernel, row.output_shape) == (4, "3x3", (16, 5, 5))


def test_any_module_with_linear_and_batch_norm():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )
    cost = profile(model, (3, 7, 7))
    assert cost.macs == 4 * 3 * 9 * 9 + 36 * 5
    assert cost.params == 4 * 27 + 4 + 36 * 5 + 5
    assert cost.bn_params == 8
    assert cost.total_params == sum(p.numel() for p in model.parameters())


def test_nin_orig_by_hand():
    """Table 8's orig row from the layer list of Section 4.1, counted by hand."""
    layers = [  # (k, cin, cout, map side)
        (5, 3, 192, 32), (1, 192, 160, 32), (1, 160, 96, 32),
        (5, 96, 192, 16), (1, 192, 192, 16), (1, 192, 192, 16),
        (3, 192, 192, 8), (1, 192, 192, 8), (1, 192, 10, 8),
    ]
    macs = sum(k * k * cin * cout * s * s for k, cin, cout, s in layers)
    params = sum(k * k * cin * cout + cout for k, cin, cout, _ in layers)
    cost = profile(deeproots.create_model("nin"))
    assert (cost.macs, cost.params) == (macs, params) == (222_486_528, 966_986)
    assert [layer.name for layer in cost.layers] == [
        "conv1a", "conv1b", "conv1c", "conv2a", "conv2b", "conv2c", "conv3a", "conv3b", "conv3c"
    ]


def test_meta_device_counts_equal_real_ones():
    real = profile(deeproots.create_model("resnet50-root-8"))
    with torch.device("meta"):
        meta = profile(deeproots.create_model("resnet50-root-8"))
    assert (real.macs, real.params) == (meta.macs, meta.params)


def test_training_graph_counts_googlenet_aux_heads_and_keeps_bn_stats():
    model = deeproots.create_model("googlenet", num_classes=10)
    before = model.inception3a.branch1.bn.running_mean.clone()
    model.eval()
    eval_cost = profile(model)
    train_cost = profile(model, training=True)
    aux = [layer for layer in train_cost.layers if layer.name.startswith("aux")]
    aux_macs = sum(layer.macs for layer in aux)
    # aux head: 1x1 conv 512/528 -> 128 on 5x5, FC 3200 -> 1024, FC 1024 -> 10
    assert aux_macs == (512 + 528) * 128 * 25 + 2 * (3200 * 1024 + 1024 * 10)
    assert train_cost.macs - eval_cost.macs == aux_macs
    assert all(layer.calls == 0 for layer in eval_cost.layers if layer.name.startswith("aux"))
    assert torch.equal(model.inception3a.branch1.bn.running_mean, before)
    assert not model.training


def test_json_and_table_forms():
    cost = profile(deeproots.create_model("nin-root-8"))
    data = json.loads(cost.to_json())
    assert data["macs"] == 103_342_080 and data["params"] == 314_954
    assert data["layers"][3]["name"] == "conv2a" and data["layers"][3]["groups"] == 8
    text = cost.table()
    assert "conv2a" in text and "103,342,080" in text


@pytest.mark.parametrize("size", [0, (3, 0, 4), (1, 2, 3, 4), "big", (3.5, 4)])
def test_bad_input_size(size):
    with pytest.raises(ValueError, match="input_size"):
        profile(nn.Conv2d(3, 3, 1), size)


def test_input_sizes_forms_agree():
    model = deeproots.create_model("nin")
    assert profile(model, 32).macs == profile(model, (32, 32)).macs == profile(
        model, (3, 32, 32)).macs == profile(model).macs


def test_every_parameter_and_multiply_add_is_in_a_row():
    """A functional conv, a transposed conv and a linear: each a row, by hand; the rows sum
    to the totals; every parameter once."""
    import zoo

    model = zoo.FunctionalNet()
    cost = deeproots.profile(model, (3, 8, 8))
    rows = {r.name: r for r in cost.layers}
    assert rows["(FunctionalNet)"].macs == 8 * 8 * 8 * 27  # F.conv2d(x, self.w), pad 1
    assert rows["(FunctionalNet)"].params == 216 and rows["up"].type == "ConvTranspose2d"
    assert rows["up"].macs == 8 * 8 * 8 * 4 * 4  # each input pixel to a 2x2 patch of 4
    assert rows["fc"].macs == 40
    assert sum(r.macs for r in cost.layers) == cost.macs and cost.other_macs == 0
    assert cost.total_params == sum(p.numel() for p in model.parameters()) == cost.params
    one = deeproots.profile(nn.Conv2d(3, 4, 3), (3, 8, 8))
    assert [(r.name, r.macs, r.params) for r in one.layers] == [("(Conv2d)", 6 * 6 * 4 * 27,
                                                                 112)]


def test_a_convs_extra_parameters_and_a_shared_conv_count_once():
    import zoo

    model = zoo.SubclassNet()
    cost = deeproots.profile(model, (3, 32, 32))
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    assert cost.other_params == 32 + 32  # the two gains, beside the paper's params
    shared = zoo.SharedConvNet()
    cost = deeproots.profile(shared, (3, 32, 32))
    assert [r.name for r in cost.layers].count("block") == 1
    assert cost.total_params == sum(p.numel() for p in shared.parameters()) == 216 + 576 + 90
    assert cost.macs == 32 * 32 * (8 * 27 + 2 * 8 * 72) + 80  # the shared conv runs twice


def test_attention_counts_the_same_on_a_cpu_and_on_meta():
    """nn.MultiheadAttention's inference fast path and SDPA's CPU kernel are counted by
    rules of their own: a real CPU tensor gives the meta device's count, and the hand count."""
    import zoo

    real = deeproots.profile(zoo.TinyAttention().eval(), (3, 16, 16))
    with torch.device("meta"):
        meta = deeproots.profile(zoo.TinyAttention().eval(), (3, 16, 16))
    L, E = 16, 16  # 4x4 patches of 16 channels
    hand = (16 * 16 * 3 * 16                  # patches: a 4x4 conv, stride 4
            + 4 * L * E * E + 2 * L * L * E   # attention: q, k, v, out projections; QK^T, AV
            + L * E * 3 * E                   # qkv linear
            + 2 * L * L * E                   # SDPA over 2 heads of 8
            + 16 * 10)
    assert real.macs == meta.macs == hand


def test_activation_bytes_by_hand():
    """Two 3x3 convs at 1x8x8: outputs of 4x8x8 = 256 and 2x8x8 = 128 values. Training
    keeps every output four times over in float32: 16 x 384 = 6144 bytes; inference holds
    the image (64 values) and three copies of the largest output: 4 x (64 + 768) = 3328."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1))
    cost = profile(model, (1, 8, 8))
    assert cost.activation_bytes(training=True) == 6144
    assert cost.activation_bytes() == 3328
