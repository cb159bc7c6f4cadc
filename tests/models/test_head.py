"""timm's classifier API on every family: forward_features / forward_head, num_features,
get_classifier, reset_classifier, and num_classes=0 (a network without its classifier)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deeproots import create_model, profile
from deeproots.models import GoogLeNetOutputs

# (name, build arguments, input, the last map's shape and the pooled features, by hand:
# nin 32 -> 16 -> 8 at conv3b's 192 channels; resnet50 64 -> 2 after five halvings at 2048;
# googlenet's paper layout leaves 8x8x1024 and a 7x7/1 pool of it 2x2x1024 for its FC, the
# standard one 7x7 and a global pool)
CASES = [
    ("nin", {}, (3, 32, 32), (192, 8, 8), 192),
    ("resnet50", {}, (3, 64, 64), (2048, 2, 2), 2048),
    ("googlenet", {}, (3, 224, 224), (1024, 8, 8), 4096),
    ("googlenet", {"layout": "standard"}, (3, 224, 224), (1024, 7, 7), 1024),
]


def _classifier_by_hand(model, pooled):
    """The logits a linear classifier computes from pooled features (nin's is a 1x1 conv)."""
    head = model.get_classifier()
    conv = getattr(head, "conv", None)
    weight, bias = (conv.weight.flatten(1), conv.bias) if conv is not None else (
        head.weight, head.bias)
    return pooled @ weight.T + bias


@pytest.mark.parametrize("name, kwargs, size, feature_map, features", CASES)
def test_features_then_head_is_the_forward_pass(name, kwargs, size, feature_map, features):
    torch.manual_seed(0)
    model = create_model(name, num_classes=6, **kwargs).eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        logits = model(x)
    assert fmap.shape == (2, *feature_map)
    assert model.num_features == features and pooled.shape == (2, features)
    # pre_logits is what the classifier takes: pooled by hand, then the classifier by hand
    by_hand = F.adaptive_avg_pool2d(fmap, 1).flatten(1) if features == feature_map[0] else \
        F.avg_pool2d(fmap, 7, 1).flatten(1)
    torch.testing.assert_close(pooled, by_hand)
    torch.testing.assert_close(logits, _classifier_by_hand(model, pooled), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kwargs, size, feature_map, features", CASES)
def test_num_classes_0_is_the_network_without_its_classifier(name, kwargs, size, feature_map,
                                                             features):
    torch.manual_seed(0)
    full = create_model(name, num_classes=6, **kwargs).eval()
    bare = create_model(name, num_classes=0, **kwargs).eval()
    assert isinstance(bare.get_classifier(), nn.Identity) and bare.num_classes == 0
    kept = {k: v for k, v in full.state_dict().items()
            if not k.startswith(("aux1.", "aux2.", full.classifier_name + "."))}
    bare.load_state_dict(kept)  # strict: the same network, less the classifier (and aux heads)
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(bare(x), full.forward_head(full.forward_features(x),
                                                              pre_logits=True))
    assert bare(x).shape == (2, features)


def test_nin_without_classifier_costs_conv3c_less():
    # conv3c: a 1x1 conv from 192 to 10 channels at 8x8, with a bias
    full, bare = profile(create_model("nin")), profile(create_model("nin", num_classes=0))
    assert full.macs - bare.macs == 192 * 10 * 8 * 8
    assert full.params - bare.params == 192 * 10 + 10


@pytest.mark.parametrize("name", ["nin", "resnet50", "googlenet"])
def test_reset_classifier_fits_new_classes_and_rebuilds(name):
    model = create_model(name, num_classes=10).double()
    model.reset_classifier(3)
    head = model.get_classifier()
    assert all(p.dtype == torch.float64 for p in head.parameters())
    assert model.num_classes == 3 and model.deeproots_cfg["kwargs"]["num_classes"] == 3
    size = (3, 224, 224) if name == "googlenet" else (3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, *size, dtype=torch.float64)).shape == (1, 3)
    # what a checkpoint rebuilds from the recorded arguments takes the weights as they are
    rebuilt = create_model(model.deeproots_cfg["name"], **model.deeproots_cfg["kwargs"])
    rebuilt.load_state_dict(model.state_dict())


def test_reset_to_0_then_back():
    model = create_model("resnet50", num_classes=10)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model.deeproots_cfg["kwargs"] == {"num_classes": 0}
    model.reset_classifier(4)
    assert model.get_classifier().weight.shape == (4, 2048)


def test_googlenet_auxiliary_classifiers_follow_the_classes():
    model = create_model("googlenet", num_classes=10).train()
    model.reset_classifier(4)
    out = model(torch.randn(2, 3, 224, 224))
    assert isinstance(out, GoogLeNetOutputs)
    assert [o.shape for o in out] == [(2, 4)] * 3
    model.reset_classifier(0)  # no classes: the auxiliary classifiers go with the classifier
    assert model.aux1 is None and model.aux2 is None and not model.aux_logits
    assert model.deeproots_cfg["kwargs"] == {"num_classes": 0, "aux_logits": False}
    assert model.min_input_size == 207  # the paper layout's final pool alone now limits it
    assert model(torch.randn(2, 3, 210, 210)).shape == (2, 4096)


def test_googlenet_without_classes_builds_no_auxiliary_ones():
    assert not create_model("googlenet", num_classes=0).aux_logits
    assert create_model("googlenet", num_classes=5).aux_logits
    with pytest.raises(ValueError, match="aux_logits=True needs classes to predict, and "
                                         "num_classes=0 builds no classifier"):
        create_model("googlenet", num_classes=0, aux_logits=True)


def test_bad_reset_arguments():
    model = create_model("nin")
    with pytest.raises(ValueError, match="num_classes must be a whole number >= 0; got -2"):
        model.reset_classifier(-2)
    with pytest.raises(ValueError, match="global_pool must be None or 'avg'.*got 'max'"):
        model.reset_classifier(3, global_pool="max")
    assert model.num_classes == 10  # refused before anything changed
