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
    import os

    if summary["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    out = summary["out"]
    print(f"{summary['model']} on {summary['data']}: top-1 {summary['top1']:.4f}, "
          f"top-5 {summary['top5']:.4f} after {summary['epochs']} epochs "
          f"({summary['wall_s']:.0f} s, {summary['train_images_per_s']:.0f} training img/s)")
    print(f"wrote {out}/: last.pt, best.pt (checkpoints), metrics.jsonl, metrics.csv, "
          f"summary.json, curves.png")
    return 0


def _checkpoint_and_test_data(args, limit_eval_batches=None):
    """The model of ``args.checkpoint`` on its device, and the test split of ``args.data``
    (default: the data it was trained on)."""
    from .data import build_loaders
    from .runtime import resolve_device
    from .train import load_checkpoint, model_from_checkpoint

    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    model = model_from_checkpoint(state).to(device)
    config = state.get("config", {})
    data = args.data or config.get("data")
    _, test_loader, spec = build_loaders(
        data, data_dir=args.data_dir or config.get("data_dir"), batch_size=args.batch_size,
        device=device, workers=args.workers, image_size=config.get("image_size", 224),
        limit_eval_batches=limit_eval_batches, download_ok=not args.no_download)
    if spec.num_classes != model.num_classes:
        raise ValueError(f"{args.checkpoint} has {model.num_classes} classes but {data} has "
                         f"{spec.num_classes}")
    return model, test_loader, spec, state, device


def cmd_eval(args) -> int:
    from .train import evaluate

    model, test_loader, spec, state, device = _checkpoint_and_test_data(
        args, args.limit_eval_batches)
    metrics = evaluate(model, test_loader, device)
    metrics.update(model=state["model_cfg"]["name"], data=spec.name,
                   checkpoint=str(args.checkpoint), epoch=state.get("epoch"))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{metrics['model']} on {metrics['data']} ({metrics['n']} images): top-1 "
              f"{metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, loss {metrics['loss']:.4f}")
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze

    model, test_loader, _, _, _ = _checkpoint_and_test_data(args)
    result = analyze(model, test_loader.batches(), args.out, max_batches=args.max_batches,
                     eps=args.eps, blocks=args.blocks, progress=sys.stderr.isatty())
    print(f"{result['model']}: block-diagonality of inter-layer covariance")
    from .analysis import _fmt

    for key, p in result["pairs"].items():
        print(f"  {key:16s} groups {p['groups']:>2}  block score raw {_fmt(p['score_raw'])}  "
              f"whitened {_fmt(p['score_whitened'])}  ({p['blocks_scored']} blocks)")
    print(f"wrote {args.out}/: report.md, analysis.json and the figures")
    return 0


def cmd_plot_costs(args) -> int:
    from .analysis import plot_costs

    path = plot_costs(args.model_a, args.model_b, args.out, args.input_size)
    print(f"wrote {path}")
    return 0


def cmd_plot_results(args) -> int:
    from .analysis import plot_results

    path = plot_results(args.summaries, args.out)
    print(f"wrote {path}")
    return 0


JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
            "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def _with_allocator(args, argv) -> None:
    """Re-run this command in place (exec) with jemalloc preloaded, when asked
    (``--allocator jemalloc``, or ``auto`` where it is installed). glibc malloc hands large
    activations back to the kernel and page-faults them in again on every batch; jemalloc,
    configured as PyTorch's CPU launcher does, keeps them (docs/speed.md has the figures)."""
    import os

    from .runtime import allocator

    if args.allocator == "system" or allocator() == "jemalloc":
        return
    if "openvino" in (getattr(args, "path", None) or ()):
        if args.allocator == "jemalloc":
            raise ValueError("--path openvino cannot run under jemalloc (OpenVINO aborts with "
                             "'double free or corruption'); use --allocator system")
        return  # auto: OpenVINO needs the system allocator
    lib = next((p for p in JEMALLOC if os.path.exists(p)), None)
    if lib is None:
        if args.allocator == "jemalloc":
            raise ValueError("--allocator jemalloc: libjemalloc.so.2 not found in "
                             f"{', '.join(JEMALLOC)}; on Debian: apt-get install libjemalloc2")
        return
    env = dict(os.environ, LD_PRELOAD=lib, MALLOC_CONF=os.environ.get(
        "MALLOC_CONF", "oversize_threshold:1,background_thread:true,metadata_thp:auto,"
        "dirty_decay_ms:-1,muzzy_decay_ms:-1"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "deeproots", *argv], env)


def cmd_bench(args) -> int:
    from .bench import bench_models, format_bench

    if args.paper:  # before the default batch size: the table picks its own
        return _bench_paper(args)
    if not args.models:
        raise ValueError("name at least one model to time (deeproots list shows them), or "
                         "--paper nin|resnet50|googlenet")
    args.batch_size = args.batch_size or 128
    if args.layers:
        return _bench_layers(args)
    if args.plot:
        raise ValueError("--plot draws per-layer times: add --layers")

    rows = bench_models(args.models, batch_size=args.batch_size, device=args.device,
                        threads=args.threads, dtype=args.dtype, paths=args.path,
                        modes=args.mode, repeats=args.repeats, warmup=args.warmup,
                        input_size=args.input_size)
    from .runtime import allocator

    for r in rows:
        r["allocator"] = allocator()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_bench(rows) + f"\nallocator: {allocator()}")
    return 0


def _bench_paper(args) -> int:
    """``deeproots bench --paper TABLE``: the table's variants timed side by side, beside the
    paper's CPU and GPU speedups."""
    from .bench import bench_models
    from .paper import PAPER_TABLES, format_timings, paper_timings
    from .runtime import allocator

    if args.models:
        raise ValueError(f"--paper {args.paper} times that table's models; name no models "
                         f"(got {' '.join(args.models)})")
    if args.layers or args.plot:
        raise ValueError("--paper times whole forward passes; --layers and --plot take model "
                         "names instead (deeproots bench MODEL... --layers)")
    paper = {r["model"]: r for r in paper_timings(args.paper)}
    batch = args.batch_size or (128 if PAPER_TABLES[args.paper].model == "nin" else 16)
    rows = bench_models(list(paper), batch_size=batch, device=args.device, threads=args.threads,
                        dtype=args.dtype, paths=args.path, repeats=args.repeats,
                        warmup=args.warmup, input_size=args.input_size)
    for r in rows:
        r.update(paper[r["model"]], allocator=allocator())
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_timings(args.paper, rows) + f"\nallocator: {allocator()}")
    return 0


def _bench_layers(args) -> int:
    """``deeproots bench --layers``: where the time of each model's forward pass goes."""
    from .bench import LAYER_PATHS, format_layer_times, layer_times
    from .profile import parse_input_size
    from .registry import create_model, model_entry
    from .runtime import allocator, resolve_device

    for path in args.path:
        if path not in LAYER_PATHS:
            raise ValueError(f"--layers times paths {', '.join(LAYER_PATHS)}; got {path!r}")
    for name in args.models:
        model_entry(name)
    device = resolve_device(args.device, accepted=("cpu", "cuda"))
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval().to(device)
        x = torch.randn(args.batch_size, *parse_input_size(args.input_size, model),
                        device=device)
        for path in args.path:
            r = layer_times(model, x, path, dtype=args.dtype, repeats=args.repeats,
                            warmup=args.warmup)
            r.update(model=name, path=path, batch_size=args.batch_size, dtype=args.dtype,
                     threads=torch.get_num_threads(), allocator=allocator())
            results.append(r)
            if not args.json:
                print(format_layer_times(r, f"{name}, path {path}, batch {args.batch_size}, "
                                            f"{args.dtype}, {torch.get_num_threads()} threads, "
                                            f"allocator {allocator()}") + "\n", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    if args.plot:
        from .analysis import plot_layer_times

        out = plot_layer_times(results, args.plot)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args) -> int:
    from .deploy import export
    from .profile import parse_input_size
    from .registry import create_model

    if args.checkpoint:
        from .train import load_checkpoint, model_from_checkpoint

        model = model_from_checkpoint(load_checkpoint(args.checkpoint))
    else:
        model = create_model(args.model, **_model_kwargs(args))
    size = parse_input_size(args.input_size, model)
    export(model.eval(), torch.randn(args.batch_size, *size), args.out, args.format)
    print(f"wrote {args.out} ({args.format}, batch norm folded, input {size})")
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
    p.add_argument("--allocator", choices=["auto", "jemalloc", "system"], default="auto",
                   help="auto: jemalloc where installed (apt-get install libjemalloc2)")
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

    p = sub.add_parser("analyze", help="covariance, correlation and filters of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", help=data_help + " (default: the one it was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="folder for figures, analysis.json, report.md")
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--max-batches", type=_positive_int, help="default: the whole test split")
    p.add_argument("--eps", type=float, default=1e-5, help="ZCA whitening epsilon")
    p.add_argument("--blocks", type=_positive_int, default=4,
                   help="blocks to score ungrouped layers on (default 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-download", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("plot-costs", help="per-layer costs of two models (Figure 15)")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--input-size", type=_input_size, default=None)
    p.add_argument("--out", required=True, help="PNG file")
    p.set_defaults(func=cmd_plot_costs)

    p = sub.add_parser("plot-results", help="accuracy vs costs from summary.json files "
                       "(Figures 5, 8, 9)")
    p.add_argument("summaries", nargs="+", help="summary.json files of training runs")
    p.add_argument("--out", required=True, help="PNG file")
    p.set_defaults(func=cmd_plot_results)

    p = sub.add_parser("bench", help="time models side by side (ms per image)")
    p.add_argument("models", nargs="*")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="default 128 (16 for --paper resnet50 and googlenet)")
    p.add_argument("--paper", choices=["nin", "resnet50", "googlenet"],
                   help="time every variant of that table of the paper and show its CPU and "
                        "GPU speedups beside ours")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--path", nargs="+", default=["fold"],
                   choices=["eager", "fold", "script", "compile", "onnxruntime", "openvino"],
                   help="inference engines to time (default fold: BN folded, channels-last)")
    p.add_argument("--mode", nargs="+", default=["inference"], choices=["inference", "train"])
    p.add_argument("--repeats", type=_positive_int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input-size", type=_input_size, default=None)
    p.add_argument("--allocator", choices=["auto", "jemalloc", "system"], default="auto",
                   help="auto: jemalloc where installed (apt-get install libjemalloc2)")
    p.add_argument("--layers", action="store_true",
                   help="per-layer times instead (paths eager, fold; openvino on cpu)")
    p.add_argument("--plot", metavar="PNG", help="with --layers: a bar chart of where the "
                   "time goes, by kind of layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a model as ONNX or TorchScript")
    p.add_argument("model", help="model name (or any name with --checkpoint)")
    p.add_argument("--checkpoint", help="export the trained weights of this checkpoint")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--input-size", type=_input_size, default=None)
    _add_model_options(p)
    p.set_defaults(func=cmd_export)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules (training, benchmarking, analysis) add their sub-commands here.
_EXTRA_COMMANDS: list = []


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        # Only a command typed at the shell is re-run with another allocator; a program
        # calling main() keeps its own process (and sets LD_PRELOAD itself if it wants).
        if from_command_line and getattr(args, "allocator", None) is not None:
            _with_allocator(args, argv)
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"deeproots {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
