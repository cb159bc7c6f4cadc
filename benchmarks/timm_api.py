"""deeproots' models beside timm's, through timm's own API: the feature maps of a backbone
(channels and strides, ``features_only``), the intermediates, the pooled features of a
network without its classifier (``num_classes=0``, ``reset_classifier(0)``), and what timm's
``resolve_data_config`` and ``create_transform`` make of a deeproots model (with a
checkpoint: the normalisation it was trained with).

    python benchmarks/timm_api.py [--checkpoint RUN/best.pt]

timm is not a dependency of deeproots: run it where timm is installed, e.g. a venv with
``pip install torch==2.14.1 torchvision==0.29.1 timm`` and deeproots installed with
``pip install --no-deps -e .``. Prints a table; nothing is written.
"""
import argparse

import torch

import deeproots
from deeproots.text import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a deeproots checkpoint: its data config")
    args = parser.parse_args()
    import timm
    from timm.data import create_transform, resolve_data_config

    x = torch.randn(2, 3, 64, 64)
    ours = deeproots.create_model("resnet50", features_only=True).eval()
    theirs = timm.create_model("resnet50", features_only=True, pretrained=False).eval()
    rows = [("feature channels", theirs.feature_info.channels(), ours.feature_info.channels()),
            ("feature reductions", theirs.feature_info.reduction(),
             ours.feature_info.reduction())]
    with torch.no_grad():
        rows.append(("map shapes at 64 px", [tuple(m.shape[1:]) for m in theirs(x)],
                     [tuple(m.shape[1:]) for m in ours(x)]))
        full_t = timm.create_model("resnet50", pretrained=False).eval()
        full_o = deeproots.create_model("resnet50").eval()
        rows.append(("forward_intermediates(indices=2)",
                     [tuple(m.shape[1:]) for m in full_t.forward_intermediates(
                         x, indices=2, intermediates_only=True)],
                     [tuple(m.shape[1:]) for m in full_o.forward_intermediates(
                         x, indices=2, intermediates_only=True)]))
        full_t.reset_classifier(0)
        full_o.reset_classifier(0)
        rows.append(("reset_classifier(0) output", tuple(full_t(x).shape),
                     tuple(full_o(x).shape)))
    rows.append(("num_features", full_t.num_features, full_o.num_features))
    same = all(t == o for _, t, o in rows)
    print(f"resnet50, timm {timm.__version__} beside deeproots {deeproots.__version__} "
          f"(torch {torch.__version__}):")
    print(format_table(("what", "timm", "deeproots"), [(w, str(t), str(o)) for w, t, o in rows]))
    print(f"all the same: {'yes' if same else 'NO'}")
    if args.checkpoint:
        from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint

        model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)
        config = resolve_data_config({}, model=model)
        print(f"\n{args.checkpoint}: timm's resolve_data_config: {config}")
        print(create_transform(**config))


if __name__ == "__main__":
    main()
