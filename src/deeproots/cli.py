"""The ``deeproots`` command: a thin shell over the library's functions.

    deeproots list [PATTERN]
    deeproots profile MODEL [--input-size 3,224,224] [--per-layer] [--json]
    deeproots table [nin|resnet50|resnet200|googlenet]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch

__all__ = ["main", "build_parser"]


def _input_size(text: str):
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-size takes S, H,W or C,H,W in whole numbers; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _groups(items: Optional[List[str]]) -> Optional[Dict[str, int]]:
    if not items:
        return None
    mapping = {}
    for item in items:
        layer, sep, value = item.rpartition("=")
        if not sep or not layer or not value.strip().isdigit():
            raise ValueError(
                f"--groups takes LAYER=GROUPS (e.g. conv2a=8 or 'layer1.*.conv2=4'); got {item!r}"
            )
        mapping[layer] = int(value)
    return mapping


def _model_kwargs(args) -> dict:
    kwargs = {}
    for key in ("num_classes", "in_channels"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    groups = _groups(getattr(args, "groups", None))
    if groups:
        kwargs["groups"] = groups
    return kwargs


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    p.add_argument("--in-channels", type=int, help="image channels (default 3)")
    p.add_argument("--groups", nargs="+", metavar="LAYER=G",
                   help="per-layer filter groups over the variant's schedule, e.g. conv2a=8")


def cmd_list(args) -> int:
    from .registry import list_models, model_entry

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    if not args.verbose:
        print("\n".join(names))
        return 0
    from .profile import format_table, profile
    from .registry import create_model

    rows = []
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        cost = profile(model)
        entry = model_entry(name)
        rows.append((name, entry.family, entry.variant, f"{cost.macs / 1e9:.3f}",
                     f"{cost.params / 1e6:.3f}", entry.paper))
    head = ("model", "family", "variant", "GMACs", "M params", "paper")
    print(format_table(head, rows, align="lllrrl"))
    return 0


def cmd_profile(args) -> int:
    from .profile import profile
    from .registry import create_model

    with torch.device("meta"):
        model = create_model(args.model, **_model_kwargs(args))
    cost = profile(model, args.input_size, training=args.training)
    if args.json:
        print(cost.to_json(indent=2))
    else:
        print(cost.table(per_layer=args.per_layer))
    return 0


def cmd_table(args) -> int:
    from .paper import PAPER_TABLES, compare, format_comparison

    names = [args.table] if args.table else list(PAPER_TABLES)
    if args.json:
        print(json.dumps({n: compare(n) for n in names}, indent=2))
        return 0
    print("\n\n".join(format_comparison(n) for n in names))
    return 0


def cmd_train(args) -> int:
    from .train import Interrupted, TrainConfig, TrainingDiverged, train

    cfg = TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, out=args.out,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, seed=args.seed, device=args.device,
        workers=args.workers, image_size=args.image_size,
        limit_train_batches=args.limit_train_batches,
        limit_eval_batches=args.limit_eval_batches, resume=args.resume,
        progress=False if args.no_progress else None, download=not args.no_download,
    )
    try:
        summary = train(cfg)
    except Interrupted as stop:
        print(f"{stop}. Resume with: deeproots train {args.model} --data {args.data} "
              f"--out {cfg.out} --resume", file=sys.stderr)
        return 128 + stop.signum
    except TrainingDiverged as err:
        print(f"deeproots train: error: {err}", file=sys.stderr)
        return 3
    if summary["world_size"] > 1 and int(os_environ("RANK", "0")) != 0:
        return 0
    out = summary["out"]
    print(f"{summary['model']} on {summary['data']}: top-1 {summary['top1']:.4f}, "
          f"top-5 {summary['top5']:.4f} after {summary['epochs']} epochs "
          f"({summary['wall_s']:.0f} s, {summary['train_images_per_s']:.0f} training img/s)")
    print(f"wrote {out}/: last.pt, best.pt (checkpoints), metrics.jsonl, metrics.csv, "
          f"summary.json, curves.png")
    return 0


def os_environ(key: str, default: str) -> str:
    import os

    return os.environ.get(key, default)


def cmd_eval(args) -> int:
    from .data import build_loaders
    from .train import _resolve_device, evaluate, load_checkpoint, model_from_checkpoint

    device = _resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    model = model_from_checkpoint(state).to(device)
    config = state.get("config", {})
    data = args.data or config.get("data")
    _, test_loader, spec = build_loaders(
        data, data_dir=args.data_dir or config.get("data_dir"), batch_size=args.batch_size,
        device=device, workers=args.workers, image_size=config.get("image_size", 224),
        limit_eval_batches=args.limit_eval_batches, download_ok=not args.no_download)
    if spec.num_classes != model.num_classes:
        raise ValueError(f"{args.checkpoint} has {model.num_classes} classes but {data} has "
                         f"{spec.num_classes}")
    metrics = evaluate(model, test_loader, device)
    metrics.update(model=state["model_cfg"]["name"], data=spec.name,
                   checkpoint=str(args.checkpoint), epoch=state.get("epoch"))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{metrics['model']} on {metrics['data']} ({metrics['n']} images): top-1 "
              f"{metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, loss {metrics['loss']:.4f}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deeproots`` command."""
    from . import __version__
    from .paper import PAPER_TABLES

    parser = argparse.ArgumentParser(
        prog="deeproots",
        description="Deep Roots (Ioannou et al., CVPR 2017): root networks and their costs.",
    )
    parser.add_argument("--version", action="version", version=f"deeproots {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list model names")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'nin*'")
    p.add_argument("-v", "--verbose", action="store_true", help="with family, costs, table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("profile", help="multiply-adds and parameters of a model")
    p.add_argument("model")
    p.add_argument("--input-size", type=_input_size, default=None,
                   help="S, H,W or C,H,W (default: the model's, e.g. 3,32,32 for NiN)")
    p.add_argument("--per-layer", action="store_true", help="one row per conv/linear layer")
    p.add_argument("--training", action="store_true",
                   help="count the training graph (GoogLeNet's auxiliary classifiers)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_options(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("table", help="the paper's cost tables beside ours")
    p.add_argument("table", nargs="?", choices=list(PAPER_TABLES),
                   help="which table (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_table)

    data_help = "fashion-mnist, cifar10 or imagefolder:PATH (PATH/train, PATH/val)"
    p = sub.add_parser("train", help="train a model on real data")
    p.add_argument("model")
    p.add_argument("--data", default="fashion-mnist", help=data_help + " (default fashion-mnist)")
    p.add_argument("--data-dir", help="where the dataset files are (default: $DEEPROOTS_DATA, "
                   "then standard places)")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128,
                   help="global batch size, split over torchrun processes")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/MODEL-DATA-seedN)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=4, help="image-folder decoding processes")
    p.add_argument("--image-size", type=_positive_int, default=224,
                   help="crop size for image folders")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--limit-train-batches", type=_positive_int, help="batches per epoch")
    p.add_argument("--limit-eval-batches", type=_positive_int, help="test batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1, top-5 and loss of a checkpoint on a test split")
    p.add_argument("checkpoint")
    p.add_argument("--data", help=data_help + " (default: the one it was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--limit-eval-batches", type=_positive_int)
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON (top1, top5, loss, n)")
    p.set_defaults(func=cmd_eval)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules (training, benchmarking, analysis) add their sub-commands here.
_EXTRA_COMMANDS: list = []


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"deeproots {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
