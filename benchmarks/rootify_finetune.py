"""Block-diagonal initialisation against training from scratch, on real Fashion-MNIST:
train `nin` (or reuse a finished run), make it root-8 with `init="block-diagonal"`, and
report test top-1 right after rootify, after fine-tuning, and for root-8 trained from
scratch for as many epochs. Runs finished earlier in --out are reused.

    python benchmarks/rootify_finetune.py --out runs/rootify [--epochs 1] [--schedule root-8]
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from deeproots.config import TrainConfig
from deeproots.conversion import rootify
from deeproots.training.data import build_loaders
from deeproots.training.evaluate import evaluate
from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint
from deeproots.training.loop import train


def _run(cfg: TrainConfig, model=None) -> float:
    """A run's test top-1: read from a run finished earlier, resumed from its checkpoint,
    or trained (over a start that never reached a checkpoint)."""
    out = Path(cfg.out)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())["top1"]
    cfg.resume = (out / "last.pt").exists()
    cfg.overwrite = out.exists() and not cfg.resume
    return train(cfg, model=model).top1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rootify")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--schedule", default="root-8")
    p.add_argument("--finetune-lr", type=float, default=0.02)
    args = p.parse_args()
    out = Path(args.out)
    base = dict(data="fashion-mnist", epochs=args.epochs, device="cpu", progress=False)
    started = time.perf_counter()
    orig_top1 = _run(TrainConfig(model="nin", out=str(out / "nin"), **base))
    state = load_checkpoint(out / "nin" / "last.pt")
    dense = model_from_checkpoint(state).eval()
    _, test, spec = build_loaders("fashion-mnist", batch_size=256, download_ok=False)
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    root, report = rootify(dense, args.schedule, example_input=x, init="block-diagonal")
    right_after = evaluate(root, test).top1
    finetuned = _run(TrainConfig(model=f"nin-{args.schedule}-from-nin",
                                 out=str(out / "finetune"), lr=args.finetune_lr, **base),
                     model=root)
    scratch = _run(TrainConfig(model=f"nin-{args.schedule}", out=str(out / "scratch"), **base))
    print(f"Fashion-MNIST, {args.epochs} epoch(s) each, {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
    print(f"{'model':50s} {'test top-1':>10s}")
    print(f"{'nin (dense, trained)':50s} {orig_top1:10.4f}")
    print(f"{f'{args.schedule} by rootify, block-diagonal, no training':50s} {right_after:10.4f}")
    print(f"{f'  + fine-tuned {args.epochs} epoch(s), lr {args.finetune_lr}':50s} {finetuned:10.4f}")
    print(f"{f'nin-{args.schedule} from scratch, {args.epochs} epoch(s)':50s} {scratch:10.4f}")
    print(f"multiply-adds {100 * report.macs_fraction:.1f}% and params "
          f"{100 * report.params_fraction:.1f}% of nin")


if __name__ == "__main__":
    main()
