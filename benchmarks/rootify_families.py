"""What the paper's rule (rootify root-N) does to the CNN families people use: for each model,
its multiply-adds, the share of them in 1x1 convs (which a root module keeps dense), and after
root-N the fraction of multiply-adds left, how many spatial convs took groups, and why the
others were left (depthwise or already grouped, a conv subclass whose regrouping would change
what it computes, the stem); with the deep-stem option (stem='resolution') beside it.

    python benchmarks/rootify_families.py                 # hand-written stand-ins (tests/zoo.py)
    python benchmarks/rootify_families.py --torchvision --timm --schedule root-8

torchvision and timm are not dependencies of deeproots (torchvision cannot be installed beside
the CPU build of torch the project pins): run the real models in an environment that has them,
e.g. a venv with `pip install torch==2.14.1 torchvision==0.29.1 timm` and deeproots installed
with `pip install --no-deps -e .`. Every model is built on the meta device: nothing computes.

    python benchmarks/rootify_families.py --torchvision --timm --calibrated
    python benchmarks/rootify_families.py --torchvision --calibrated --models "tv/resnet50*"

converts each model instead as a trained one is converted (``deeproots.convert_model``: the
channels assigned to groups, the permutations folded into the neighbouring layers, the convs
refit on calibration images), on its own random weights (no pretrained weights are fetched)
and random images: whether each step of the calibrated conversion runs on the architecture.
A check of structure, not of accuracy: a random network has none of the correlations between
channels that let a refit take over what the cut dropped.
"""
import argparse
import fnmatch
import os
import sys
import time

import torch

from deeproots import convert_model, profile, rootify
from deeproots.conversion import trace_convs
from deeproots.errors import DeeprootsError
from deeproots.models.layers import conv_layers
from deeproots.text import format_table

TORCHVISION = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16", "densenet121",
               "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
               "convnext_tiny", "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet",
               "inception_v3", "mnasnet1_0"]
TIMM = ["resnet50d", "cspdarknet53", "dla34", "dpn68", "ghostnet_100", "hrnet_w18_small",
        "rexnet_100", "repvgg_a0", "resnest14d", "skresnet18", "res2net50_26w_4s",
        "nf_resnet50", "resnetv2_50x1_bit", "tf_efficientnetv2_b0", "efficientnetv2_rw_t"]


def _zoo():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import zoo  # the stand-ins the tests use

    return {"vgg-ish": (zoo.vgg, 32), "resnet18-ish": (zoo.ResNet18ish, 32),
            "resnext-ish": (zoo.ResNeXtish, 32), "mobilenet-ish": (zoo.mobilenet, 32),
            "densenet-ish": (zoo.DenseBlockNet, 32), "unet-ish": (zoo.UNetish, 32),
            "deep-stem (resnet-d-ish)": (zoo.DeepStemNet, 32),
            "subclasses (timm-ish)": (zoo.SubclassNet, 32),
            "norm-act (timm-ish)": (zoo.NormActNet, 32),
            "frozen-norm (detection-ish)": (
                lambda: zoo.NormActNet(norm=zoo.FrozenBatchNorm2d), 32),
            "shared conv": (zoo.SharedConvNet, 32)}


def _torchvision():
    import torchvision

    sizes = {"inception_v3": 299}
    models = {f"tv/{n}": (lambda n=n: torchvision.models.get_model(n, weights=None),
                          sizes.get(n, 224)) for n in TORCHVISION}
    # as torchvision's detection models build their backbone: batch norms frozen, in a
    # class of their own (FrozenBatchNorm2d: four buffers, no batch norm subclass)
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    models["tv/resnet50 (frozen BN)"] = (
        lambda: torchvision.models.resnet50(weights=None, norm_layer=frozen), 224)
    # and a detection model's whole backbone: that ResNet-50 and its feature pyramid, which
    # returns a dict of feature maps, not class scores
    models["tv/fasterrcnn_resnet50_fpn.backbone"] = (
        lambda: torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None).backbone, 224)
    return models


def _timm():
    import timm

    return {f"timm/{n}": (lambda n=n: timm.create_model(n, pretrained=False), 224)
            for n in TIMM}


def _changed(model, new, report):
    """The spatial convs the report counts, those it grouped, and whether every conv of
    ``new`` kept the class it had in ``model``."""
    spatial = [c for c in report.layers if c.kernel != "1x1" and c.macs_before]
    grouped = [c for c in spatial if c.groups_after != c.groups_before]
    kept = all(type(a) is type(b) for a, b in zip(conv_layers(model).values(),
                                                   conv_layers(new).values()))
    return spatial, grouped, kept


def _row(name, build, size, schedule):
    try:
        with torch.device("meta"):
            model = build().eval()
    except NotImplementedError:  # a builder that computes with tensors (RegNet's widths)
        model = build().eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, size, size, device=device)
    cost = profile(model, (3, size, size))
    pointwise = sum(c.macs for c in cost.layers if c.kernel == "1x1")
    started = time.perf_counter()
    new, report = rootify(model, schedule, example_input=x)
    seconds = time.perf_counter() - started
    _, deep = rootify(model, schedule, example_input=x, stem="resolution")
    spatial, grouped, classes_kept = _changed(model, new, report)
    left_grouped = [c for c in spatial if "depthwise" in c.note or "already in" in c.note]
    left_subclass = [c for c in spatial if "computes something else" in c.note]
    # every conv writes the resolution it wrote before (a SAME-padding conv still pads)
    resolutions = [s.resolution for s in trace_convs(model, x)] == \
        [s.resolution for s in trace_convs(new, x)]
    return (name, f"{cost.macs / 1e9:.3f}", f"{100 * pointwise / cost.macs:.0f}%",
            f"{report.macs_fraction:.3f}", f"{deep.macs_fraction:.3f}",
            f"{len(grouped)}/{len(spatial)}", str(len(left_grouped)), str(len(left_subclass)),
            "yes" if classes_kept else "NO", "yes" if resolutions else "NO", f"{seconds:.1f}")


CALIBRATION_IMAGES, SIDE = 64, 64  # random images at 64x64 px (--calibrated)
SIDES = {"tv/inception_v3": 96}  # the least it takes is 75 px


def _calibrated_row(name, build, size, schedule):
    """``name`` converted with calibration on random images: the multiply-adds left, the
    spatial convs grouped, of those how many were refit within their groups and how many
    had a side's channels permuted (folded into their neighbours), the 1x1 convs refit,
    whether torch.fx traced the model (the permutations need its graph), classes kept, the
    seconds it took."""
    torch.manual_seed(0)
    model = build().eval()
    side = SIDES.get(name, min(size, SIDE))
    calibration = torch.randn(CALIBRATION_IMAGES, 3, side, side)
    started = time.perf_counter()
    new, report, _ = convert_model(model, schedule, calibration=calibration, stages=False,
                                   name=name)
    seconds = time.perf_counter() - started
    cal = report.calibration
    spatial, grouped, classes_kept = _changed(model, new, report)
    refit = [c for c in cal.layers if c.grouped_unexplained is not None]
    permuted = [c for c in cal.layers if c.permuted_in or c.permuted_out]
    traced = not any("torch.fx could not trace" in c.fixed for c in cal.layers)
    return (name, str(side), f"{report.macs_fraction:.3f}", f"{len(grouped)}/{len(spatial)}",
            f"{len(refit)}/{len(cal.layers)}", f"{len(permuted)}/{len(cal.layers)}",
            str(len(cal.refits)), "yes" if traced else "no",
            "yes" if classes_kept else "NO", f"{seconds:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="root-8")
    parser.add_argument("--torchvision", action="store_true")
    parser.add_argument("--timm", action="store_true")
    parser.add_argument("--calibrated", action="store_true",
                        help="convert each model with calibration (random weights and images)")
    parser.add_argument("--models", nargs="+", metavar="PATTERN",
                        help="only the models whose names match one of these (wildcards, as "
                             "timm.list_models: 'tv/resnet50*')")
    args = parser.parse_args()
    models = _zoo()
    if args.torchvision:
        models = _torchvision()
    if args.timm:
        models = {**(models if args.torchvision else {}), **_timm()}
    if args.models:
        chosen = {n: m for n, m in models.items()
                  if any(fnmatch.fnmatchcase(n, p) for p in args.models)}
        if not chosen:
            parser.error(f"--models {' '.join(args.models)} matches none of the "
                         f"{len(models)} models: {', '.join(models)}")
        models = chosen
    rows, refused = [], {}
    row, width = (_calibrated_row, 10) if args.calibrated else (_row, 11)
    for name, (build, size) in models.items():
        try:
            rows.append(row(name, build, size, args.schedule))
        except DeeprootsError as err:  # a refusal (root-N groups nothing): listed under
            refused.setdefault(str(err).split(" here: ", 1)[-1].split(";")[0].split(
                " (")[0], []).append(name)
            print(name, err, file=sys.stderr, flush=True)
            continue
        except Exception as err:  # noqa: BLE001  (one row says what failed; the rest go on)
            rows.append((name, f"failed: {type(err).__name__}: {str(err)[:80]}",
                         *[""] * (width - 2)))
        print(rows[-1], file=sys.stderr, flush=True)
    if args.calibrated:
        head = ("model", "px", f"{args.schedule} MACs", "spatial grouped", "refit in groups",
                "permuted", "1x1 refit", "fx traced", "classes kept", "convert s")
        print(f"convert_model {args.schedule} on {len(models)} models, their random weights "
              f"and {CALIBRATION_IMAGES} random images (torch {torch.__version__})")
        print(format_table(head, rows, align="lrrrrrrllr"))
    else:
        head = ("model", "GMACs", "in 1x1", f"{args.schedule} MACs", "deep stem",
                "spatial grouped", "left: grouped", "left: subclass", "classes kept",
                "resolutions kept", "rootify s")
        print(f"rootify {args.schedule} on {len(models)} models (torch {torch.__version__}); "
              f"fractions are of the model's multiply-adds")
        print(format_table(head, rows, align="lrrrrrrrlll"))
    for why, names in refused.items():
        print(f"refused, {why}: {', '.join(names)}")


if __name__ == "__main__":
    main()
