"""Weights from a file into a model: the forms people save them in, read safely, loaded all or
nothing (deeproots.weights, and create_model's checkpoint_path= as timm has it)."""
import os

import pytest
import torch

import deeproots
from deeproots import create_model
from deeproots.errors import CheckpointError


def _source():
    torch.manual_seed(3)
    return create_model("nin-root-4", num_classes=5, in_chans=1).eval()


def _wrapped(state, form):
    if form == "plain":
        return state
    if form == "ddp":  # torch.save(ddp_model.state_dict()): every key under module.
        return {f"module.{k}": v for k, v in state.items()}
    if form == "compiled":  # torch.compile(model).state_dict()
        return {f"_orig_mod.{k}": v for k, v in state.items()}
    return {form: state, "epoch": 3}  # {"state_dict": ...} (Lightning), {"model": ...} (timm)


@pytest.mark.parametrize("form", ["plain", "ddp", "compiled", "state_dict", "model"])
def test_create_model_loads_the_weights_a_file_holds(tmp_path, form):
    source = _source()
    path = tmp_path / "w.pth"
    torch.save(_wrapped(source.state_dict(), form), path)
    model = create_model("nin-root-4", num_classes=5, in_chans=1, checkpoint_path=path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_load_weights_into_a_model_of_your_own(tmp_path):
    source = _source()
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    target = create_model("nin-root-4", num_classes=5, in_chans=1)
    assert deeproots.load_weights(target, tmp_path / "w.pth") is target
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(),
                                                 source.state_dict().values()))


def test_weights_that_do_not_fit_are_named_and_nothing_is_loaded(tmp_path):
    state = _source().state_dict()
    torch.save(state, tmp_path / "w.pth")
    target = create_model("nin-root-4", num_classes=5)  # 3 input channels, not 1
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"w.pth: its weights do not fit nin-root-4: "
                                              r"conv1a.conv.weight is \(192, 1, 5, 5\) there, "
                                              r"\(192, 3, 5, 5\) here$"):
        deeproots.load_weights(target, tmp_path / "w.pth")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    del state["conv1a.conv.bias"]
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="missing conv1a.conv.bias; unexpected extra"):
        create_model("nin-root-4", num_classes=5, in_chans=1, checkpoint_path=tmp_path / "w.pth")


def test_a_deeproots_checkpoint_says_what_it_was_trained_as(tmp_path):
    torch.save({"model": _source().state_dict(), "model_cfg": {
        "name": "nin-root-4", "kwargs": {"num_classes": 5, "in_channels": 1}}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"\(the checkpoint was trained as nin-root-4\("
                                              r"num_classes=5, in_channels=1\)\)"):
        create_model("nin-root-4", checkpoint_path=tmp_path / "c.pt")


def test_files_without_weights_and_unsafe_files_are_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="checkpoint_path .*none.pth holds no state_dict"):
        create_model("nin", checkpoint_path=tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="checkpoint .*nope.pth does not exist"):
        create_model("nin", checkpoint_path=tmp_path / "nope.pth")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="arbitrary code execution"):
        create_model("nin", checkpoint_path=tmp_path / "evil.pth")
    assert not marker.exists()
