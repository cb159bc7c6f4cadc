"""The timing helper: order of calls and the statistics it reports (no timed assertions)."""
import pytest
import torch

import deeproots
from deeproots.bench import Timing, interleaved, train_step_fn


def test_models_take_turns_after_warmup():
    calls = []
    result = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         images=4, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert len(result["a"].seconds) == 3 and result["b"].images == 4


def test_timing_statistics_by_hand():
    t = Timing("x", [0.2, 0.4, 0.3], images=10)
    assert t.median_s == 0.3
    assert t.images_per_s == pytest.approx(10 / 0.3)
    assert t.ms_per_image == pytest.approx(30.0)
    assert t.spread == pytest.approx((0.4 - 0.2) / 0.3)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved({}, images=1, repeats=0)


def test_train_step_updates_weights():
    model = deeproots.create_model("nin-root-8", in_channels=1)
    before = model.conv2a.conv.weight.clone()
    train_step_fn(model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))()
    assert not torch.equal(before, model.conv2a.conv.weight)
