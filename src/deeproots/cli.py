"""The ``deeproots`` command: a thin shell over the library's functions.

    deeproots list [PATTERN] [-v]              model names (-v: family, costs, paper table)
    deeproots profile MODEL [--per-layer]      multiply-adds and parameters
    deeproots table [TABLE]                    the paper's cost tables beside ours
    deeproots train MODEL --data DATA          train on real data (--resume, --overwrite)
    deeproots eval CHECKPOINT                  top-1, top-5 and loss on a test split
    deeproots analyze CHECKPOINT --out DIR     inter-layer covariance and its figures
    deeproots plot-costs A B --out PNG         per-layer costs of two models (Figure 15)
    deeproots plot-results SUMMARY... --out PNG  accuracy against costs (Figures 5, 8, 9)
    deeproots bench MODEL... | --paper TABLE   time models side by side (--layers: per layer)
    deeproots study FAMILY --seeds 3           the accuracy study: variants x seeds vs orig
    deeproots roofline MODEL... --device h100  the fastest each layer can run, and why
    deeproots rootify MODEL --schedule root-8  make any CNN a root network (before/after)
    deeproots export MODEL --format pt2|aoti|onnx|torchscript --out FILE

MODEL is a registered name or FILE.py:FUNCTION, a function of yours that returns the model.

The parser is built from torch-free modules (``config``, ``paper``, ``checks``) so that
``--help`` answers at once; each command's handler imports the library modules it uses,
which bring torch.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import MISSING, fields
from typing import Dict, List, Optional

from .errors import DeeprootsError
from . import __version__
from .checks import check_whole
from .config import (BATCHNORMS, COMPILE_MODES, DATA_HELP, DTYPES, EXPORT_FORMATS,
                     FINETUNE_EPOCHS, FINETUNE_LR, FINETUNE_OPT, GROUPED_CONV, LAYER_PATHS,
                     MODES, OPTIMIZERS, UNVERIFIED, MEMORY_FORMATS, PATHS, ROOFLINE_DEVICES,
                     ROOFLINE_DTYPES, STEMS, TrainConfig, finetune_optimizer, per_optimizer)
from .reproduction.tables import PAPER_TABLES, TIMED_TABLES
from .runtime import ALLOCATORS

__all__ = ["main", "build_parser"]

OVERWRITE_HELP = "replace the file if it exists (a run's own files are never replaced)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``deeproots CMD: error: ...`` and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# Argument types: parse the text, then the library's own validator says what is accepted.


def _whole(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            return check_whole(name, int(text), minimum)
        except ValueError as err:
            message = str(err) if "must be" in str(err) else \
                f"{name} takes a whole number; got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
    return parse


def _count_or_all(name: str):
    whole = _whole(name)

    def parse(text: str):
        return None if text == "all" else whole(text)
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None


def _input_size(text: str):
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        values = ()
    if not values or len(values) > 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"--input-size takes S, H,W or C,H,W in whole numbers >= 1; got {text!r}")
    return values[0] if len(values) == 1 else values


def _groups(items: Optional[List[str]], flag: str = "--groups") -> Optional[Dict[str, int]]:
    if not items:
        return None
    mapping = {}
    for item in items:
        layer, sep, value = item.rpartition("=")
        if not sep or not layer or not value.strip().isdigit():
            raise DeeprootsError(
                f"{flag} takes LAYER=GROUPS (e.g. conv2a=8 or 'layer1.*.conv2=4'); got {item!r}"
            )
        mapping[layer] = int(value)  # a layer given twice: the last value wins
    return mapping


def _schedule(text: Optional[str]):
    """``--schedule``: root-N, tree-N, col-N, or per-layer groups as a budget prints them
    (``conv2a=4,conv3a=2``, commas or spaces between)."""
    if text is None or "=" not in text:
        return text
    return _groups([item for item in re.split(r"[,\s]+", text.strip()) if item],
                   "--schedule")


def _build(args):
    """The model named by ``args.model`` (a registered name or FILE.py:FUNCTION), with the
    command's --num-classes, --in-channels and --groups."""
    from .models.layers import apply_groups
    from .models.registry import build_model, is_user_model

    kwargs = {k: getattr(args, k) for k in ("num_classes", "in_channels")
              if getattr(args, k, None) is not None}
    channels = _input_channels(getattr(args, "input_size", None), kwargs.get("in_channels"))
    if channels is not None:
        kwargs["in_channels"] = channels
    groups = _groups(getattr(args, "groups", None))
    if groups and not is_user_model(args.model):
        model = build_model(args.model, **kwargs, groups=groups)
    else:
        model = build_model(args.model, **kwargs)
        apply_groups(model, groups)
    return _as_backbone(model, args, args.model)


def _backbone_options(args) -> dict:
    """``--features-only`` and ``--out-indices`` as create_model's arguments (none given:
    {}); --out-indices alone is one line."""
    features_only = getattr(args, "features_only", False)
    out_indices = getattr(args, "out_indices", None)
    if out_indices is not None and not features_only:
        raise DeeprootsError("--out-indices picks the feature maps of a backbone: add "
                             "--features-only")
    if not features_only:
        return {}
    return {"features_only": True, "out_indices": out_indices}


def _as_backbone(model, args, what: str):
    """``model`` (built from a name, or a checkpoint's) made the backbone
    ``--features-only`` asks for (as it is otherwise); ``what``: how the refusal names a
    model of your own."""
    backbone = _backbone_options(args)
    if backbone:
        if not hasattr(model, "set_features_only"):
            raise DeeprootsError(f"--features-only makes a deeproots model a backbone; {what} "
                                 f"gives a model of your own")
        model.set_features_only(backbone["out_indices"])
    return model


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=_whole("--num-classes", 0),
                   help="classifier outputs (default: the model's; 0: no classifier, the "
                        "pooled features, as timm's num_classes=0)")
    p.add_argument("--in-channels", type=_whole("--in-channels"),
                   help="image channels (default: the C of --input-size C,H,W, else 3)")
    p.add_argument("--groups", nargs="+", action="extend", metavar="LAYER=G",
                   help="per-layer filter groups over the variant's schedule, e.g. conv2a=8 "
                        "(may be repeated; a layer named twice takes the last value)")
    p.add_argument("--features-only", action="store_true",
                   help="a backbone returning its stages' feature maps, as timm's "
                        "features_only=True (with a checkpoint too)")
    p.add_argument("--out-indices", type=int, nargs="+", metavar="I",
                   help="with --features-only: the stages whose maps it returns (default all; "
                        "-1 the last)")


def _add_config_options(p: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per field of a config dataclass, its help and choices from the field. Values
    not given are left out of the namespace (the dataclass default, or on --resume the run's
    own value, applies) and range checks are the dataclass's own ``check()``."""
    for f in fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=meta.get("help"))
        if meta.get("positional"):
            p.add_argument(f.name, nargs="?", **{k: v for k, v in kw.items() if k != "dest"})
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if "const" in meta and meta.get("nargs") == "?":  # --flag [VALUE]
            kw.update(nargs="?", const=meta["const"], choices=meta.get("choices"),
                      metavar=meta.get("metavar"))
        elif "const" in meta:
            kw.update(action="store_const", const=meta["const"])
        elif isinstance(default, bool):
            kw.update(action="store_true")
        else:
            annotation = str(f.type)  # e.g. "Optional[int]", "List[float]"
            kind = _number if "float" in annotation else _integer if "int" in annotation else str
            kw.update(type=kind, choices=meta.get("choices"), metavar=meta.get("metavar"))
            if "nargs" in meta:
                kw.update(nargs=meta["nargs"])
            if default not in (None, []) and kw["help"]:
                shown = " ".join(map(str, default)) if isinstance(default, list) else default
                kw["help"] += f" (default {shown})"
        p.add_argument(flag, **kw)


# ---------------------------------------------------------------------------------------------
# Commands. Each is a short recipe over library functions.


def _print_json(value) -> None:
    from .runtime import to_json

    print(to_json(value, indent=2))


def cmd_list(args) -> int:
    from .models.registry import list_models

    names = list_models(args.pattern)
    if not names:
        raise DeeprootsError(f"no model matches {args.pattern!r}; `deeproots list` shows all names")
    if not args.verbose:
        print("\n".join(names))
        return 0
    import torch

    from .inspection.costs import profile
    from .reproduction.tables import table_of
    from .models.registry import create_model, model_entry
    from .text import format_table

    rows = []
    for name in names:
        with torch.device("meta"):
            cost = profile(create_model(name))
        entry = model_entry(name)
        rows.append((name, entry.family, entry.variant, f"{cost.macs / 1e9:.3f}",
                     f"{cost.params / 1e6:.3f}", table_of(name)))
    head = ("model", "family", "variant", "GMACs", "M params", "paper")
    print(format_table(head, rows, align="lllrrl"))
    return 0


def cmd_profile(args) -> int:
    import torch

    from .inspection.costs import profile

    if _names_a_checkpoint(args.model, "profile"):
        _no_model_options(args, "profile CHECKPOINT")
        model = _as_backbone(_trained_model(args.model, input_size=args.input_size), args,
                             args.model)
    else:
        with torch.device("meta"):
            model = _build(args)
    cost = profile(model, args.input_size, training=args.training)
    print(cost.to_json(indent=2) if args.json else cost.table(per_layer=args.per_layer))
    return 0


def cmd_table(args) -> int:
    from .reproduction.compare import compare, format_comparison

    names = [args.table] if args.table else list(PAPER_TABLES)
    if args.json:
        _print_json({n: [r.to_dict() for r in compare(n)] for n in names})
    else:
        print("\n\n".join(format_comparison(n) for n in names))
    return 0


def _train_settings(args) -> dict:
    """The settings the command line names (the flags given), with a fine-tune's defaults
    (``--init``: a fraction of a training, :data:`~deeproots.config.FINETUNE_EPOCHS` by
    :data:`~deeproots.config.FINETUNE_OPT` at its :data:`~deeproots.config.FINETUNE_LR`)
    where not given."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if not given.get("resume") and given.get("init"):
        opt, lr = finetune_optimizer(given.get("opt"), given.get("lr"))
        given = {"epochs": FINETUNE_EPOCHS, **given, "opt": opt, "lr": lr}
    return given


def cmd_train(args) -> int:
    from .training.loop import Interrupted, TrainingDiverged, train

    given = _train_settings(args)
    try:  # the run is opened, resumed or refused by the one rule (training.run.open_run)
        summary = train(TrainConfig(**given), given=given)
    except Interrupted as stop:
        print(f"{stop}. Resume with: {stop.command}", file=sys.stderr)
        return 128 + stop.signum
    except TrainingDiverged as err:
        print(f"deeproots train: error: {err}", file=sys.stderr)
        return 3
    if summary.world_size > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary.already_finished:
        print(f"{summary.out}: the run had finished its {summary.epochs} "
              f"epoch{'s' if summary.epochs != 1 else ''}; nothing "
              f"trained or written (to train longer: deeproots train --resume --out "
              f"{summary.out} --change epochs --epochs N)")
    print(f"{summary.model} on {summary.data}: top-1 {summary.top1:.4f}, top-5 "
          f"{summary.top5:.4f} after {summary.epochs} epochs ({summary.wall_s:.0f} s, "
          f"{summary.train_images_per_s:.0f} training img/s)")
    if not summary.already_finished:
        print(f"wrote {summary.out}/: {', '.join(summary.files)}")
    return 0


def _load_for_eval(args, limit_eval_batches=None):
    from .training.evaluate import load_for_eval

    return load_for_eval(args.checkpoint, data=args.data, data_dir=args.data_dir,
                         batch_size=args.batch_size, device=args.device, workers=args.workers,
                         limit_eval_batches=limit_eval_batches, download=not args.no_download,
                         model=args.model, mean=args.mean, std=args.std)


def cmd_eval(args) -> int:
    from .training.evaluate import evaluate

    model, test_loader, spec, state, device = _load_for_eval(args, args.limit_eval_batches)
    result = evaluate(model, test_loader, device)
    if args.json:
        _print_json({**result.to_dict(), "model": state["model_cfg"]["name"], "data": spec.name,
                     "checkpoint": str(args.checkpoint), "epoch": state.get("epoch"),
                     "read_as": {k: getattr(spec, k) for k in (
                         "in_channels", "image_size", "mean", "std", "crop_fraction")}})
    else:
        print(f"{state['model_cfg']['name']} on {spec.name} ({result.n} images): top-1 "
              f"{result.top1:.4f}, top-5 {result.top5:.4f}, loss {result.loss:.4f}")
        trained_on = (state.get("data") or {}).get("name")
        if spec.name.startswith("imagefolder:") and trained_on not in (None, spec.name):
            print(f"(its images read as {trained_on}'s were: {spec.in_channels} channel"
                  f"{'s' if spec.in_channels > 1 else ''} at {spec.image_size}x"
                  f"{spec.image_size}, normalised with mean "
                  f"{', '.join(f'{m:g}' for m in spec.mean)} and std "
                  f"{', '.join(f'{v:g}' for v in spec.std)})")
    return 0


def cmd_analyze(args) -> int:
    from .inspection.covariance import REPORT_FILES, analyze, format_score
    from .outputs import check_new_folder

    # before the checkpoint and the data are loaded
    check_new_folder(args.out, REPORT_FILES, overwrite=args.overwrite)
    model, test_loader, _, _, _ = _load_for_eval(args)
    result = analyze(model, test_loader.batches(), args.out, max_batches=args.max_batches,
                     eps=args.eps, blocks=args.blocks, progress=sys.stderr.isatty(),
                     overwrite=args.overwrite)
    print(f"{result['model']}: block-diagonality of inter-layer covariance")
    for key, p in result["pairs"].items():
        print(f"  {key:16s} groups {p['groups']:>2}  block score raw "
              f"{format_score(p['score_raw'])}  whitened {format_score(p['score_whitened'])}  "
              f"({p['blocks_scored']} blocks)")
    print(f"wrote {args.out}/: report.md, analysis.json and the figures")
    return 0


def cmd_plot_costs(args) -> int:
    from .plots import plot_costs

    out = plot_costs(*_models_or_checkpoints([args.model_a, args.model_b], "plot-costs",
                                             args.input_size), args.out, args.input_size,
                     overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_plot_results(args) -> int:
    from .plots import plot_results, plot_run_curves

    draw = plot_run_curves if args.curves else plot_results
    print(f"wrote {draw(args.summaries, args.out, overwrite=args.overwrite)}")
    return 0


def cmd_bench(args) -> int:
    from .outputs import check_new_plot

    if args.plot:
        if not args.layers:
            raise DeeprootsError("--plot draws per-layer times: add --layers")
        check_new_plot(args.plot, "--plot", args.overwrite)  # before the timing it would lose
    common = dict(device=args.device, threads=args.threads, dtype=args.dtype,
                  repeats=args.repeats, warmup=args.warmup, input_size=args.input_size)
    if args.paper:
        return _bench_paper(args, common)
    if args.layers:
        return _bench_layers(args, common)
    from .speed.bench import bench_models, format_bench

    if "train" not in args.mode and (args.compile or args.detail or
                                     args.grouped_conv != "native" or
                                     args.memory_format != ["auto"]):
        raise DeeprootsError("--compile, --grouped-conv, --memory-format and --detail set the "
                             "training step: add --mode train")
    if args.mode == ["train"] and args.dtype != "float32":
        raise DeeprootsError(f"--dtype {args.dtype} sets the inference precision; --mode train "
                             f"follows deeproots train's recipe (bf16 autocast on CUDA, float32 "
                             f"on CPU)")
    # each path's rows printed as soon as they are measured: a long bench shows what it has
    show = None if args.json else (lambda rows: print(format_bench(rows) + "\n", flush=True))
    rows = bench_models(_models_or_checkpoints(args.models, "bench", args.input_size),
                        batch_size=args.batch_size or 128, paths=args.path,
                        modes=args.mode, compile=args.compile, grouped_conv=args.grouped_conv,
                        detail=args.detail, memory_formats=args.memory_format, on_rows=show,
                        **common)
    if args.json:
        _print_json([r.to_dict() for r in rows])
    return 0


def _bench_paper(args, common) -> int:
    from .speed.bench import bench_paper
    from .reproduction.tables import format_timings

    if args.models:
        raise DeeprootsError(f"--paper {args.paper} times that table's models; name no models "
                             f"(got {' '.join(args.models)})")
    if args.layers:
        raise DeeprootsError("--paper times whole forward passes; --layers and --plot take model "
                             "names instead (deeproots bench MODEL... --layers)")
    rows = bench_paper(args.paper, batch_size=args.batch_size, paths=args.path, **common)
    if args.json:
        _print_json([r.to_dict() for r in rows])
    else:
        print(format_timings(args.paper, rows))
    return 0


def _bench_layers(args, common) -> int:
    from .speed.bench import bench_layers, format_layer_times

    if "train" in args.mode:
        return _bench_train_layers(args, common)

    show = None if args.json else (lambda r: print(format_layer_times(r) + "\n", flush=True))
    results = bench_layers(_models_or_checkpoints(args.models, "bench", args.input_size),
                           paths=args.path,
                           batch_size=args.batch_size or 128,
                           on_result=show, **common)
    if args.json:
        _print_json([r.to_dict() for r in results])
    if args.plot:
        from .plots import plot_layer_times

        out = plot_layer_times(results, args.plot, overwrite=args.overwrite)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _bench_train_layers(args, common) -> int:
    import torch

    from .speed.bench import (check_models, format_train_layer_times, models_to_time,
                              train_layer_times)
    from .inspection.costs import parse_input_size
    from .runtime import resolve_device

    if args.mode != ["train"] or args.plot or len(args.memory_format) > 1:
        raise DeeprootsError("--mode train --layers times one training step per layer: give "
                             "--mode train alone, one --memory-format and no --plot")
    specs = _models_or_checkpoints(args.models, "bench", args.input_size)
    check_models(specs)
    device = resolve_device(args.device, accepted=("cpu", "cuda"))
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for model in models_to_time(specs, device).values():
        model.train()
        size = parse_input_size(args.input_size, model)
        x = torch.randn(args.batch_size or 128, *size, device=device)
        result = train_layer_times(model, x, args.memory_format[0], repeats=args.repeats,
                                   warmup=args.warmup)
        results.append(result)
        if not args.json:
            print(format_train_layer_times(result) + "\n", flush=True)
    if args.json:
        _print_json([r.to_dict() for r in results])
    return 0


def cmd_rootify(args) -> int:
    import torch

    from .conversion.rule import rootify
    from .inspection.costs import parse_input_size

    options = dict(ignore=args.ignore, macs=args.macs, params=args.params,
                   regroup=args.regroup, stem=args.stem, allow_depthwise=args.allow_depthwise)
    if _names_a_checkpoint(args.model, "rootify"):
        return _rootify_checkpoint(args, options)
    for flag, value in (("--latency", args.latency), ("--sensitivity", args.sensitivity or None),
                        ("--frontier", args.frontier)):
        if value is not None:
            raise DeeprootsError(f"{flag} measures a trained model's accuracy: give its "
                                 f"checkpoint (RUN/best.pt) as the model; got {args.model!r}")
    for flag, value in (("--data", args.data), ("--out", args.out), ("--model", args.from_model),
                        ("--calibration-images", args.calibration_images),
                        ("--mean", args.mean), ("--std", args.std),
                        ("--batchnorm", args.batchnorm),
                        ("--finetune-steps", args.finetune_steps or None),
                        ("--plot", args.plot)):
        if value is not None:
            raise DeeprootsError(f"{flag} calibrates a trained model: give a checkpoint "
                                 f"(RUN/best.pt) as the model; got {args.model!r}")
    if args.schedule is None and args.macs is None and args.params is None:
        raise DeeprootsError("one of the arguments --schedule --macs --params is required "
                             "(with a trained checkpoint also --latency, --sensitivity or "
                             "--frontier)")
    model = _for_input(args.model, args.input_size)
    if args.input_size is None and getattr(model, "default_input_size", None) is None:
        raise DeeprootsError(f"{args.model} has no default input size; give --input-size C,H,W")
    x = torch.zeros(1, *parse_input_size(args.input_size, model))
    _, report = rootify(model, _schedule(args.schedule), example_input=x, **options)
    print(report.to_json(indent=2) if args.json else report.table())
    return 0


def _names_a_checkpoint(spec: str, command: str) -> bool:
    """Whether a command's model argument ``spec`` is a checkpoint file that exists (not a
    model name or ``FILE.py:FUNCTION``); a one-line error where it names a file that does
    not (a typo in a checkpoint's path, not a model name)."""
    from .models.registry import is_user_model

    if not is_user_model(spec) and os.path.isfile(spec):
        return True
    if _looks_like_a_file(spec):
        raise DeeprootsError(f"checkpoint {spec}: no such file ({command} takes a model "
                             f"name, FILE.py:FUNCTION, or a checkpoint file that exists)")
    return False


def _looks_like_a_file(text: str) -> bool:
    """Whether ``text`` names a file rather than a model: a path with a folder in it, or a
    checkpoint's suffix (``base/bst.pt``), and no registered model of that name."""
    from .models.registry import is_model, is_user_model

    if is_user_model(text) or is_model(text):
        return False
    return os.sep in text or text.endswith((".pt", ".pth", ".ckpt", ".bin", ".tar",
                                             ".safetensors"))


def _trained_model(path: str, user_spec: Optional[str] = None, input_size=None):
    """The model of the checkpoint ``path`` (its weights, its groups), named by the path and
    sized as it was trained (``default_input_size``: Fashion-MNIST's 1x28x28, not the
    model's 3x32x32), as profile, bench, roofline and export take it in a model's place.
    ``user_spec``: the ``FILE.py:FUNCTION`` of a model of your own. ``input_size``: the
    command's ``--input-size``, whose C (of C,H,W) must be the channels it was trained on."""
    from .training.checkpoint import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path, user_spec,
                                  how="pass its FILE.py:FUNCTION (--model where the command "
                                      "has it)")
    trained = state.get("data") if isinstance(state.get("data"), dict) else {}
    channels = trained.get("in_channels", getattr(model, "in_channels", None))
    given = _input_channels(input_size)
    if given is not None and channels and given != channels:
        on = f" ({trained['name']})" if trained.get("name") else ""
        raise DeeprootsError(f"--input-size {','.join(map(str, input_size))}: {path} was "
                             f"trained on {channels}-channel images{on}; give "
                             f"{channels},H,W or H,W")
    if trained.get("image_size") and channels:
        model.default_input_size = (int(channels), int(trained["image_size"]),
                                    int(trained["image_size"]))
    model.name = path
    return model


def _no_model_options(args, command: str) -> None:
    """A one-line error where a checkpoint's model is given options that would change it."""
    given = [f for f, v in (("--num-classes", getattr(args, "num_classes", None)),
                            ("--in-channels", getattr(args, "in_channels", None)),
                            ("--groups", getattr(args, "groups", None))) if v is not None]
    if given:
        raise DeeprootsError(f"{', '.join(given)} cannot change a trained checkpoint's model; "
                             f"{command} takes the model it was trained as")


def _models_or_checkpoints(specs, command: str, input_size=None) -> list:
    """Each of ``specs`` as bench and roofline take it: a checkpoint file as its trained
    model (:func:`_trained_model`); a model name or FILE.py:FUNCTION as it is, or, where
    ``--input-size C,H,W`` names C channels, built for C-channel images (nin at 1,28,28:
    Fashion-MNIST's), as these commands have no --in-channels."""
    out = []
    for spec in specs:
        if _names_a_checkpoint(spec, command):
            out.append(_trained_model(spec, input_size=input_size))
        elif _input_channels(input_size) is not None:
            out.append(_for_input(spec, input_size))
        else:
            out.append(spec)
    return out


def _for_input(spec: str, input_size=None):
    """The model ``spec`` names (a model name or FILE.py:FUNCTION) built for the images of
    ``--input-size`` (:func:`_input_channels`); for commands with no --in-channels."""
    from .models.registry import build_model

    channels = _input_channels(input_size)
    return build_model(spec, **({} if channels is None else {"in_channels": channels}))


def _input_channels(input_size, in_channels: Optional[int] = None) -> Optional[int]:
    """The image channels a named model is built for: ``--in-channels``, else the C of
    ``--input-size C,H,W`` (nin at 1,28,28: Fashion-MNIST's; as timm's scripts read
    ``--input-size``), else None (the model's own); the two disagreeing is one line."""
    given = input_size[0] if isinstance(input_size, tuple) and len(input_size) == 3 else None
    if in_channels is not None and given is not None and in_channels != given:
        raise DeeprootsError(f"--in-channels {in_channels} and --input-size "
                             f"{','.join(map(str, input_size))} disagree on the image channels: "
                             f"give one of them, or the same C in both")
    return in_channels if in_channels is not None else given


def _rootify_checkpoint(args, options) -> int:
    """``deeproots rootify CHECKPOINT ...``: the trained model converted with calibration,
    evaluated before and after (deeproots.conversion.checkpoint.convert_checkpoint); its
    layers priced (``--sensitivity``), or a frontier of conversions (``--frontier``)."""
    from .conversion.checkpoint import convert_checkpoint

    if args.input_size is not None:
        raise DeeprootsError("--input-size: a checkpoint is converted at the size it was "
                             "trained at (--image-size for a state_dict's images); leave it out")
    if args.plot is not None and not args.sensitivity:
        raise DeeprootsError("--plot draws --sensitivity's table; add --sensitivity")
    if args.sensitivity and args.batchnorm not in (None, "keep"):
        raise DeeprootsError(f"--batchnorm {args.batchnorm} sets how a conversion treats the "
                             f"batch norms; --sensitivity prices each layer with them as they "
                             f"were: leave --batchnorm out, or convert (--schedule, --latency)")
    if args.finetune_steps and args.frontier is None:
        raise DeeprootsError("--finetune-steps fine-tunes the points of --frontier; for one "
                             "conversion: deeproots train --init FILE.pt --distill CHECKPOINT")
    for flag, value in (("--finetune-opt", args.finetune_opt),
                        ("--finetune-lr", args.finetune_lr)):
        if value is not None and not args.finetune_steps:
            raise DeeprootsError(f"{flag} sets the fine-tune of --finetune-steps, which is not "
                                 f"given; add --finetune-steps K (with --frontier), or leave "
                                 f"{flag} out")
    common = dict(data=args.data, data_dir=args.data_dir, model=args.from_model,
                  calibration_images_n=args.calibration_images, device=args.device,
                  batch_size=args.batch_size, image_size=args.image_size,
                  mean=args.mean, std=args.std, download=not args.no_download)
    progress = None if args.json else _say
    options = {**options, "batchnorm": args.batchnorm or "keep"}
    if args.sensitivity:
        return _rootify_sensitivity(args, common, options, progress)
    if args.frontier is not None:
        return _rootify_frontier(args, common, options, progress)
    if args.schedule is None and args.macs is None and args.params is None \
            and args.latency is None:
        raise DeeprootsError("give --schedule, --macs, --params or --latency (or "
                             "--sensitivity, --frontier) with a checkpoint")
    _, report, summary = convert_checkpoint(
        args.model, _schedule(args.schedule), latency=args.latency, out=args.out,
        overwrite=args.overwrite, eval_images=args.eval_images, progress=progress,
        **common, **options)
    if args.json:
        _print_json(summary.to_dict())
        return 0
    print(report.table())
    if summary.budget:
        _print_budget(summary)
    print(f"test top-1 {summary.top1_before:.4f} trained, {summary.top1_after:.4f} converted "
          f"(no gradient step; {summary.conversion_s:.1f} s to convert, "
          f"{summary.wall_s:.1f} s in all)")
    if summary.out:
        print(f"wrote {summary.out} (deeproots train --init {summary.out} to fine-tune it)")
    return 0


_STARTED = [time.perf_counter()]  # the command's start (main sets it): progress lines' clock


def _say(text: str) -> None:
    """A progress line of a long conversion, with the seconds since the command started."""
    print(f"... {time.perf_counter() - _STARTED[0]:6.1f} s  {text}", file=sys.stderr,
          flush=True)


def _print_budget(summary) -> None:
    """A budgeted conversion's schedule (reusable as --groups) and its predicted and
    measured costs side by side."""
    kind, fraction = summary.budget["kind"], summary.budget["fraction"]
    groups = " ".join(f"{k}={v}" for k, v in summary.groups.items() if v > 1) or "(none)"
    again = ",".join(f"{k}={v}" for k, v in summary.groups.items() if v > 1)
    print(f"budget {kind} {fraction:g}: groups {groups}"
          + (f" (again: --schedule {again})" if again else ""))
    rows = []
    for key, label in (("macs_fraction", "multiply-adds"), ("params_fraction", "params"),
                       ("latency_fraction", "time")):
        if key in summary.measured or key in summary.predicted:
            pred, meas = summary.predicted.get(key), summary.measured.get(key)
            rows.append((label, "" if pred is None else f"{pred:.3f}",
                         "" if meas is None else f"{meas:.3f}"))
    if "ms" in summary.measured:
        rows.append(("ms per batch", "", f"{summary.measured['ms']:.2f} (dense "
                                         f"{summary.measured['ms_dense']:.2f})"))
    from .text import format_table

    print(format_table(("of the dense model's", "predicted", "measured"), rows, align="lrr"))
    if len(summary.candidates) > 1:
        print("converted and measured on the selection images, the more accurate kept:")
        print(format_table(
            ("candidate", "groups", "time", "top-1 predicted", "top-1 measured"),
            [(c["kind"], " ".join(f"{k}={v}" for k, v in c["groups"].items()) or "(none)",
              f"{c['latency_fraction']:.3f}" if "latency_fraction" in c else "",
              f"{c['predicted_top1']:.4f}", f"{c['select_top1']:.4f}")
             for c in summary.candidates], align="llrrr"))
    from .conversion.checkpoint import LATENCY_TOLERANCE
    from .speed.timing import contention_note

    loaded = contention_note(summary.measured.get("others"), "the schedules")
    if loaded:
        print(loaded)
    measured = summary.measured.get("latency_fraction")
    if kind == "latency" and measured is not None and measured > fraction * (
            1 + LATENCY_TOLERANCE):
        print(f"budget missed: the fastest schedule tried measured {measured:.3f} of the "
              f"dense model's time, above {fraction:g} (+{100 * LATENCY_TOLERANCE:g}%); "
              f"measure again on a quieter machine, or ask for a larger fraction")


def _rootify_sensitivity(args, common, options, progress) -> int:
    from .conversion.checkpoint import price_checkpoint

    for flag, value in (("--out", args.out), ("--latency", args.latency)):
        if value is not None:
            raise DeeprootsError(f"{flag}: --sensitivity prices each layer and converts "
                                 f"nothing; leave it out")
    if args.plot is not None:
        from .outputs import check_new_plot

        check_new_plot(args.plot, "--plot", overwrite=args.overwrite)
    prices = price_checkpoint(args.model, progress=progress, ignore=options["ignore"],
                              stem=options["stem"], **common)
    if args.plot is not None:
        from .plots import plot_sensitivity

        plot_sensitivity(prices, args.plot)
    if args.json:
        _print_json(prices.to_dict())
        return 0
    print(prices.table())  # (its last line: how long the pricing took)
    if args.plot:
        print(f"drew {args.plot}")
    return 0


def _rootify_frontier(args, common, options, progress) -> int:
    from .conversion.frontier import FRONTIER_BUDGETS, frontier

    if args.out is None:
        raise DeeprootsError("--frontier writes a folder (frontier.md, .json, .png): give "
                             "--out DIR")
    for flag, value in (("--macs", args.macs), ("--params", args.params)):
        if value is not None:
            raise DeeprootsError(f"{flag}: --frontier converts at latency budgets; leave it out")
    options = {k: v for k, v in options.items() if k not in ("macs", "params")}
    result = frontier(args.model, out=args.out, budgets=args.frontier or FRONTIER_BUDGETS,
                      finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                      finetune_opt=args.finetune_opt,
                      overwrite=args.overwrite, progress=progress, **common, **options)
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(result.table())
    print(f"wrote {result.out}/: frontier.md, frontier.json, frontier.png "
          f"({result.seconds:.0f} s)")
    return 0


def cmd_study(args) -> int:
    from .training.study import STUDY_SETTINGS, run_study, study_report

    if args.report:
        if args.family:
            raise DeeprootsError(f"--report rebuilds the study in {args.report}; name no family "
                                 f"(got {args.family})")
        report = study_report(args.report)
    else:
        if not args.family:
            raise DeeprootsError("name a model family to study (e.g. nin), or --report DIR")
        given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if hasattr(args, f.name) and f.name not in STUDY_SETTINGS}
        from .training.loop import Interrupted

        try:
            report = run_study(args.family, seeds=args.seeds, variants=args.variants,
                               out=getattr(args, "out", None),
                               progress=not args.no_progress and None, **given)
        except Interrupted as stop:
            print(f"{stop}. Run the same command again to continue the study",
                  file=sys.stderr)
            return 128 + stop.signum
    print(report.table())
    if report.missing:
        print(f"not finished: {', '.join(report.missing)} (deeproots study {report.family} "
              f"--out {report.out} --seeds {report.seeds} trains them)")
    if report.corrupt:
        print(f"summary unreadable, run again by the study: {', '.join(report.corrupt)}")
    for line in report.foreign:
        print(f"not this study's run, left out: {line}")
    if report.held:
        print(f"trained by another process, skipped here: {', '.join(report.held)}")
    print(f"wrote {report.out}/: study.md, study.csv, study.json, accuracy.png")
    return 0


def cmd_roofline(args) -> int:
    from .speed.roofline import HARDWARE, format_roofline, measure_cpu, roofline

    hardware = measure_cpu() if args.device == "cpu" else HARDWARE[args.device]
    results = [roofline(m, hardware=hardware, dtype=args.dtype, batch_size=args.batch_size,
                        input_size=args.input_size, peak_tflops=args.peak_tflops,
                        bandwidth_tbs=args.bandwidth_tbs)
               for m in _models_or_checkpoints(args.models, "roofline", args.input_size)]
    if args.measure:
        _measure_roofline(args, results)
    if args.json:
        _print_json([r.to_dict() for r in results])
        return 0
    for r in results:
        print(format_roofline(r, per_layer=args.per_layer) + "\n")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            macs = sum(x.macs for x in base.layers) / max(1, sum(x.macs for x in r.layers))
            print(f"{r.model} over {base.model}: at best {base.unfused_s / r.unfused_s:.2f}x "
                  f"unfused, {base.fused_s / r.fused_s:.2f}x fused (multiply-adds alone: "
                  f"{macs:.2f}x)")
    return 0


def _measure_roofline(args, results) -> None:
    """Each layer's measured time (eager, per-layer hooks) beside its bound."""
    import torch

    from .speed.bench import layer_times
    from .inspection.costs import parse_input_size
    from .models.registry import build_model
    from .runtime import resolve_device

    device = resolve_device("cuda" if args.device != "cpu" else "cpu")
    for r in results:
        torch.manual_seed(0)
        model = build_model(r.model).eval().to(device)
        x = torch.randn(args.batch_size, *parse_input_size(args.input_size, model),
                        device=device)
        times = {row["layer"]: row["ms"] / 1000 for row in
                 layer_times(model, x, "eager", dtype=args.dtype, repeats=3).layers}
        for layer in r.layers:
            layer.measured_s = times.get(layer.layer)


def cmd_export(args) -> int:
    import torch

    from .inspection.costs import parse_input_size
    from .speed.export import export
    from .outputs import check_new_file

    if not args.checkpoint:
        from .models.registry import check_model_spec

        if _names_a_checkpoint(args.model, "export"):
            args.checkpoint = args.model  # a checkpoint as the model: as eval and rootify take it
        else:
            check_model_spec(args.model)  # a typo in the name first, as every command does
    check_new_file(args.out, overwrite=args.overwrite)
    if args.checkpoint:
        _no_model_options(args, "export --checkpoint")
        from .models.registry import is_user_model

        model = _as_backbone(_trained_model(args.checkpoint, args.model
                                            if is_user_model(args.model) else None,
                                            args.input_size), args, args.checkpoint)
    else:
        model = _build(args)
    size = parse_input_size(args.input_size, model)
    notes = export(model.eval(), torch.randn(args.batch_size, *size), args.out, args.format,
                   overwrite=args.overwrite)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out} ({args.format}, batch norm folded, input {size}, batch size "
          f"dynamic)")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser


def _checkpoint_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The options of the commands that read a checkpoint (eval, analyze)."""
    p.add_argument("checkpoint")
    p.add_argument("--data", help=DATA_HELP + " (default: the one it was trained on)")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--batch-size", type=_whole("--batch-size"), default=batch_size)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=_whole("--workers", 0), default=4,
                   help="image-folder decoding processes (default 4; at most the CPUs "
                        "this process may use)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--model", metavar="FILE.py:FUNCTION",
                   help="for a checkpoint of a model of your own: the function that "
                        "builds it (deeproots never runs code named in a checkpoint)")
    _normalisation_options(p, "")


def _normalisation_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """--mean and --std (timm's names and 0..1 scale): how an image folder's images are
    normalised for a trained model, where its checkpoint does not say (a state_dict)."""
    for flag, what in (("--mean", "mean"), ("--std", "standard deviation")):
        p.add_argument(flag, type=_number, nargs="+", metavar="V",
                       help=f"{prefix}with --data imagefolder:DIR: the {what} its images are "
                            f"normalised with, per channel on the 0..1 scale (as timm takes "
                            f"it; default: what the model was trained with, else ImageNet's)")


def _parser_list(sub) -> None:
    """``deeproots list``."""
    p = sub.add_parser("list", help="list model names")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'nin*'")
    p.add_argument("-v", "--verbose", action="store_true", help="with family, costs, table")
    p.set_defaults(func=cmd_list)


def _parser_profile(sub) -> None:
    """``deeproots profile``."""
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


def _parser_table(sub) -> None:
    """``deeproots table``."""
    p = sub.add_parser("table", help="the paper's cost tables beside ours")
    p.add_argument("table", nargs="?", choices=list(PAPER_TABLES),
                   help="which table (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_table)


def _allocator_option(p) -> None:
    """``--allocator``: the heavy commands re-run themselves under jemalloc where it is
    installed, else tell glibc's malloc to keep freed memory (a conversion of nin: 35 s ->
    23 s on the 2-core CPU; docs/speed.md)."""
    p.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                   help="auto: jemalloc where installed (apt-get install libjemalloc2), else "
                        "glibc's malloc keeping freed memory; system: as the process started")


def _parser_train(sub) -> None:
    """``deeproots train``."""
    p = sub.add_parser("train", help="train a model on real data")
    _add_config_options(p, TrainConfig)
    _allocator_option(p)
    p.set_defaults(func=cmd_train)


def _parser_eval(sub) -> None:
    """``deeproots eval``."""
    p = sub.add_parser("eval", help="top-1, top-5 and loss of a checkpoint on a test split")
    _checkpoint_options(p, 256)
    p.add_argument("--limit-eval-batches", type=_whole("--limit-eval-batches"))
    p.add_argument("--json", action="store_true", help="print JSON (top1, top5, loss, n)")
    _allocator_option(p)
    p.set_defaults(func=cmd_eval)


def _parser_analyze(sub) -> None:
    """``deeproots analyze``."""
    p = sub.add_parser("analyze", help="covariance, correlation and filters of a checkpoint")
    _checkpoint_options(p, 100)
    p.add_argument("--out", required=True, help="folder for figures, analysis.json, report.md")
    p.add_argument("--max-batches", type=_whole("--max-batches"),
                   help="default: the whole test split")
    p.add_argument("--eps", type=_number, default=1e-5, help="ZCA whitening epsilon (>= 0)")
    p.add_argument("--blocks", type=_whole("--blocks"), default=4,
                   help="blocks to score ungrouped layers on (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an analysis already in --out")
    p.set_defaults(func=cmd_analyze)


def _parser_plot_costs(sub) -> None:
    """``deeproots plot-costs``."""
    p = sub.add_parser("plot-costs", help="per-layer costs of two models (Figure 15)")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--input-size", type=_input_size, default=None)
    p.add_argument("--out", required=True, help="the figure: a .png, .svg or .pdf file")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_plot_costs)


def _parser_plot_results(sub) -> None:
    """``deeproots plot-results``."""
    p = sub.add_parser("plot-results", help="accuracy vs costs from summary.json files "
                       "(Figures 5, 8, 9)")
    p.add_argument("summaries", nargs="+", help="summary.json files of training runs")
    p.add_argument("--out", required=True, help="the figure: a .png, .svg or .pdf file")
    p.add_argument("--curves", action="store_true", help="the runs' training curves side by "
                   "side instead (loss and learning rate against steps, test top-1 at each "
                   "epoch), from the metrics.jsonl beside each summary.json")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_plot_results)


def _parser_bench(sub) -> None:
    """``deeproots bench``."""
    p = sub.add_parser("bench", help="time models side by side (ms per image)")
    p.add_argument("models", nargs="*")
    p.add_argument("--batch-size", type=_whole("--batch-size"), default=None,
                   help="default 128 (--paper: the table's own, 16 at 224x224)")
    p.add_argument("--paper", choices=TIMED_TABLES,
                   help="time every variant of that table of the paper and show its CPU and "
                        "GPU speedups beside ours")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_whole("--threads"), help="CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--path", nargs="+", default=["fold"], choices=PATHS,
                   help="inference engines to time (default fold: BN folded, channels-last; "
                        "script: TorchScript, deprecated by PyTorch; aoti: an AOTInductor "
                        "package, the C++ of export --format aoti; triton, dispatch, fused, "
                        f"cudagraph: deeproots' Triton kernels on CUDA, {UNVERIFIED})")
    p.add_argument("--mode", nargs="+", default=["inference"], choices=MODES,
                   help="train: one step of deeproots train's recipe (bf16 autocast on CUDA)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   metavar="MODE", help="train mode: torch.compile the step, as train "
                   "--compile (default; reduce-overhead: CUDA graphs; max-autotune)")
    p.add_argument("--grouped-conv", choices=GROUPED_CONV, default="native",
                   help="train mode: how grouped convs run, as train --grouped-conv "
                        f"(default native; triton and dispatch: {UNVERIFIED})")
    p.add_argument("--detail", action="store_true", help="train mode: also time the "
                   "forward, backward and optimizer parts of a step")
    p.add_argument("--memory-format", nargs="+", choices=MEMORY_FORMATS, default=["auto"],
                   help="train mode: the step's layout, as train --memory-format; several "
                        "are timed side by side (default auto: channels-last)")
    p.add_argument("--repeats", type=_whole("--repeats"), default=10)
    p.add_argument("--warmup", type=_whole("--warmup", 0), default=3)
    p.add_argument("--input-size", type=_input_size, default=None)
    _allocator_option(p)
    p.add_argument("--layers", action="store_true",
                   help=f"per-layer times instead (paths {', '.join(LAYER_PATHS)})")
    p.add_argument("--plot", metavar="FILE", help="with --layers: a bar chart of where the "
                   "time goes, by kind of layer (.png, .svg or .pdf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def _parser_study(sub) -> None:
    """``deeproots study``."""
    p = sub.add_parser("study", help="the paper's accuracy study: every variant x seeds, "
                       "compared with orig")
    p.add_argument("family", nargs="?", help="nin, resnet50, googlenet, ...")
    p.add_argument("--variants", nargs="+", metavar="V",
                   help="root, tree, col and/or variant names (default: all; orig always)")
    p.add_argument("--seeds", type=_whole("--seeds"), default=3, help="seeds per variant")
    p.add_argument("--report", metavar="DIR", help="rebuild the report of the study in DIR "
                   "from its finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_options(p, TrainConfig, skip=("model", "seed", "resume", "overwrite", "change",
                                              "progress"))
    p.set_defaults(func=cmd_study)


def _parser_roofline(sub) -> None:
    """``deeproots roofline``."""
    p = sub.add_parser("roofline", help="the fastest each layer can run on a GPU or CPU: "
                       "max(FLOPs / peak, bytes / bandwidth)")
    p.add_argument("models", nargs="+", help="model names or FILE.py:FUNCTION; the first is "
                                             "the baseline of the speedups")
    p.add_argument("--device", choices=ROOFLINE_DEVICES, default="h100",
                   help="data-sheet roofs of the GPU, or this CPU measured (default h100)")
    p.add_argument("--peak-tflops", type=_number, help="override the peak TFLOP/s")
    p.add_argument("--bandwidth-tbs", type=_number, help="override the bandwidth in TB/s")
    p.add_argument("--dtype", choices=ROOFLINE_DTYPES, default="bfloat16")
    p.add_argument("--batch-size", type=_whole("--batch-size"), default=256)
    p.add_argument("--input-size", type=_input_size, default=None)
    p.add_argument("--per-layer", action="store_true", help="one row per layer")
    p.add_argument("--measure", action="store_true", help="time each layer here (eager; the "
                   "GPU for h100/h200/a100) and show the fraction of its bound it reaches")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_roofline)


def _parser_rootify(sub) -> None:
    """``deeproots rootify``."""
    p = sub.add_parser("rootify", help="make any CNN a root network: groups per layer and "
                       "costs before and after")
    p.add_argument("model", help="model name, FILE.py:FUNCTION (a function of yours that "
                                 "returns the model), or a checkpoint of a trained model "
                                 "(RUN/best.pt): converted with calibration, keeping its "
                                 "accuracy")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--schedule", help="root-N, tree-N or col-N, e.g. root-8; or groups per "
                     "layer, e.g. conv2a=4,conv3a=2 (as a budget prints them)")
    how.add_argument("--macs", type=_number, help="budget: at most this fraction of the "
                     "multiply-adds, e.g. 0.5 (a model name: the smallest root-N; a "
                     "checkpoint: the per-layer schedule of least predicted accuracy cost)")
    how.add_argument("--params", type=_number, help="budget: the same for parameters")
    how.add_argument("--latency", type=_number, help="with a checkpoint, budget: the converted "
                     "model's time at most this fraction of the dense model's, measured on "
                     "--device at --batch-size, e.g. 0.7")
    how.add_argument("--sensitivity", action="store_true", help="with a checkpoint: each "
                     "layer's price at each group count (top-1 cost, MACs, params and "
                     "measured time saved); --plot FILE.png draws it")
    how.add_argument("--frontier", type=_number, nargs="*", metavar="F", help="with a "
                     "checkpoint: convert at these latency budgets (default 0.9 0.8 0.7 0.6 "
                     "0.5) and to every root-N, measure and evaluate each; --out DIR gets "
                     "frontier.md, .json and .png")
    p.add_argument("--input-size", type=_input_size, default=None,
                   help="C,H,W of the example input (default: the model's)")
    p.add_argument("--ignore", nargs="+", action="extend", default=[], metavar="LAYER",
                   help="layers (or patterns) to leave as they are")
    p.add_argument("--regroup", action="store_true",
                   help="also regroup convs that are already grouped")
    p.add_argument("--stem", choices=STEMS, default="input",
                   help="the stem, left dense: the convs that read the input (input, the "
                        "paper's rule) or every conv at the first conv's resolution "
                        "(resolution: a deep stem; the levels count from the blocks)")
    p.add_argument("--allow-depthwise", action="store_true",
                   help="let the rounding to a divisor of the channels make a conv "
                        "depthwise (default: the largest count below that)")
    p.add_argument("--data", help="with a checkpoint: calibration images from this data's "
                   "training split, evaluation on its test split (default: the one it was "
                   "trained on)")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--calibration-images", type=_whole("--calibration-images"),
                   help="with a checkpoint: how many training images to calibrate on "
                        "(default 1000)")
    p.add_argument("--out", help="with a checkpoint: write the converted model here (a "
                   "checkpoint for eval, export and train --init)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--model", dest="from_model", metavar="FILE.py:FUNCTION",
                   help="for a checkpoint of a model of your own: the function that builds it")
    p.add_argument("--batchnorm", choices=BATCHNORMS, default=None,
                   help="with a checkpoint: keep the trained batch-norm statistics (default: "
                        "the refit makes each layer compute what it did) or reestimate them "
                        "on the calibration images")
    p.add_argument("--eval-images", type=_count_or_all("--eval-images"), default=1000,
                   metavar="N|all", help="with a checkpoint: test images each stage is "
                   "evaluated on (default 1000; the converted model: always the whole split)")
    p.add_argument("--device", default="cpu", help="with a checkpoint: where to time and "
                   "convert (cpu, cuda, cuda:N)")
    p.add_argument("--batch-size", type=_whole("--batch-size"), default=128,
                   help="with a checkpoint: the batch its time is measured at (default 128)")
    p.add_argument("--image-size", type=_whole("--image-size", 8), default=None,
                   help="with a checkpoint: the images' size (default: the size its images "
                        "were trained at; 224 for a state_dict's)")
    _normalisation_options(p, "with a checkpoint and ")
    p.add_argument("--finetune-steps", type=_whole("--finetune-steps"), default=0,
                   help="with --frontier: fine-tune each point this many steps, distilled "
                        "from the dense model")
    p.add_argument("--finetune-opt", choices=OPTIMIZERS, default=None,
                   help=f"with --finetune-steps: the optimizer (default {FINETUNE_OPT}, as "
                        "train --init's)")
    p.add_argument("--finetune-lr", type=_number, default=None,
                   help="with --finetune-steps: the learning rate (default: train --init's "
                        f"for the optimizer, {per_optimizer(FINETUNE_LR)})")
    p.add_argument("--plot", help="with --sensitivity: draw each layer's price to this file "
                   "(.png, .svg or .pdf)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--json", action="store_true", help="print JSON")
    _allocator_option(p)
    p.set_defaults(func=cmd_rootify)


def _parser_export(sub) -> None:
    """``deeproots export``."""
    p = sub.add_parser("export", help="write a model for deployment: torch.export (.pt2), "
                       "an AOTInductor package, ONNX, or TorchScript (deprecated)")
    p.add_argument("model", help="model name, FILE.py:FUNCTION, or a checkpoint file "
                                 "(RUN/best.pt: the model it trained, as --checkpoint does; "
                                 "with --checkpoint: any name for a registered model)")
    p.add_argument("--checkpoint", help="export the trained weights of this checkpoint")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="pt2: torch.export's ExportedProgram (torch.export.load); aoti: an "
                        "AOTInductor package, C++ that runs without Python (needs a C++ "
                        "compiler; torch._inductor.aoti_load_package); onnx: the dynamo "
                        "exporter where onnxscript is installed, else the legacy one; "
                        "torchscript: deprecated by PyTorch 2.13, kept while PyTorch keeps it")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--batch-size", type=_whole("--batch-size"), default=1)
    p.add_argument("--input-size", type=_input_size, default=None)
    _add_model_options(p)
    p.set_defaults(func=cmd_export)


# each command's parser, in the order --help lists them; a command is one function here and
# one handler cmd_NAME above
COMMAND_PARSERS = (_parser_list, _parser_profile, _parser_table, _parser_train, _parser_eval,
                   _parser_analyze, _parser_plot_costs, _parser_plot_results, _parser_bench,
                   _parser_study, _parser_roofline, _parser_rootify, _parser_export)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deeproots`` command (imports no torch)."""
    parser = _Parser(prog="deeproots", description="Deep Roots (Ioannou et al., CVPR 2017): "
                     "root networks and their costs.")
    parser.add_argument("--version", action="version", version=f"deeproots {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for add in COMMAND_PARSERS:
        add(sub)
    parser.commands = sub.choices  # each command's own parser, by name: it says its errors
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    _STARTED[0] = time.perf_counter()
    parser = build_parser()
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # `deeproots` alone: the commands, not argparse's "required: COMMAND"
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: "deeproots CMD: error: ...", as the rest
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        # Only a command typed at the shell is re-run with another allocator; a program
        # calling main() keeps its own process (and sets LD_PRELOAD itself if it wants).
        if from_command_line and getattr(args, "allocator", None) is not None:
            from .runtime import use_fast_allocator

            use_fast_allocator(argv, args.allocator, getattr(args, "path", None) or ())
        return args.func(args) or 0
    except BrokenPipeError:  # `deeproots ... | head` closed the pipe: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except DeeprootsError as err:  # bad input: DataError, CheckpointError, GroupsError, ...
        print(f"deeproots {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine said no (a full disk, a folder not writable)
        if err.errno is None:
            raise
        print(f"deeproots {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:  # a command returns its status: this came from a user's code
        print(f"deeproots {args.command}: error: the model's own code called "
              f"sys.exit({stop.code!r}) while deeproots ran it; a model must return its "
              f"outputs (guard a script's exit with if __name__ == '__main__':)",
              file=sys.stderr)
        return 2
    except Exception:  # a defect in deeproots: keep the traceback, ask for a report
        import traceback

        traceback.print_exc()
        print(f"deeproots {args.command}: internal error (the traceback above is a bug in "
              f"deeproots {__version__}, not in your input); please report it with the "
              f"command you ran", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
