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
