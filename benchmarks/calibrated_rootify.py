"""A trained CNN converted into a root network, against the ways to get one without it: on
real Fashion-MNIST, train the dense model (or reuse a finished run), convert it with
calibration and no gradient step (``deeproots rootify CHECKPOINT``), fine-tune it with
distillation for a tenth of the dense model's training steps (``deeproots train --init
FILE.pt --distill CHECKPOINT``), and compare with (a) its diagonal blocks alone
(``init="block-diagonal"``) fine-tuned the same way and (b) the root variant trained from
scratch for the same number of steps. Runs finished earlier in --out are reused.

    python benchmarks/calibrated_rootify.py --out runs/calibrated             # nin, root-8
    python benchmarks/calibrated_rootify.py --family resnet --out runs/calibrated-resnet
    python benchmarks/calibrated_rootify.py --batchnorm reestimate   # as before 2026-12-05
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint, save_model
from deeproots.config import BATCHNORMS, TrainConfig
from deeproots.conversion import rootify
from deeproots.conversion.checkpoint import CALIBRATION_IMAGES, convert_checkpoint
from deeproots.training.loop import train

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "zoo.py")
FAMILIES = {  # dense model, its root variant (from scratch), schedule, dense training's limit
    "nin": ("nin", "nin-root-8", None, None),
    "resnet": (f"{os.path.abspath(ZOO)}:bottleneck_resnet", None, "root-8", 200),
}


def _run(cfg: TrainConfig) -> dict:
    """A run's summary: read from a run finished earlier, resumed, or trained."""
    out = Path(cfg.out)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    cfg.resume = (out / "last.pt").exists()
    cfg.overwrite = out.exists() and not cfg.resume
    return train(cfg).to_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=FAMILIES, default="nin")
    p.add_argument("--out", default="runs/calibrated")
    p.add_argument("--schedule", default="root-8")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    p.add_argument("--batchnorm", choices=BATCHNORMS, default="keep",
                   help="the conversion's batch norms: kept, or re-estimated (the default "
                        "before 2026-12-05, with a '+ batch norm' stage)")
    args = p.parse_args()
    dense_name, root_name, _, limit = FAMILIES[args.family]
    out = Path(args.out)
    base = dict(data="fashion-mnist", device="cpu", progress=False, epochs=1)
    started = time.perf_counter()
    dense = _run(TrainConfig(model=dense_name, out=str(out / "dense"),
                             limit_train_batches=limit, **base))
    ckpt = out / "dense" / "best.pt"
    steps = dense["epochs"] * (limit or -(-60000 // 128))
    short = max(1, steps // 10)
    converted = out / "converted.pt"
    _, report, summary = convert_checkpoint(
        ckpt, args.schedule, out=converted, overwrite=True,
        calibration_images_n=args.calibration_images, batchnorm=args.batchnorm,
        eval_images=None,  # each stage on the whole test split, as the dense model is
        model=dense_name if dense_name.endswith(":bottleneck_resnet") else None)
    _, _, only_1x1 = convert_checkpoint(  # what the grouped convs' own refit buys
        ckpt, args.schedule, calibration_images_n=args.calibration_images, stages=False,
        refit_grouped=False, batchnorm=args.batchnorm,
        model=dense_name if dense_name.endswith(":bottleneck_resnet") else None)
    state = load_checkpoint(ckpt)
    trained = model_from_checkpoint(state, ckpt, dense_name if ":" in dense_name else None)
    plain, _ = rootify(trained.eval(), args.schedule, init="block-diagonal",
                       example_input=torch.zeros(1, 1, 28, 28))
    save_model(out / "block-diagonal.pt", plain, state)
    tune = dict(distill=str(ckpt), lr=args.finetune_lr, limit_train_batches=short, **base)
    user = {"model": dense_name} if ":" in dense_name else {}
    fine = _run(TrainConfig(init=str(converted), out=str(out / "finetune"), **user, **tune))
    plain_fine = _run(TrainConfig(init=str(out / "block-diagonal.pt"),
                                  out=str(out / "finetune-block-diagonal"), **user, **tune))
    scratch = _run(TrainConfig(model=root_name or dense_name,
                               rootify=None if root_name else args.schedule,
                               out=str(out / "scratch"), limit_train_batches=short, **base))
    top = dense["top1"]
    rows = [("dense, trained", top, dense["epochs"] * (limit or 469)),
            ("block-diagonal alone, no training", summary.stages["block-diagonal"], 0)]
    rows += [(f"calibrated {k}, no training", v, 0) for k, v in summary.stages.items()
             if k != "block-diagonal"]
    rows.insert(-1, ("calibrated + refit of the 1x1 convs only", only_1x1.top1_after, 0))
    rows += [(f"calibrated + distilled, {short} steps", fine["top1"], short),
             (f"block-diagonal + distilled, {short} steps", plain_fine["top1"], short),
             (f"{root_name or args.schedule} from scratch, {short} steps", scratch["top1"],
              short)]
    print(f"{args.family} -> {args.schedule} on Fashion-MNIST ({platform.processor() or 'cpu'}"
          f", torch {torch.__version__}; {time.perf_counter() - started:.0f} s in all; "
          f"conversion {summary.conversion_s:.1f} s on {args.calibration_images} images)")
    print(f"{'model':48s} {'test top-1':>10s} {'vs dense':>9s} {'steps':>6s}")
    for name, acc, n in rows:
        print(f"{name:48s} {acc:10.4f} {100 * (acc - top):+8.2f}p {n:6d}")
    print(f"multiply-adds {100 * report.macs_fraction:.1f}% and params "
          f"{100 * report.params_fraction:.1f}% of the dense model")
    print(report.calibration.table())


if __name__ == "__main__":
    sys.exit(main())
