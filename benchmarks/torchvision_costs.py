"""deeproots.profile against torchvision's published costs: for every classification model
torchvision lists, the multiply-adds (``weights.meta["_ops"]``, in G, printed to 3 decimals)
and the parameter count (``num_params``), counted on the meta device and on a CPU tensor.

    python benchmarks/torchvision_costs.py          # needs torchvision (not a dependency)

torchvision cannot be installed beside the CPU build of torch the project pins: run this in
a venv with `pip install torch==2.14.1 torchvision==0.29.1` and `pip install --no-deps -e .`.
"""
import sys

import torch
import torchvision
from torchvision.models import get_model, get_model_weights, list_models

from deeproots import profile
from deeproots.text import format_table

SIZES = {"inception_v3": 299}
# GoogLeNet's published weights come without their auxiliary heads (torchvision drops them
# after loading), and its published count is without them
KWARGS = {"googlenet": {"aux_logits": False}}


def _weights(name):
    """The model's published weights whose input size the model built without weights takes
    (ViT-H/14 lists 518x518 and 224x224 weights: the 224 ones), else its first."""
    entries = list(get_model_weights(name))
    default = SIZES.get(name, 224)
    return next((w for w in entries
                 if list(getattr(w.transforms(), "crop_size", [0]))[0] == default), entries[0])


def main():
    rows, bad = [], 0
    for name in list_models(module=torchvision.models):
        weights = _weights(name)
        meta = weights.meta
        crop = getattr(weights.transforms(), "crop_size", None) or [SIZES.get(name, 224)]
        size = (crop[0], crop[-1])
        try:
            with torch.device("meta"):
                model = get_model(name, weights=None, **KWARGS.get(name, {})).eval()
        except NotImplementedError:  # a builder that computes with tensors (RegNet's widths)
            model = get_model(name, weights=None, **KWARGS.get(name, {})).eval().to("meta")
        cost = profile(model, (3, *size))
        macs_ok = round(cost.macs / 1e9, 3) == round(meta["_ops"], 3)
        params_ok = cost.total_params == meta["num_params"]
        bad += not (macs_ok and params_ok)
        rows.append((name, "x".join(map(str, size)), f"{meta['_ops']:.3f}",
                     f"{cost.macs / 1e9:.3f}", "yes" if macs_ok else "NO",
                     f"{meta['num_params']:,}", f"{cost.total_params:,}",
                     "yes" if params_ok else "NO"))
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"deeproots.profile against torchvision {torchvision.__version__}'s published costs "
          f"(meta device)")
    print(format_table(("model", "input", "GMACs published", "ours", "match",
                        "params published", "ours", "match"), rows, align="llrrlrrl"))
    print(f"{len(rows) - bad} of {len(rows)} models match both")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
