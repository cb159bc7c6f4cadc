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
    assert by_count[2].kl == pytest.approx(0.0, abs=1e-5)  # its predictions unchanged
    assert 0 < by_count[4].kl < by_count[8].kl
    assert by_count[4].unexplained > 0.01 and by_count[8].unexplained > by_count[4].unexplained
    # the costs by hand: 3x3 x 8 x 8 x 64 pixels, divided by the groups
    assert layer.macs == 9 * 8 * 8 * 64 and by_count[4].macs == 9 * 8 * 8 * 64 // 4
    assert by_count[2].params == 9 * 8 * 8 // 2
    for key, value in model.state_dict().items():  # the model is not changed
        assert torch.equal(value, before[key]), key


def test_the_model_and_every_layer_option_are_timed_in_one_session(monkeypatch):
    """The prediction subtracts layer savings from the model's time: all of them come from
    one interleaved session (a slower minute between two sessions would move the ratio).
    The timer is replaced by one that runs each workload once and gives the model 100 ms and
    the conv at g groups 8/g ms: those are the table's figures."""
    import deeproots.conversion.sensitivity as sensitivity
    from deeproots.speed.timing import Timing

    sessions = []

    def interleaved(work, images, repeats=5, **kw):
        sessions.append(sorted(work))
        for fn in work.values():  # each runs: the folded model, each conv on its input
            fn()
        return {k: Timing(k, [0.1 if k == "model" else 0.008 / int(k.split("@")[1])] * repeats,
                          images) for k in work}

    monkeypatch.setattr(sensitivity, "interleaved", interleaved)
    model = _tiny()
    x = torch.randn(96, 3, 8, 8)
    prices = layer_prices(model, x[:64], (x[64:], model(x[64:]).argmax(1)), batch_size=4,
                          repeats=1)
    assert sessions == [["2@1", "2@2", "2@4", "2@8", "model"]]
    assert prices.ms == pytest.approx(100.0)
    layer = prices.layers[0]
    assert layer.ms == pytest.approx(8.0)
    assert {o.groups: o.ms for o in layer.options} == pytest.approx({2: 4.0, 4: 2.0, 8: 1.0})
    assert predict(prices, {"2": 4})["latency_fraction"] == pytest.approx((100 - 6) / 100)


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


def _kl_prices():
    """The hand table of :func:`_prices` with each option's divergence (nats): a top-1 of
    1,000 images is noisy, the divergence is what the search sums. Layer b at 4 groups
    measured *above* its 2-group top-1 (noise); its divergence says otherwise."""
    prices = _prices()
    kls = {"a": [0.02, 0.10, 0.40], "b": [0.001, 0.03], "c": [0.20, 0.60]}
    for layer in prices.layers:
        for option, kl in zip(layer.options, kls[layer.layer]):
            option.kl = kl
    return prices


def test_the_top1_lost_per_nat_is_the_least_squares_slope_through_the_origin():
    prices = _kl_prices()
    pairs = [(0.90 - o.top1, o.kl) for layer in prices.layers for o in layer.options]
    # by hand: sum(drop * kl) / sum(kl^2)
    slope = sum(d * k for d, k in pairs) / sum(k * k for _, k in pairs)
    assert prices.top1_per_kl() == pytest.approx(slope)
    assert predict(prices, {"a": 2, "c": 4})["top1"] == pytest.approx(0.90 - slope * 0.62)
    assert _prices().top1_per_kl() is None  # no divergences: the top-1 drops, summed


@pytest.mark.parametrize("budget, fraction", [("latency", 0.8), ("latency", 0.6),
                                              ("macs", 0.6)])
def test_with_divergences_the_search_finds_the_least_summed_divergence(budget, fraction):
    prices = _kl_prices()
    key = {"latency": "latency_fraction", "macs": "macs_fraction"}[budget]
    best = None
    for picks in itertools.product(*[[None] + layer.options for layer in prices.layers]):
        groups = {layer.layer: o.groups for layer, o in zip(prices.layers, picks) if o}
        if predict(prices, groups)[key] <= fraction + 1e-12:
            kl = sum(o.kl for o in picks if o)
            if best is None or kl < best[0] - 1e-12:
                best = (kl, groups)
    plan = choose(prices, **{budget: fraction})
    assert plan.groups == best[1]


def test_a_table_read_back_from_its_json_is_the_same_table():
    prices = _kl_prices()
    again = Sensitivity.from_dict(prices.to_dict())
    assert again == prices and again.layers[0].options[1].kl == 0.10


def test_the_divergence_of_a_selection_pass_is_torchs_kl_div():
    from deeproots.conversion.sensitivity import _scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    x = torch.randn(20, 3, 2, 2)
    labels = torch.randint(0, 5, (20,))
    reference = torch.log_softmax(torch.randn(20, 5), 1)
    top1, kl, logp = _scores(model, [x[:8], x[8:]], labels, reference)
    with torch.no_grad():
        logits = model(x)
    assert top1 == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert kl == pytest.approx(float(torch.nn.functional.kl_div(
        torch.log_softmax(logits, 1), reference, log_target=True, reduction="batchmean")),
        rel=1e-5)
    assert torch.allclose(logp, torch.log_softmax(logits, 1), atol=1e-6)


def test_a_checked_layer_scales_its_priced_divergences_by_what_it_measured():
    prices = _kl_prices()
    a, c = prices.layers[0], prices.layers[2]
    assert prices.kl_of(a, a.options[1]) == 0.10  # not checked: as priced
    prices.verified["a@2"] = 0.06  # measured 3x its price (0.02)
    assert prices.kl_of(a, a.options[0]) == pytest.approx(0.06)
    assert prices.kl_of(a, a.options[2]) == pytest.approx(0.40 * 3)
    prices.verified["a@4"] = 0.10  # 1x: the layer's factor is the mean, 2
    assert prices.kl_of(a, a.options[1]) == pytest.approx(0.20)
    prices.verified["c@2"] = 1e6  # kept within the bounds
    assert prices.kl_of(c, c.options[0]) == pytest.approx(0.20 * 50)
    assert prices.kl_of(c, Option(8, 1, 1, 1.0, 0.0, 0.5)) is None  # no divergence priced


def test_the_search_runs_again_when_a_proposed_layer_measures_costlier_than_priced(
        monkeypatch):
    """By hand, macs 0.6 (400 of 1000 to save): the least summed divergence is a at 2 and
    b at 4 (200 + 225 saved, 0.02 + 0.03). Converted alone, b at 4 measures 40 times its
    price, so each of b's divergences counts 40 times: the search, run again, takes a at 4
    and b at 2 (300 + 150, 0.10 + 0.04), whose layers are checked in turn; each (layer,
    count) converted once."""
    from types import SimpleNamespace

    import deeproots.conversion.checkpoint as checkpoint

    prices = _kl_prices()
    converted = []
    measured = {"a": 1.0, "b": 40.0, "c": 1.0}

    passes = SimpleNamespace(batches=lambda: [])

    def calibrate(model, changes, batches, refit, batchnorm):
        assert refit == "root" and batchnorm == "keep" and len(changes) == 1
        assert batches is passes  # every check shares the dense model's passes
        converted.append(dict(changes))
        return dict(changes), None

    def selection_scores(model, select, reference=None):
        if reference is None:
            return 0.9, 0.0, "dense"
        (layer, g), = model.items()
        option = next(o for p in prices.layers if p.layer == layer
                      for o in p.options if o.groups == g)
        return 0.5, option.kl * measured[layer], None

    monkeypatch.setattr(checkpoint, "calibrate", calibrate)
    monkeypatch.setattr(checkpoint, "selection_scores", selection_scores)
    source = SimpleNamespace(trained=None, cal=SimpleNamespace(
        select=(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)),
        fit=torch.zeros(2, 3, 4, 4)), dense_passes=lambda: passes)
    assert choose(prices, macs=0.6).groups == {"a": 2, "b": 4}
    plan = checkpoint._checked(source, prices, lambda text: None,
                               lambda: choose(prices, macs=0.6))
    assert plan.groups == {"a": 4, "b": 2}
    assert prices.verified == pytest.approx({"a@2": 0.02, "b@4": 1.2, "a@4": 0.10,
                                             "b@2": 0.04})
    assert plan.predicted["top1"] == pytest.approx(
        0.90 - prices.top1_per_kl() * (0.10 + 0.04))
    keys = [next(iter(c.items())) for c in converted]
    assert len(keys) == len(set(keys)) == 4
