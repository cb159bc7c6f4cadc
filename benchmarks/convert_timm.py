"""A timm CNN trained on Fashion-MNIST by deeproots' recipe, then converted in Python by
``deeproots.convert_model`` as a user holding the module would: to root-N with the channel
permutations folded through timm's ``BatchNormAct2d`` (a batch norm that applies its
activation in its own forward, kept whole in the trace since 2026-12-06) and with that side
kept in its order (as before), and to the most accurate schedule within a latency budget
measured on this machine; each converted model evaluated on the whole test split.

    python benchmarks/convert_timm.py --model cs3darknet_s --epochs 5 --out runs/timm

timm is not a dependency of deeproots: run this where it is installed (a side venv with
torch 2.14.1, torchvision 0.29.1 and timm, deeproots installed there with ``pip install
--no-deps -e .``; docs/conversion.md). The dense model is trained once into ``--out`` and
reused by a second run.
"""
import argparse
import contextlib
from pathlib import Path
from unittest import mock

import torch

from deeproots import convert_model
from deeproots.config import TrainConfig
from deeproots.errors import DeeprootsError
from deeproots.conversion.calibrate import sites
from deeproots.conversion.checkpoint import measure_latencies
from deeproots.text import format_table
from deeproots.training.checkpoint import load_checkpoint
from deeproots.training.data import build_loaders, sample_split
from deeproots.training.loop import train


def _kept_in_order():
    """The trace as it was before 2026-12-06: torch.fx goes into a batch norm subclass."""
    return mock.patch.object(sites, "norm_leaves", lambda model: lambda m: False)


def _row(how, report, summary, dense_top1, time):
    cal = report.calibration
    permuted = sum(1 for c in cal.layers if c.permuted_in or c.permuted_out)
    return [how, f"{permuted}/{len(cal.layers)}", f"{report.macs_fraction:.3f}",
            f"{time:.3f}", f"{summary.top1_after:.4f}",
            f"{100 * (summary.top1_after - dense_top1):+.2f}", f"{summary.conversion_s:.0f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cs3darknet_s", help="a timm model name")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--schedule", default="root-8")
    parser.add_argument("--latency", type=float, default=0.7)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/timm"))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print each conversion's progress lines")
    args = parser.parse_args()
    import timm

    def build():
        return timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=10)

    run = args.out / args.model
    if not (run / "best.pt").exists():
        train(TrainConfig(model=args.model, data="fashion-mnist", data_dir=args.data_dir,
                          epochs=args.epochs, out=str(run), overwrite=run.exists()),
              model=build())
    model = build()
    model.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    model.eval()
    train_split, test_split, spec = build_loaders("fashion-mnist", data_dir=args.data_dir,
                                                  batch_size=256, image_size=28, workers=0)
    (fit, _), select = sample_split(train_split, spec, [1000, 1000])
    test = list(test_split.batches())  # read before, at each stage and after
    say = print if args.verbose else None
    done, rows, dense_top1, groups = {}, [], None, "(none)"
    for how, kwargs, context in (
            (f"{args.schedule}, permutations folded through BatchNormAct2d",
             {"schedule": args.schedule}, None),
            (f"{args.schedule}, BatchNormAct2d traced into (orders kept, as before)",
             {"schedule": args.schedule}, _kept_in_order),
            (f"latency {args.latency:g}: the most accurate schedule within it",
             {"latency": args.latency, "select": select}, None)):
        try:
            with context() if context is not None else contextlib.nullcontext():
                new, report, summary = convert_model(model, calibration=fit, test=test,
                                                     name=args.model, progress=say, **kwargs)
        except DeeprootsError as err:  # a budget no schedule meets: the row says so
            rows.append((how, f"refused: {err}", *[""] * 5))
            continue
        dense_top1 = summary.top1_before
        done[how] = (new, report, summary)
        if "latency" in kwargs:
            groups = " ".join(f"{k}={v}" for k, v in summary.groups.items() if v > 1)
    # every converted model timed beside the dense one in one session (the budget's search
    # timed its candidates in sessions of its own)
    times = measure_latencies(model, {how: new for how, (new, _, _) in done.items()},
                              (1, 28, 28), 128, "cpu")
    rows = [_row(how, report, summary, dense_top1, times[how]["latency_fraction"])
            for how, (_, report, summary) in done.items()] + rows
    epochs = load_checkpoint(run / "best.pt")["epoch"]  # epochs done at its best
    print(f"timm {args.model} trained {epochs} epochs on Fashion-MNIST (top-1 {dense_top1:.4f}), "
          f"converted by deeproots.convert_model on 1,000 calibration images; top-1 on the "
          f"whole test split, no gradient step (torch {torch.__version__}, timm "
          f"{timm.__version__}, {torch.get_num_threads()} threads)")
    print(format_table(("conversion", "permuted", "MACs", "time (batch 128)", "top-1",
                        "vs dense (pts)",
                        "convert s"), rows, align="lrrrrrr"))
    print(f"the latency budget's schedule: {groups}")


if __name__ == "__main__":
    main()
