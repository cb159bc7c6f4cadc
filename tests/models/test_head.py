"""timm's classifier API on every family: forward_features / forward_head, num_features,
get_classifier, reset_classifier, and num_classes=0 (a network without its classifier)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deeproots import create_model, profile
from deeproots.models import GoogLeNetOutputs
from deeproots.errors import DeeprootsError

# (name, build arguments, input, the last map's shape and the pooled features, by hand:
# nin 32 -> 16 -> 8 at conv3b's 192 channels; resnet50 64 -> 2 after five halvings at 2048;
# googlenet's paper layout leaves 8x8x1024 and a 7x7/1 pool of it 2x2x1024 for its FC, the
# standard one 7x7 and a global pool)
CASES = [
    ("nin", {}, (3, 32, 32), (192, 8, 8), 192),
    ("resnet50", {}, (3, 64, 64), (2048, 2, 2), 2048),
    ("googlenet", {}, (3, 224, 224), (1024, 8, 8), 4096),
    ("googlenet", {"layout": "standard"}, (3, 64, 64), (1024, 2, 2), 1024),
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
    size = (3, 224, 224) if name == "googlenet" else (3, 32, 32)  # (the paper layout's)
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
    model = create_model("googlenet", num_classes=10, layout="standard").train()
    model.reset_classifier(4)
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, GoogLeNetOutputs)
    assert [o.shape for o in out] == [(2, 4)] * 3
    model.reset_classifier(0)  # no classes: the auxiliary classifiers go with the classifier
    assert model.aux1 is None and model.aux2 is None and not model.aux_logits
    assert model.deeproots_cfg["kwargs"] == {"layout": "standard", "num_classes": 0,
                                             "aux_logits": False}
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1024)
    paper = create_model("googlenet", num_classes=10)
    paper.reset_classifier(0)
    assert paper.min_input_size == 207  # the paper layout's final pool alone now limits it


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


# Each stage's map, by hand: channels from the architectures (NiN's conv1c, conv2c, conv3b;
# ResNet-50's stem and four stages; GoogLeNet's conv1, conv3, inception 3b, 4e and 5b from
# Szegedy et al.'s Table 1) and sizes from the strides (NiN 32 -> 16 -> 8 at 32 px, ceil-mode
# pools; ResNet 64 px halved five times; GoogLeNet's standard layout 64 -> 32 ... 2).
STAGES = [
    ("nin", {}, (3, 32, 32), [(96, 32), (192, 16), (192, 8)]),
    ("resnet50", {}, (3, 64, 64), [(64, 32), (256, 16), (512, 8), (1024, 4), (2048, 2)]),
    ("googlenet", {"layout": "standard"}, (3, 64, 64),
     [(64, 32), (192, 16), (480, 8), (832, 4), (1024, 2)]),
]


@pytest.mark.parametrize("name, kwargs, size, maps", STAGES)
def test_a_backbone_returns_each_stages_map(name, kwargs, size, maps):
    torch.manual_seed(0)
    full = create_model(name, num_classes=6, **kwargs).eval()
    backbone = create_model(name, features_only=True, **kwargs).eval()
    kept = {k: v for k, v in full.state_dict().items()
            if not k.startswith(("aux1.", "aux2.", full.classifier_name + "."))}
    backbone.load_state_dict(kept)  # strict: the network less its classifier
    x = torch.randn(2, *size)
    with torch.no_grad():
        got = backbone(x)
        last = full.forward_features(x)
    assert [(m.shape[1], m.shape[2], m.shape[3]) for m in got] == [(c, s, s) for c, s in maps]
    assert backbone.feature_info.channels() == [c for c, _ in maps]
    torch.testing.assert_close(got[-1], last)
    # each map is the output of the module feature_info names, seen by a forward hook
    from deeproots.capture import capture

    named = dict(full.named_modules())
    modules = {m: named[m] for m in backbone.feature_info.module_name()}
    with torch.no_grad(), capture(modules) as seen:
        full(x)
    for info, got_map in zip(backbone.feature_info, got):  # (resnet's relu: its first call)
        torch.testing.assert_close(got_map, seen[info["module"]])


def test_out_indices_and_intermediates():
    model = create_model("resnet50", features_only=True, out_indices=(1, -1)).eval()
    assert model.feature_info.reduction() == [4, 32]
    assert model.deeproots_cfg["kwargs"] == {"num_classes": 0, "features_only": True,
                                             "out_indices": [1, 4]}
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [256, 2048]
    # rebuilt from its recorded arguments, it takes its own weights
    again = create_model("resnet50", **model.deeproots_cfg["kwargs"])
    again.load_state_dict(model.state_dict())
    full = create_model("nin").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        last, maps = full.forward_intermediates(x, indices=2)  # the last two
        early, first = full.forward_intermediates(x, indices=[0], stop_early=True)
    assert [m.shape[1:] for m in maps] == [(192, 16, 16), (192, 8, 8)]
    torch.testing.assert_close(last, maps[-1])
    assert early is first[0] and first[0].shape[1:] == (96, 32, 32)


def test_a_backbone_takes_a_whole_models_weights_and_exports():
    import tempfile

    source = create_model("nin", num_classes=10).eval()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(source.state_dict(), f"{folder}/w.pth")
        backbone = create_model("nin", features_only=True, out_indices=[2],
                                checkpoint_path=f"{folder}/w.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[0], source.forward_features(x))
    program = torch.export.export(backbone, (x,))
    torch.testing.assert_close(program.module()(x)[0], backbone(x)[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"out_indices": (1,)}, "out_indices=\\(1,\\) picks the maps of a backbone; add "
                            "features_only=True"),
    ({"features_only": True, "out_indices": (3,)}, "feature map indices must be stage "
                                                   "numbers 0 to 2 \\(or -3 to -1\\); got \\(3,\\)"),
    ({"features_only": True, "out_indices": 4}, "indices=4 asks for the last 4 of 3 feature "
                                               "maps; accepted: 1 to 3"),
    ({"features_only": 1}, "features_only must be True or False; got 1"),
])
def test_bad_backbone_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("nin", **kwargs)


def test_a_backbone_drops_the_stages_after_its_last_map():
    """out_indices (1, 2) of resnet50 keep the stem, layer1 and layer2 alone: their
    parameters, summed from the whole network's by module name; googlenet's stage 0 is conv1
    alone, 7x7x3x64 weights and 64 biases by hand. Later maps cannot be asked for."""
    full = create_model("resnet50-root-8")
    kept = sum(p.numel() for name, p in full.named_parameters()
               if name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2"))
    backbone = create_model("resnet50-root-8", features_only=True, out_indices=(1, 2)).eval()
    assert sum(p.numel() for p in backbone.parameters()) == kept
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x)
        torch.testing.assert_close(backbone.forward_features(x), maps[-1])
    assert [m.shape[1] for m in maps] == [256, 512]
    again = create_model("resnet50-root-8", **backbone.deeproots_cfg["kwargs"])
    again.load_state_dict(backbone.state_dict())  # strict: rebuilt as it was
    with pytest.raises(ValueError, match=r"stage numbers 0 to 2 \(or -3 to -1\); got \[4\]"):
        backbone.forward_intermediates(x, indices=[4])
    stem = create_model("googlenet", features_only=True, out_indices=(0,))
    assert sum(p.numel() for p in stem.parameters()) == 7 * 7 * 3 * 64 + 64
    with pytest.raises(ValueError, match="a backbone \\(features_only\\) returns feature maps "
                                         "and has no classifier to reset to 5 classes"):
        backbone.reset_classifier(5)


def test_pretrained_cfg_says_what_timm_prepares_images_by(tmp_path):
    """A model built here: its size, classes, first conv and classifier, as module paths of
    its state_dict. Loaded from a checkpoint of a Fashion-MNIST run: also the mean and std
    its images were normalised with, 72.94 and 90.02 on 0..255 (the dataset's), on timm's
    0..1 scale, at 1x28x28, uncropped."""
    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint, save_model

    model = create_model("nin-root-8", num_classes=10)
    cfg = model.pretrained_cfg
    assert cfg == {"architecture": "nin-root-8", "num_classes": 10, "input_size": (3, 32, 32),
                   "first_conv": "conv1a.conv", "classifier": "conv3c"}
    assert f"{cfg['first_conv']}.weight" in model.state_dict() and model.default_cfg == cfg
    gray = create_model("nin-root-8", num_classes=10, in_channels=1)
    save_model(tmp_path / "c.pt", gray, {"model_cfg": gray.deeproots_cfg, "config": {},
                                         "data": {"name": "fashion-mnist", "in_channels": 1,
                                                  "image_size": 28, "mean": (72.94,),
                                                  "std": (90.02,)}})
    trained = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    loaded = trained.pretrained_cfg
    assert loaded["input_size"] == (1, 28, 28) and loaded["crop_pct"] == 1.0
    # an RGB batch to it: its data named, not "Build it with in_channels=3" (it is trained)
    with pytest.raises(DeeprootsError, match=r"^nin-root-8 was trained on 1-channel images "
                                             r"\(fashion-mnist\); got 3 channels"):
        trained(torch.zeros(1, 3, 28, 28))
    with pytest.raises(DeeprootsError, match="Build it with in_channels=3"):
        gray(torch.zeros(1, 3, 28, 28))  # built here: it can be built again
    assert loaded["mean"] == pytest.approx((72.94 / 255,))
    assert loaded["std"] == pytest.approx((90.02 / 255,))
    assert create_model("resnet50").pretrained_cfg["first_conv"] == "conv1"
