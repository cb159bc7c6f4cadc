"""Issue 30's targets, measured: a trained CNN converted to the most accurate root network
that a latency budget allows, against the uniform root-N schedules; how conversion time
grows with depth; and the distilled fine-tune's gap to the dense model. On real
Fashion-MNIST, on this machine's CPU; every figure of docs/conversion.md's "Budgets"
section is printed by one of these parts.

    python benchmarks/conversion_search.py frontier --out runs/search    # nin, resnet50
    python benchmarks/conversion_search.py walltime --out runs/search    # + a ResNet-18
    python benchmarks/conversion_search.py finetune --out runs/search    # nin root-8
    python benchmarks/conversion_search.py features --out runs/search    # feature distillation
    python benchmarks/conversion_search.py finetune --out runs/search3 --nin-epochs 3  # longer
    python benchmarks/conversion_search.py frontier --out runs/search5 --models resnet50 \
        --resnet50-epochs 5                                              # a resnet50 trained longer
    python benchmarks/conversion_search.py finetune --out runs/search10 --nin-epochs 10 \
        --scratch                                     # + root-8 trained from scratch as long
    python benchmarks/conversion_search.py exhaustive --models nin   # every schedule of nin

Dense models are trained by the project's own recipe (``deeproots train MODEL --epochs 1``,
or ``--nin-epochs`` / ``--resnet50-epochs`` epochs;
the ResNet-18, defined below, for ``--resnet18-steps`` steps), or reused from ``--out``
(``--checkpoint nin=PATH`` takes a finished run's). The conversions run one at a time: do
not time anything else on the machine meanwhile.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deeproots.runtime import ALLOCATORS

HERE = os.path.abspath(__file__)
ALLOCATOR = ["auto"]  # --allocator: this script's and each deeproots command's
BUDGETS = (0.8, 0.7, 0.6)


# --- the ResNet-18 at 28x28 px: torchvision's layout, one input channel -------------------
class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 (7x7 stride-2 stem, max pool, basic blocks [2, 2, 2, 2] of
    64 to 512 channels) for ``in_channels``-channel images: 20 convs, 11.2 M parameters."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(_Basic(cin, w, 1 if i == 0 else 2), _Basic(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes=10, in_channels=1):
    return ResNet18(num_classes, in_channels)


# --- dense models ---------------------------------------------------------------------------
def _dense(name: str, out: Path, given: dict, steps: int, epochs: int = 1) -> Path:
    """The dense checkpoint of ``name``: given, finished earlier in ``out``, or trained
    (``epochs`` epochs)."""
    if name in given:
        return Path(given[name])
    from deeproots.config import TrainConfig
    from deeproots.training.loop import train

    run = out / f"{name}-dense"
    if not (run / "summary.json").exists():
        model = f"{HERE}:resnet18" if name == "resnet18" else name
        cfg = TrainConfig(model=model, data="fashion-mnist", device="cpu", epochs=epochs,
                          progress=False, out=str(run),
                          limit_train_batches=steps if name == "resnet18" else None)
        cfg.resume = (run / "last.pt").exists()
        cfg.overwrite = run.exists() and not cfg.resume
        train(cfg)
    return run / "best.pt"


def _epochs(args, name: str) -> int:
    """The epochs ``name``'s dense model is trained for here (``--nin-epochs``,
    ``--resnet50-epochs``; 1 for the others)."""
    return getattr(args, f"{name}_epochs", 1)


def _user(name: str) -> dict:
    return {"model": f"{HERE}:resnet18"} if name == "resnet18" else {}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# --- part 1: the searched schedules against the uniform ones --------------------------------
def part_frontier(args, given) -> None:
    from deeproots.conversion.frontier import Frontier, frontier

    say = (lambda text: print("...", text, file=sys.stderr, flush=True))
    for name in args.models:
        ckpt = _dense(name, args.out, given, args.resnet18_steps, _epochs(args, name))
        folder = args.out / f"{name}-frontier"
        if (folder / "frontier.json").exists():
            result = Frontier.from_dict(json.loads((folder / "frontier.json").read_text()))
        else:
            result = frontier(ckpt, out=folder, budgets=BUDGETS, batch_size=args.batch_size,
                              progress=say, **_user(name))
        print(f"\n## {name}: {len(result.points)} conversions in {result.seconds:.0f} s "
              f"({_machine()})\n")
        print(result.table())
        print()
        _targets(result)


def _targets(result) -> None:
    """Issue 30's targets for one model: at each budget the searched schedule's top-1
    against the best uniform root-N within the same measured time, its measured time
    against the budget, and the predicted time against the measured."""
    from deeproots.text import format_table

    head = ["budget", "searched groups", "measured", "within 5%", "predicted",
            "pred. error", "top-1", "best root-N within (+5%)", "its top-1", "gain (pts)"]
    rows, gains = [], []
    for p in result.points:
        if p.kind != "searched":
            continue
        rival = result.best_uniform(p.budget)  # within the same 5% as the search
        gain = 100 * (p.top1 - rival.top1) if rival else None
        gains.append(gain)
        err = (p.predicted_latency / p.latency_fraction - 1) if p.predicted_latency else None
        rows.append([f"{p.budget:g}", _groups(p.groups), f"{p.latency_fraction:.3f}",
                     "yes" if p.latency_fraction <= p.budget * 1.05 else "NO",
                     f"{p.predicted_latency:.3f}" if p.predicted_latency else "",
                     f"{100 * err:+.1f}%" if err is not None else "",
                     f"{p.top1:.4f}", rival.label if rival else "none",
                     f"{rival.top1:.4f}" if rival else "",
                     f"{gain:+.2f}" if gain is not None else "(no rival)"])
    for b, why in result.unreachable.items():
        rows.append([b, "not reached", "", "", "", "", "", "", "", why[:60]])
    print(format_table(head, rows, align="llrlrrrlrr"))
    known = [g for g in gains if g is not None]
    print(f"searched >= best uniform at every budget with a uniform rival: "
          f"{'yes' if known and all(g >= 0 for g in known) else 'NO'}; "
          f">= +0.5 points at one budget or more: "
          f"{'yes' if any(g >= 0.5 for g in known) else 'NO'}; budgets no uniform schedule "
          f"meets: {sum(g is None for g in gains)}")


def _groups(groups: dict) -> str:
    """Groups per layer, shortest form: a layer list for the few, counts for the many."""
    if len(groups) <= 4:
        return " ".join(f"{k}={v}" for k, v in groups.items()) or "(dense)"
    counts = {}
    for v in groups.values():
        counts[v] = counts.get(v, 0) + 1
    return f"{len(groups)} layers: " + ", ".join(f"{n}x{g}" for g, n in sorted(counts.items()))


# --- part 2: wall time against depth --------------------------------------------------------
def _cli(*argv) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "deeproots", *argv, "--allocator",
                           ALLOCATOR[0]], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"deeproots {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def _grouped(path: Path, name: str) -> int:
    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(path), path, _user(name).get("model"))
    return sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def part_walltime(args, given) -> None:
    from deeproots.text import format_table

    rows = []
    for name in args.depth_models:
        ckpt = _dense(name, args.out, given, args.resnet18_steps, _epochs(args, name))
        target = args.out / f"{name}-root-8.pt"
        user = ["--model", _user(name)["model"]] if name == "resnet18" else []
        wall = _cli("rootify", str(ckpt), "--schedule", "root-8", "--out", str(target),
                    "--overwrite", *user)
        n = _grouped(target, name)
        rows.append([name, str(n), f"{wall:.0f}", f"{wall / max(n, 1):.1f}"])
        print(f"... {name}: {wall:.0f} s", file=sys.stderr, flush=True)
    print(f"\n## deeproots rootify CHECKPOINT --schedule root-8, whole command "
          f"({_machine()})\n")
    print(format_table(["model", "grouped convs", "wall s", "s per grouped conv"], rows,
                       align="lrrr"))
    extra = []
    if "resnet50" in args.models:
        ckpt = _dense("resnet50", args.out, given, 0, args.resnet50_epochs)
        wall = _cli("rootify", str(ckpt), "--sensitivity", "--json")
        extra.append(["resnet50 --sensitivity (whole command)", f"{wall:.0f}", "300"])
    ckpt = _dense("nin", args.out, given, 0, args.nin_epochs)
    wall = _cli("rootify", str(ckpt), "--latency", "0.7", "--out",
                str(args.out / "nin-latency-0.7.pt"), "--overwrite")
    extra.append(["nin --latency 0.7 (whole command)", f"{wall:.0f}", "120"])
    print()
    print(format_table(["command", "wall s", "target s"], extra, align="lrr"))


PER_EPOCH = -(-60000 // 128)  # Fashion-MNIST's training batches of 128


# --- part 3: the distilled fine-tune --------------------------------------------------------
def _nin_root_8(args, given):
    """The fine-tunes' start: the dense nin checkpoint, its test top-1, nin converted to
    root-8 with calibration (made once in ``--out``), and ``--fraction`` (a tenth) of the
    dense model's steps (its epochs of 469 batches of 128: ``--nin-epochs``)."""
    from deeproots.conversion.checkpoint import convert_checkpoint

    ckpt = _dense("nin", args.out, given, 0, args.nin_epochs)
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    top, epochs = summary["top1"], summary["epochs"]
    converted = args.out / "nin-root-8.pt"
    if not converted.exists():
        convert_checkpoint(ckpt, "root-8", out=converted)
    return ckpt, top, converted, max(1, int(epochs * PER_EPOCH * args.fraction + 1e-6))


def part_finetune(args, given) -> None:
    from deeproots.config import TrainConfig
    from deeproots.text import format_table
    from deeproots.training.loop import train

    ckpt, top, converted, steps = _nin_root_8(args, given)
    epochs = -(-steps // PER_EPOCH)  # more than an epoch's steps: whole epochs of them
    per_epoch = -(-steps // epochs)
    steps = epochs * per_epoch
    rows = []
    for variant in args.variants:
        numbers = variant.split(",")
        opt = numbers.pop() if len(numbers) == 5 else "sgd"
        lr, weight, temperature, warmup = (float(v) for v in numbers)
        run = args.out / (f"finetune-{variant.replace(',', '-')}"
                          + (f"-x{args.fraction:g}" if args.fraction != 0.1 else ""))
        summary = run / "summary.json"
        if not summary.exists():
            cfg = TrainConfig(init=str(converted), distill=str(ckpt), opt=opt, lr=lr,
                              distill_weight=weight, distill_temperature=temperature,
                              warmup_epochs=warmup, limit_train_batches=per_epoch,
                              epochs=epochs,
                              data="fashion-mnist", device="cpu", progress=False,
                              out=str(run), overwrite=run.exists())
            train(cfg)
        got = json.loads(summary.read_text())["top1"]
        rows.append([opt, f"{lr:g}", f"{weight:g}", f"{temperature:g}", f"{warmup:g}",
                     f"{got:.4f}", f"{100 * (got - top):+.2f}"])
    print(f"\n## nin root-8, calibrated, then a distilled fine-tune of {steps} steps "
          f"(dense top-1 {top:.4f}; {_machine()})\n")
    print(format_table(["optimizer", "lr", "distill weight", "temperature", "warm-up (epochs)",
                        "top-1", "vs dense (pts)"], rows, align="lrrrrrr"))
    if args.scratch or "nin-root-8" in given:
        # the same recipe as the dense nin (its epochs, all its steps), on root-8 itself
        scratch = _dense("nin-root-8", args.out, given, 0, args.nin_epochs)
        got = json.loads((scratch.parent / "summary.json").read_text())
        print(f"\nnin-root-8 trained from scratch by the dense nin's recipe, {got['epochs']} "
              f"epochs ({got['epochs'] * PER_EPOCH} steps): top-1 {got['top1']:.4f} "
              f"({100 * (got['top1'] - top):+.2f} points vs dense)")


# name: (train which parameters, batch norm statistics, feature weight, at which convs)
FEATURE_VARIANTS = {
    "logits only (as deeproots train --distill)": ("all", "update", 0.0, "every"),
    "+ features at every conv": ("all", "update", 1.0, "every"),
    "+ features at the convs in the dense order": ("all", "update", 1.0, "aligned"),
    "+ features at the convs in the dense order, x10": ("all", "update", 10.0, "aligned"),
    "+ features, batch norm statistics frozen": ("all", "frozen", 1.0, "every"),
    "+ features, 1x1 convs and batch norm only": ("1x1", "frozen", 1.0, "every"),
}
ALIGNED = 0.5  # a conv's output within this relative squared error of the dense one's: aligned


def _feature_finetune(converted: Path, ckpt: Path, steps: int, lr: float, which: str,
                      stats: str, beta: float, where: str = "every", weight: float = 0.5,
                      temperature: float = 4.0) -> float:
    """A distilled fine-tune written out here for what ``deeproots train`` does not do:
    the student's conv outputs matched to the dense model's (each squared error over the
    dense output's energy, averaged over the convs; FitNets-style feature distillation),
    batch norm statistics frozen, or only the 1x1 convs and batch norms trained. ``where``:
    at every conv, or (``"aligned"``) at those whose output channels are in the dense
    model's order, unchanged or refit to it, within :data:`ALIGNED` of it on the first batch
    (a conversion permutes the outputs of each grouped conv and of the layer feeding it: a
    feature term there pulls them towards the dense order, which the next layer does not
    read them in). SGD with momentum 0.9, weight decay 5e-4, cosine from ``lr``;
    the training split's first ``steps`` batches of 128 in the order of deeproots' first
    epoch. Returns the test top-1."""
    from torch.nn import functional as F

    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint
    from deeproots.training.data import build_loaders
    from deeproots.training.evaluate import evaluate
    from deeproots.training.objectives import distillation_loss

    torch.manual_seed(0)
    student = model_from_checkpoint(load_checkpoint(converted), converted)
    teacher = model_from_checkpoint(load_checkpoint(ckpt), ckpt).eval()
    train_loader, test_loader, _ = build_loaders("fashion-mnist", batch_size=128, workers=0)
    convs = [n for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    seen = {"student": {}, "teacher": {}}

    def keep(store, name):
        def hook(module, args, out):
            store[name] = out
        return hook

    handles = []
    for who, model in (("student", student), ("teacher", teacher)):
        modules = dict(model.named_modules())
        handles += [modules[n].register_forward_hook(keep(seen[who], n)) for n in convs]

    def trained(name, module):
        if which == "all":
            return True
        return isinstance(module, nn.BatchNorm2d) or (isinstance(module, nn.Conv2d)
                                                       and module.kernel_size == (1, 1))

    params = [p for n, m in student.named_modules() if trained(n, m)
              for p in m.parameters(recurse=False)]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    student.train()
    if stats == "frozen":
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    train_loader.set_epoch(0)
    for step, (x, y) in enumerate(train_loader.batches()):
        if step == steps:
            break
        with torch.no_grad():
            soft = teacher(x)
        logits = student(x)
        loss = ((1 - weight) * F.cross_entropy(logits, y)
                + weight * distillation_loss(logits, soft, temperature))
        if beta:
            s, t = seen["student"], seen["teacher"]
            if step == 0:
                convs = [n for n in convs if where == "every" or (
                    s[n].shape == t[n].shape and float(((s[n].detach() - t[n]) ** 2).mean()
                                                       / (t[n] ** 2).mean()) < ALIGNED)]
                print(f"... feature term at {', '.join(convs)}", file=sys.stderr, flush=True)
            loss = loss + beta * sum(((s[n] - t[n]) ** 2).mean() / (t[n] ** 2).mean()
                                     for n in convs) / len(convs)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    for h in handles:
        h.remove()
    return evaluate(student.eval(), test_loader).top1


def part_features(args, given) -> None:
    from deeproots.text import format_table

    ckpt, top, converted, steps = _nin_root_8(args, given)
    if steps > PER_EPOCH:
        sys.exit(f"features: the fine-tunes written out here run one epoch at most ({PER_EPOCH} "
                 f"steps); --fraction {args.fraction:g} asks for {steps}")
    rows = []
    for name, (which, stats, beta, where) in FEATURE_VARIANTS.items():
        if args.feature_variants and name not in args.feature_variants:
            continue
        for lr in args.feature_lrs:
            got = _feature_finetune(converted, ckpt, steps, lr, which, stats, beta, where)
            rows.append([name, f"{lr:g}", f"{got:.4f}", f"{100 * (got - top):+.2f}"])
            print("...", rows[-1], file=sys.stderr, flush=True)
    print(f"\n## nin root-8, calibrated, then {steps} steps of distillation written out in "
          f"this script (dense top-1 {top:.4f}; {_machine()})\n")
    print(format_table(["fine-tune", "lr", "top-1", "vs dense (pts)"], rows, align="lrrr"))


# --- part 5: every schedule, where there are few ------------------------------------------
def part_exhaustive(args, given) -> None:
    """Every schedule of a model's grouped layers (each at 1 or at a count it is priced at),
    converted with calibration, no gradient step, and timed side by side with the dense
    model in one session: at each budget the most accurate schedule of all against the
    best uniform one, the most any search could gain there."""
    from deeproots.conversion.frontier import Frontier
    from deeproots.runtime import write_json

    for name in args.models:
        ckpt = _dense(name, args.out, given, args.resnet18_steps, _epochs(args, name))
        record = args.out / f"{name}-exhaustive.json"
        if record.exists():
            raw = json.loads(record.read_text())
            held = raw.pop("checkpoint", None)
            if held not in (None, str(ckpt)):
                sys.exit(f"exhaustive: {record} holds the schedules of {held}, not of {ckpt}; "
                         f"give another --out")
            result = Frontier.from_dict(raw)
        else:
            result = _every_schedule(name, ckpt, args)
            write_json(record, {"checkpoint": str(ckpt), **result.to_dict()})
        _exhaustive_report(name, result, args.out / f"{name}-exhaustive.png")


def _every_schedule(name: str, ckpt: Path, args):
    from itertools import product

    from deeproots.conversion.checkpoint import (SELECT_IMAGES, convert_checkpoint,
                                                 measure_latencies, open_source)
    from deeproots.conversion.frontier import Frontier, Point
    from deeproots.conversion.rule import groupable, rootify
    from deeproots.conversion.sensitivity import ROOT_COUNTS, group_counts

    started = time.perf_counter()
    source = open_source(ckpt, select_images=SELECT_IMAGES, **_user(name))
    _, sites = groupable(source.trained, source.cal.fit[:1])
    uniform = {}
    for n in ROOT_COUNTS:  # which schedule each root-N is (the rule alone: no calibration)
        _, report = rootify(source.trained, f"root-{n}", example_input=source.cal.fit[:1])
        uniform.setdefault(tuple(sorted(report.groups.items())), f"root-{n}")
    schedules = [tuple(sorted((s.name, g) for s, g in zip(sites, combo) if g > 1))
                 for combo in product(*[[1] + group_counts(s) for s in sites])]
    # every root-N too, where the rule rounds one to a count that is not priced (nin's
    # root-64: conv2a at 48 groups)
    schedules = [k for k in dict.fromkeys(schedules + list(uniform)) if k]
    if len(schedules) > args.max_schedules:
        sys.exit(f"exhaustive: {name} has {len(schedules)} schedules ({len(sites)} grouped "
                 f"layers); at most --max-schedules {args.max_schedules} are converted")
    say = (lambda text: print("...", text, file=sys.stderr, flush=True))
    common = dict(source=source, stages=False, batch_size=args.batch_size, **_user(name))
    points, models = [], []
    for i, key in enumerate(schedules):
        new, _, s = convert_checkpoint(ckpt, dict(key), **common)
        label = uniform.get(key, _groups(dict(key)))
        say(f"{i + 1}/{len(schedules)} {label}: {s.top1_after:.4f}")
        points.append(Point(label, "uniform" if key in uniform else "other", dict(s.groups),
                            s.top1_after, 0.0, 0.0, 0.0, s.measured["macs_fraction"],
                            s.measured["params_fraction"]))
        models.append(new)
    say("every schedule timed side by side with the dense model")
    timed = measure_latencies(source.trained, {str(i): m for i, m in enumerate(models)},
                              source.cal.fit[:1].shape[1:], args.batch_size, "cpu")
    for i, p in enumerate(points):
        t = timed[str(i)]
        p.ms, p.ms_dense, p.latency_fraction = t["ms"], t["ms_dense"], t["latency_fraction"]
    return Frontier(source.name, source.cal.data, "cpu", args.batch_size, source.top1_before,
                    points=points, seconds=time.perf_counter() - started,
                    others=next(iter(timed.values())).get("others"))


def _pareto(points) -> list:
    """The Pareto front of ``points``: fastest first, each more accurate than every point
    measured faster."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: p.latency_fraction):
        if p.top1 > best:
            front.append(p)
            best = p.top1
    return front


def _best_within(result, budget: float, tolerance: float):
    """The most accurate of all ``result``'s points, and the most accurate uniform one, whose
    measured time is within ``budget`` (``tolerance`` over it allowed, for both), the
    faster of two as accurate; None where there is none."""
    top = max((p for p in sorted(result.points, key=lambda p: p.latency_fraction)
               if p.latency_fraction <= budget * (1 + tolerance)),
              key=lambda p: p.top1, default=None)
    return top, result.best_uniform(budget, tolerance)


def _exhaustive_report(name: str, result, plot: Path) -> None:
    from deeproots.conversion.checkpoint import LATENCY_TOLERANCE
    from deeproots.speed.timing import contention_note
    from deeproots.text import format_table

    points, front = result.points, _pareto(result.points)
    print(f"\n## {name}: all {len(points)} schedules, calibrated, no gradient step, "
          f"in {result.seconds:.0f} s ({_machine()})\n")
    print(f"dense top-1 {result.top1_dense:.4f}; time in the fold path, batch "
          f"{result.batch_size}, as a fraction of the dense model's measured beside it; "
          f"the Pareto front (no faster schedule is as accurate):\n")
    print(format_table(["schedule", "uniform", "latency (measured)", "MACs", "top-1",
                        "vs dense"],
                       [[_groups(p.groups), p.label if p.kind == "uniform" else "",
                         f"{p.latency_fraction:.3f}", f"{p.macs_fraction:.3f}",
                         f"{p.top1:.4f}", f"{100 * (p.top1 - result.top1_dense):+.2f}"]
                        for p in front], align="llrrrr"))
    rows = []
    for b in BUDGETS:
        # the rule (measured time within 5% over the budget, for both), and the
        # budget itself (at most it, for both)
        for rule, tolerance in (("within 5%", LATENCY_TOLERANCE), ("at most", 0.0)):
            top, rival = _best_within(result, b, tolerance)
            rows.append([f"{b:g}", rule, _groups(top.groups) if top else "none",
                         f"{top.latency_fraction:.3f}" if top else "",
                         f"{top.top1:.4f}" if top else "",
                         f"{rival.label} ({rival.latency_fraction:.3f})" if rival else "none",
                         f"{rival.top1:.4f}" if rival else "",
                         f"{100 * (top.top1 - rival.top1):+.2f}" if top and rival else ""])
    print("\nAt each budget, the measured time within 5% over it (the issue's rule) or at most "
          "it: the most accurate schedule of all, against the best uniform one\n")
    print(format_table(["budget", "time", "best schedule", "measured", "top-1",
                        "best root-N (measured)", "its top-1", "the most a search gains (pts)"],
                       rows, align="lllrrlrr"))
    if result.others is not None:
        print(f"other processes held {100 * result.others:.1f}% of the CPUs while the "
              f"schedules were timed")
    note = contention_note(result.others, "the schedules")
    if note:
        print(note)
    _plot_exhaustive(name, result, front, plot)
    print(f"\nplot: {plot}")


def _plot_exhaustive(name: str, result, front, path: Path) -> None:
    import matplotlib

    from deeproots.conversion.checkpoint import LATENCY_TOLERANCE
    from deeproots.runtime import atomic_write

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    other = [p for p in result.points if p.kind != "uniform"]
    ax.plot([p.latency_fraction for p in other], [p.top1 for p in other], ".", color="0.55",
            label="every other schedule")
    ax.plot([p.latency_fraction for p in front], [p.top1 for p in front], "-", color="C0",
            lw=1, label="Pareto front")
    for p in result.points:
        if p.kind == "uniform":
            ax.plot(p.latency_fraction, p.top1, "s", color="C1")
            ax.annotate(p.label, (p.latency_fraction, p.top1), fontsize=7, xytext=(4, -9),
                        textcoords="offset points")
    for b in BUDGETS:
        ax.axvspan(b, b * (1 + LATENCY_TOLERANCE), color="C2", alpha=0.12)
        ax.axvline(b, color="C2", lw=0.8)
    ax.axhline(result.top1_dense, color="k", lw=0.8, label="dense")
    ax.plot([], [], "s", color="C1", label="uniform root-N")
    low = min(p.top1 for p in result.points)
    ax.set_ylim(max(low, result.top1_dense - 0.06), result.top1_dense + 0.005)
    ax.set(xlabel="measured time (fraction of dense; budgets and their 5% shaded)",
           ylabel="test top-1, no gradient step",
           title=f"{name} on {result.data}: every schedule, batch {result.batch_size} on "
                 f"{result.device}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["frontier", "walltime", "finetune", "features", "exhaustive",
                                    "all"])
    p.add_argument("--out", type=Path, default=Path("runs/search"))
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a dense model's finished checkpoint (nin, resnet50, resnet18)")
    p.add_argument("--models", nargs="+", default=["nin", "resnet50"])
    p.add_argument("--depth-models", nargs="+", default=["nin", "resnet18", "resnet50"])
    p.add_argument("--resnet18-steps", type=int, default=100)
    p.add_argument("--nin-epochs", type=int, default=1, help="the dense nin's epochs, where "
                   "it is trained here (the fine-tunes take a tenth of its steps)")
    p.add_argument("--resnet50-epochs", type=int, default=1, help="the dense resnet50's "
                   "epochs, where it is trained here")
    p.add_argument("--fraction", type=float, default=0.1, help="the fine-tunes' steps, as a "
                   "fraction of the dense nin's (issue 30's target: a tenth)")
    p.add_argument("--scratch", action="store_true", help="finetune: also nin-root-8 "
                   "trained from scratch by the dense nin's recipe, all its epochs (or "
                   "--checkpoint nin-root-8=PATH), printed under the fine-tunes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-schedules", type=int, default=64, help="exhaustive: a model with "
                   "more schedules than this is refused (nin has 42)")
    p.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                   help="this script's and each deeproots command's (as deeproots --allocator; "
                        "glibc: a machine without jemalloc)")
    p.add_argument("--variants", nargs="+", metavar="LR,WEIGHT,T,WARMUP[,OPT]",
                   default=["0.01,0.5,4,0.005", "0.0003,0.5,4,0.005,adamw", "0.003,0.5,4,0",
                            "0.01,0.9,4,0", "0.003,1,1,0", "0.001,0.9,4,0", "0.03,0.9,4,0.005"],
                   help="fine-tunes to try: lr, distillation weight and temperature, warm-up, "
                        "and the optimizer (sgd, the default, or adamw)")
    p.add_argument("--feature-lrs", type=float, nargs="+", default=[0.01])
    p.add_argument("--feature-variants", nargs="+", choices=list(FEATURE_VARIANTS),
                   metavar="NAME", help="of the feature part's variants, these alone "
                   "(default: all)")
    args = p.parse_args()
    from deeproots.runtime import allocator, use_fast_allocator

    ALLOCATOR[0] = args.allocator
    use_fast_allocator(sys.argv[1:], args.allocator, script=HERE)  # as the commands run
    print(f"allocator: {allocator()} (each deeproots command: --allocator {args.allocator})",
          file=sys.stderr, flush=True)
    given = dict(c.split("=", 1) for c in args.checkpoint)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    parts = ["frontier", "walltime", "finetune", "features"]
    for part in (parts if args.part == "all" else [args.part]):
        globals()[f"part_{part}"](args, given)


if __name__ == "__main__":
    sys.exit(main())
