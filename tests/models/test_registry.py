"""Names, look-up and the errors a user sees."""
import pytest
import torch

import deeproots
import deeproots.models.registry
from deeproots import create_model, list_models
from deeproots.models.layers import GroupsError


def test_list_models_takes_timms_arguments():
    # nin's 13 names and resnet50's 7, less the 16-group ones (nin-root-16, nin-tree-16,
    # nin-col-16, resnet50-root-16)
    names = list_models(["nin*", "resnet50*"], exclude_filters=["*-16"])
    assert len(names) == 13 + 7 - 4 and not any(n.endswith("-16") for n in names)
    assert list_models("nin-root*", exclude_filters="*-2") == ["nin-root-4", "nin-root-8",
                                                               "nin-root-16"]
    assert list_models(pretrained=True) == []  # deeproots ships no weights
    with pytest.raises(ValueError, match="exclude_filters must be a string such as 'nin\\*' "
                                         "or a list of them; got 3"):
        list_models(exclude_filters=3)


def test_list_models_in_natural_order():
    assert list_models("resnet50*") == ["resnet50"] + [
        f"resnet50-root-{n}" for n in (2, 4, 8, 16, 32, 64)]
    assert len(list_models("nin*")) == 13
    assert list_models("googlenet*")[-1] == "googlenet-root-16"
    for depth in (101, 152, 200):
        assert f"resnet{depth}-root-8" in list_models() and f"resnet{depth}-root-32" in list_models()


def test_underscore_names_work():
    model = create_model("nin_root_8")
    assert model.name == "nin-root-8" and model.conv2a.conv.groups == 8
    assert model.deeproots_cfg == {"name": "nin-root-8", "kwargs": {}}


def test_unknown_name_lists_closest():
    with pytest.raises(ValueError, match="unknown model 'nin-rot-8'.*nin-root-8"):
        create_model("nin-rot-8")


def test_groups_that_do_not_divide_name_the_layer():
    with pytest.raises(GroupsError, match=r"'conv2a' has 96 input and 192 output.*5 groups.*1, 2, 3"):
        create_model("nin", groups={"conv2a": 5})


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"conv9z": 2}, "matches no conv layer"),
        ({"conv2a": 0}, "whole number >= 1; got 0"),
        ({"conv2a": 2.0}, "whole number >= 1; got 2.0"),
        ({"conv2a": True}, "whole number"),
        ([("conv2a", 2)], "must be a mapping"),
        ({3: 2}, "keys must be layer names"),
    ],
)
def test_malformed_groups_mapping(groups, message):
    with pytest.raises(ValueError, match=message):
        create_model("nin", groups=groups)


def test_bad_keyword_names_what_is_accepted():
    with pytest.raises(ValueError, match="bad arguments for nin.*num_classes"):
        create_model("nin", num_clases=10)


def test_timms_habits_are_understood():
    """timm's in_chans builds the model in_channels does (and records it so); its default
    pretrained=False is taken; pretrained=True, which deeproots has no weights for, is one
    line saying how to get them."""
    model = create_model("nin-root-8", pretrained=False, in_chans=1)
    assert model.conv1a.conv.in_channels == 1
    assert model.deeproots_cfg == {"name": "nin-root-8", "kwargs": {"in_channels": 1}}
    with pytest.raises(ValueError, match=r"deeproots ships no pretrained weights \(nin-root-8: "
                                         r"pretrained=True\); train them \(deeproots train "
                                         r"nin-root-8\)"):
        create_model("nin-root-8", pretrained=True)
    with pytest.raises(ValueError, match="give in_channels or timm's in_chans, not both"):
        create_model("nin", in_chans=1, in_channels=1)
    assert create_model("googlenet", drop_rate=0.2).dropout.p == 0.2
    with pytest.raises(ValueError, match="resnet50 has no dropout for timm's drop_rate \\(got "
                                         "drop_rate=0.2\\); accepted keyword arguments: "
                                         "groups, preact"):
        create_model("resnet50", drop_rate=0.2)


@pytest.mark.parametrize("kwargs, least", [({"num_classes": -1}, 0), ({"in_channels": 0}, 1)])
def test_bad_sizes(kwargs, least):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a whole number >= "
                                         f"{least}; got {next(iter(kwargs.values()))}"):
        create_model("resnet50", **kwargs)


def test_wrong_input_shape_and_channels():
    model = create_model("nin")
    with pytest.raises(ValueError, match=r"shaped \(N, 3, H, W\); got \(3, 32, 32\)"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="built for 3-channel input; got 1"):
        model(torch.zeros(1, 1, 32, 32))


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of paper, standard; got 'v3'"):
        create_model("googlenet", layout="v3")


def test_schedule_rows_follow_the_stated_rules():
    from deeproots.models.schedules import NIN, resolve

    for n in (2, 4, 8, 16):
        assert NIN[f"root-{n}"] == (n, max(n // 2, 1))
        assert NIN[f"tree-{n}"] == (n, 2 * n)
        assert NIN[f"col-{n}"] == (n, n)
    assert resolve("nin", "orig") == {}
    with pytest.raises(ValueError, match="unknown nin variant 'root-3'"):
        resolve("nin", "root-3")
    assert deeproots.models.registry.model_entry("googlenet-root-4").variant == "root-4"


def test_keyword_arguments_of_the_wrong_type_are_refused():
    with pytest.raises(ValueError, match=r"googlenet: aux_logits must be True or False or None; got "
                                         r"'no'"):
        deeproots.create_model("googlenet", aux_logits="no")
    with pytest.raises(ValueError, match=r"nin: num_classes must be a whole number; got 10.5"):
        deeproots.create_model("nin", num_classes=10.5)
    # a keyword of the right type takes effect: no auxiliary classifiers, one output in training
    plain = deeproots.create_model("googlenet", aux_logits=False, layout="standard").train()
    assert not any("aux" in name for name, _ in plain.named_modules())
    out = plain(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)
