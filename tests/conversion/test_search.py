"""The search for the best per-layer schedule under a budget, against every schedule tried
by brute force; and each layer's price, against hand-made layers whose answer is known."""
import copy
import itertools

import pytest
import torch
from torch import nn

from deeproots.conversion.search import choose, predict
from deeproots.conversion.sensitivity import LayerPrice, Option, Sensitivity, layer_prices
from deeproots.errors import DeeprootsError


def _prices():
    """Three layers priced by hand: the model takes 100 ms and 1000 MACs; each option's
    top-1 with that layer alone grouped (the dense top-1 0.90)."""
    def layer(name, macs, ms, options):
        return LayerPrice(name, "8x8", "3x3", 64, 64, macs, macs, ms,
                          [Option(g, macs // g, macs // g, t, 0.0, top1)
                           for g, t, top1 in options])

    layers = [layer("a", 400, 40.0, [(2, 25.0, 0.89), (4, 15.0, 0.85), (8, 12.0, 0.70)]),
              layer("b", 300, 30.0, [(2, 20.0, 0.899), (4, 14.0, 0.895)]),
              layer("c", 200, 20.0, [(2, 12.0, 0.80), (4, 9.0, 0.60)])]
    return Sensitivity("hand", "cpu", 8, 10, 10, 0.90, 1000, 1000, 100.0, layers)


def _brute_force(prices, budget, fraction):
    """The least predicted top-1 loss among every schedule meeting the budget."""
    best = None
    options = [[(1, None)] + [(o.groups, o) for o in layer.options] for layer in prices.layers]
    for picks in itertools.product(*options):
        groups = {layer.layer: g for layer, (g, _) in zip(prices.layers, picks) if g > 1}
        cost = predict(prices, groups)
        key = {"latency": "latency_fraction", "macs": "macs_fraction"}[budget]
        if cost[key] <= fraction + 1e-12:
            loss = sum(prices.top1 - o.top1 for _, o in picks if o is not None)
            if best is None or loss < best[0] - 1e-12:
                best = (loss, groups)
    return best


@pytest.mark.parametrize("budget, fraction", [("latency", f) for f in (0.9, 0.8, 0.7, 0.6,
                                                                       0.55)]
                         + [("macs", f) for f in (0.8, 0.6, 0.4)])
def test_the_search_finds_the_schedule_of_least_loss_that_brute_force_finds(budget,
                                                                             fraction):
    prices = _prices()
    plan = choose(prices, **{budget: fraction})
    loss, groups = _brute_force(prices, budget, fraction)
    key = {"latency": "latency_fraction", "macs": "macs_fraction"}[budget]
    assert plan.predicted[key] <= fraction + 1e-9
    assert plan.predicted["top1"] == pytest.approx(prices.top1 - loss)
    assert plan.groups == groups


def test_the_search_keeps_a_costly_layer_dense_and_groups_a_cheap_one_harder():
    """Latency 0.7 by hand: 30 ms to save. Every layer at 2 groups saves 15 + 10 + 8 = 33 ms
    for a loss of 0.01 + 0.001 + 0.10; the least loss is a at 2 and b at 4 (15 + 16 = 31 ms
    for 0.015), c, the costly one, kept dense."""
    plan = choose(_prices(), latency=0.7)
    assert plan.groups == {"a": 2, "b": 4}
    assert plan.predicted["ms"] == pytest.approx(100 - 15 - 16)
    assert plan.predicted["top1"] == pytest.approx(0.90 - 0.01 - 0.005)


def test_a_budget_no_schedule_reaches_is_one_line_naming_the_cheapest():
    # every layer at its fastest: 100 - 28 - 16 - 11 = 45 ms, 0.45 of the dense model's
    with pytest.raises(DeeprootsError, match=r"no schedule brings latency to 0.4 .*the "
                                             r"cheapest reachable is 0\.450") as err:
        choose(_prices(), latency=0.4)
    assert "\n" not in str(err.value)
    for bad in (0, 1, 1.5, float("nan")):
        with pytest.raises(DeeprootsError):
            choose(_prices(), latency=bad)


def _tiny(seed=0):
    """A stem conv, then a 3x3 conv (8 -> 8) whose weight is block-diagonal in 2 groups
    under a permutation of its input and output channels, batch norm, a 1x1, a head."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        w = model[2].weight
        mask = torch.zeros(8, 8)
        rows, cols = torch.randperm(8), torch.randperm(8)
        for k in range(2):
            mask[rows[4 * k:4 * k + 4][:, None], cols[4 * k:4 * k + 4][None, :]] = 1
        w.mul_(mask[:, :, None, None])
        model[3].running_mean.normal_(0, 0.1)
        model[3].running_var.uniform_(0.5, 2)
    return model.eval()


def test_a_layer_already_groupable_costs_nothing_at_its_own_count_and_more_above_it():
    model = _tiny()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(96, 3, 8, 8)
    labels = model(x[64:]).argmax(1)  # the dense model is right on every selection image
    prices = layer_prices(model, x[:64], (x[64:], labels), batch_size=4, repeats=1)
    assert [layer.layer for layer in prices.layers] == ["2"]  # the stem and 1x1 stay dense
    layer = prices.layers[0]
    assert prices.top1 == 1.0
    by_count = {o.groups: o for o in layer.options}
    assert sorted(by_count) == [2, 4, 8]  # the counts that divide 8
    assert by_count[2].unexplained == pytest.approx(0.0, abs=1e-6)  # found and refit exactly
    assert by_count[2].top1 == 1.0
    assert by_count[4].unexplained > 0.01 and by_count[8].unexplained > by_count[4].unexplained
    # the costs by hand: 3x3 x 8 x 8 x 64 pixels, divided by the groups
    assert layer.macs == 9 * 8 * 8 * 64 and by_count[4].macs == 9 * 8 * 8 * 64 // 4
    assert by_count[2].params == 9 * 8 * 8 // 2
    for key, value in model.state_dict().items():  # the model is not changed
        assert torch.equal(value, before[key]), key


def test_pricing_a_model_with_nothing_to_group_is_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(8, 3, 8, 8)
    with pytest.raises(DeeprootsError, match="has no conv the rule could group"):
        layer_prices(model, x, (x, torch.zeros(8, dtype=torch.long)), repeats=1)


def test_a_whole_model_measurement_rescales_the_layers_savings():
    """By hand (the model 100 ms): a at 4 groups saves 25 ms alone, b at 4 saves 16: the
    layers alone predict 0.59. Measured at 0.508, the model saved 49.2 ms, 1.2 times 41; the
    rescaled search then reaches 0.4, which the layers alone (cheapest 0.45: the 55 ms that
    a at 8, b and c at 4 save) cannot; and the factor stays within 0.5 .. 2."""
    from deeproots.conversion.search import cheapest, latency_scale

    prices = _prices()
    assert latency_scale(prices, {"a": 4, "b": 4}, 0.508) == pytest.approx(1.2)
    assert latency_scale(prices, {"a": 4, "b": 4}, 0.0) == 2.0
    assert latency_scale(prices, {"a": 4, "b": 4}, 0.95) == 0.5
    assert latency_scale(prices, {}, 0.5) == 1.0  # nothing grouped: nothing to rescale
    assert cheapest(prices) == {"a": 8, "b": 4, "c": 4}
    with pytest.raises(DeeprootsError, match="the cheapest reachable is 0.450"):
        choose(prices, latency=0.4)
    plan = choose(prices, latency=0.4, scale=1.2)
    assert plan.predicted["latency_fraction"] <= 0.4 + 1e-9
    loss, groups = min(  # brute force over the rescaled savings
        (sum(prices.top1 - o.top1 for o in picks if o is not None),
         {layer.layer: o.groups for layer, o in zip(prices.layers, picks) if o is not None})
        for picks in itertools.product(*[[None] + layer.options for layer in prices.layers])
        if 100 - 1.2 * sum(layer.ms - o.ms for layer, o in zip(prices.layers, picks)
                           if o is not None) <= 40 + 1e-9)
    assert plan.groups == groups
    assert plan.predicted["top1"] == pytest.approx(prices.top1 - loss)
