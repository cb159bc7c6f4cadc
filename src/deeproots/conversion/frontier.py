"""Accuracy against measured time in one command: ``deeproots rootify CHECKPOINT --frontier``
converts a trained model at several latency budgets (the searched, per-layer schedules of
:mod:`.search`) and to every uniform root-N schedule, each with calibration and no gradient
step, times them all side by side with the dense model in one session on the device (the
figures every point is compared by), evaluates each on the whole test split, and
(``finetune_steps``) fine-tunes each with distillation from the dense model.

    result = frontier("runs/nin/best.pt", out="runs/nin-frontier")
    print(result.table())          # one row a point: schedule, time, MACs, top-1
    result.best_uniform(0.7)       # the best root-N whose measured time is within 0.7

The folder ``out`` holds ``frontier.json``, ``frontier.md`` and ``frontier.png`` (top-1
against measured time and against multiply-adds), and with a fine-tune each point's
converted checkpoint and run (``points/``).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from torch import nn

from ..checks import check_choice
from ..config import OPTIMIZERS, finetune_optimizer
from ..errors import DeeprootsError
from ..outputs import check_new_folder
from ..runtime import write_json, write_text
from ..speed.timing import contention_note
from ..text import format_table
from .checkpoint import (LATENCY_TOLERANCE, SELECT_IMAGES, Source, check_device,
                         convert_checkpoint, measure_latencies, measure_latency, model_source,
                         open_source)
from .search import check_fraction
from .sensitivity import ROOT_COUNTS, Sensitivity, layer_prices

__all__ = ["Point", "Frontier", "frontier", "reselect", "FRONTIER_BUDGETS", "FRONTIER_FILES"]

FRONTIER_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)  # latency, a fraction of the dense model's
FRONTIER_FILES = ("frontier.json", "frontier.md", "frontier.png")


@dataclass
class Point:
    """One converted model of the frontier: how it was chosen (``kind``: ``searched`` at a
    latency ``budget``, or ``uniform``, a root-N schedule), its groups per layer, its test
    top-1 with no gradient step (and after the fine-tune, where one ran), and its measured
    and predicted costs as fractions of the dense model's."""

    label: str
    kind: str
    groups: Dict[str, int]
    top1: float
    latency_fraction: float
    ms: float
    ms_dense: float
    macs_fraction: float
    params_fraction: float
    budget: Optional[float] = None
    predicted_latency: Optional[float] = None
    top1_finetuned: Optional[float] = None
    chosen: Optional[str] = None  # a searched point: which candidate won, searched or uniform
    # ("final session": a root-N the search had timed over the budget, within it in the
    # session every figure of the table comes from, and more accurate: :func:`reselect`)


@dataclass
class Frontier:
    """The dense model (its top-1, ms per batch on ``device`` at ``batch_size``), the
    points, the budgets no schedule reached (and why), and the seconds it all took."""

    model: str
    data: str
    device: str
    batch_size: int
    top1_dense: float
    points: List[Point] = field(default_factory=list)
    unreachable: Dict[str, str] = field(default_factory=dict)
    finetune_steps: int = 0
    seconds: float = 0.0
    out: Optional[str] = None
    others: Optional[float] = None  # other processes' share of the CPUs in the timing session

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Frontier":
        """The frontier :meth:`to_dict` (``frontier.json``) wrote."""
        return cls(**{**raw, "points": [Point(**p) for p in raw.get("points", [])]})

    def best_uniform(self, fraction: float, tolerance: float = LATENCY_TOLERANCE
                     ) -> Optional[Point]:
        """The uniform point of highest top-1 whose measured time is within ``fraction`` of
        the dense model's (``tolerance`` over it allowed, as the search allows itself), or
        None."""
        within = [p for p in self.points if p.kind == "uniform"
                  and p.latency_fraction <= fraction * (1 + tolerance)]
        return max(within, key=lambda p: p.top1, default=None)

    def table(self) -> str:
        """One row a point, the searched ones first; beside each searched point the best
        uniform one within the same measured time."""
        head = ["schedule", "latency (measured)", "predicted", "MACs", "params", "top-1",
                "vs dense", "best root-N within (+5%)", "its top-1"]
        if self.finetune_steps:
            head.append(f"top-1 after {self.finetune_steps} steps")
        rows = []
        for p in self.points:
            rival = self.best_uniform(p.budget) if p.kind == "searched" else None
            label = p.label + {"uniform": " (its root-N won)",
                               "final session": " (a root-N within it here)"}.get(p.chosen, "")
            row = [label, f"{p.latency_fraction:.3f}",
                   f"{p.predicted_latency:.3f}" if p.predicted_latency is not None else "",
                   f"{p.macs_fraction:.3f}", f"{p.params_fraction:.3f}", f"{p.top1:.4f}",
                   f"{100 * (p.top1 - self.top1_dense):+.2f}",
                   rival.label if rival else ("none" if p.kind == "searched" else ""),
                   f"{rival.top1:.4f}" if rival else ""]
            if self.finetune_steps:
                row.append(f"{p.top1_finetuned:.4f}" if p.top1_finetuned is not None else "")
            rows.append(row)
        lines = [f"{self.model} on {self.data}: dense top-1 {self.top1_dense:.4f}; time in "
                 f"the fold path, batch {self.batch_size} on {self.device}, as a fraction "
                 f"of the dense model's measured beside it",
                 format_table(head, rows, align="l" + "r" * (len(head) - 1))]
        lines += [f"latency {k}: not reached ({v})" for k, v in self.unreachable.items()]
        lines += filter(None, [contention_note(self.others, "the points")])
        return "\n".join(lines)


def frontier(checkpoint: Union[str, Path, nn.Module], *, out: Union[str, Path],
             budgets: Sequence[float] = FRONTIER_BUDGETS,
             uniform: Sequence[int] = ROOT_COUNTS, data: Optional[str] = None,
             data_dir=None, model=None, device: str = "cpu", batch_size: int = 128,
             calibration_images_n: Optional[int] = None, image_size: Optional[int] = None,
             mean=None, std=None,
             finetune_steps: int = 0, finetune_lr: Optional[float] = None,
             finetune_opt: Optional[str] = None, overwrite: bool = False,
             download: bool = True, prices: Optional[Sensitivity] = None,
             progress=None, calibration=None, select=None, test=None,
             **rootify_options) -> Frontier:
    """The frontier of ``checkpoint``'s trained model (see the module's text), written to the
    folder ``out``. ``budgets``: latency fractions to search at; ``uniform``: the root-N
    counts; ``finetune_steps``: a distilled fine-tune of each point (a deeproots checkpoint:
    the teacher is the dense model) by ``finetune_opt`` at ``finetune_lr`` (default: those of
    ``deeproots train --init``, :data:`~deeproots.config.FINETUNE_OPT` at its
    :data:`~deeproots.config.FINETUNE_LR`).

    ``checkpoint`` may be a trained module in memory instead (timm's, yours; not changed), with
    its images given as :func:`~deeproots.conversion.checkpoint.convert_model` takes them:
    ``calibration``, labelled ``select`` images (each budget's candidates are compared on
    them) and labelled ``test`` images (each point's top-1)."""
    started = time.perf_counter()
    finetune_opt, finetune_lr = finetune_optimizer(finetune_opt, finetune_lr)
    check_choice("finetune_opt", finetune_opt, OPTIMIZERS)
    for b in budgets:
        check_fraction("a frontier's latency budget", b)
    budgets = list(dict.fromkeys(budgets))  # a budget asked twice is converted once
    check_device(device, "--frontier")
    folder = check_new_folder(out, FRONTIER_FILES + ("points",), overwrite=overwrite)
    say = progress or (lambda text: None)
    if isinstance(checkpoint, nn.Module):
        missing = [k for k, v in (("calibration", calibration), ("select", select),
                                  ("test", test)) if v is None]
        if missing:
            raise DeeprootsError(f"a frontier of a model in memory needs its images: give "
                                 f"{', '.join(missing)} (as convert_model takes them)")
        if finetune_steps:
            raise DeeprootsError("finetune_steps distils from a deeproots checkpoint of the "
                                 "dense model on its data; for a model in memory, convert "
                                 "each point (convert_model) and fine-tune it yourself")
        source = model_source(checkpoint, calibration, select=select, test=test)
    else:
        source = open_source(checkpoint, model=model, data=data, data_dir=data_dir,
                             image_size=image_size, calibration_images_n=calibration_images_n,
                             mean=mean, std=std,
                             select_images=SELECT_IMAGES)
    if finetune_steps and not source.fields.get("config"):
        raise DeeprootsError(f"--finetune-steps distils from the dense model's deeproots "
                             f"checkpoint; {checkpoint} holds weights only: convert it, then "
                             f"deeproots train --init FILE.pt")
    if prices is None:
        say("pricing each layer")
        prices = layer_prices(source.trained, source.cal.fit, source.cal.select,
                              batch_size=batch_size, device=device, name=source.name,
                              progress=progress, ignore=rootify_options.get("ignore", ()),
                              stem=rootify_options.get("stem", "input"))
    result = Frontier(source.name, source.cal.data, device, batch_size, source.top1_before,
                      finetune_steps=finetune_steps, out=str(folder))
    common = dict(source=source, stages=False, device=device, batch_size=batch_size,
                  **rootify_options)
    seen = []
    for b in budgets:
        say(f"latency {b:g}")
        try:
            new, _, s = convert_checkpoint(checkpoint, latency=b, prices=prices, **common)
        except DeeprootsError as err:
            if "no schedule brings" not in str(err):
                raise
            result.unreachable[f"{b:g}"] = str(err).split(": ", 1)[-1]
            continue
        result.points.append(_point(f"latency {b:g}", "searched", s, s.measured, b))
        seen.append((new, s.groups))
    for n in uniform:
        say(f"root-{n}")
        new, _, s = convert_checkpoint(checkpoint, f"root-{n}", **common)
        if any(q.kind == "uniform" and q.groups == s.groups for q in result.points):
            continue  # root-N rounded to the schedule of a smaller N
        timed = measure_latency(source.trained, new, source.cal.fit[:1].shape[1:],
                                batch_size, device)
        result.points.append(_point(f"root-{n}", "uniform", s, timed))
        seen.append((new, s.groups))
    if len(seen) > 1:  # one session for all: two sessions differ by 5-10% on a shared CPU
        say("every point timed again, side by side with the dense model")
        timed = measure_latencies(source.trained, {str(i): m for i, (m, _) in enumerate(seen)},
                                  source.cal.fit[:1].shape[1:], batch_size, device)
        for i, p in enumerate(result.points):
            t = timed[str(i)]
            p.ms, p.ms_dense, p.latency_fraction = t["ms"], t["ms_dense"], t["latency_fraction"]
        result.others = next(iter(timed.values())).get("others")
        reselect(result, seen, prices)
    if finetune_steps:
        _finetune(result, source, [m for m, _ in seen], folder, finetune_steps, finetune_opt,
                  finetune_lr, device, data_dir, say)
    result.seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "frontier.json", result.to_dict())
    write_text(folder / "frontier.md", result.table() + "\n")
    from ..plots import plot_frontier

    plot_frontier(result, folder / "frontier.png")
    return result


def reselect(result: Frontier, seen: list, prices: Sensitivity) -> None:
    """Each searched point that a uniform one beats within its budget in the final session
    (every point timed side by side: the figures the table compares by) becomes that
    uniform schedule: the search times its candidates in sessions of its own, and on a
    shared CPU a root-N it measured over the budget can measure within it here (the
    ten-epoch nin at 0.6: root-4 over 0.63 to the search, 0.578 here, 1.34 points more accurate
    than the root-16 it returned). Uniform schedules are among a search's candidates, so
    the budget's answer is the best measured within it. ``seen``: the points' models, in
    the same order (swapped alike)."""
    from .search import predict

    for i, p in enumerate(result.points):
        if p.kind != "searched" or p.budget is None:
            continue
        rival = result.best_uniform(p.budget)
        if rival is None or rival.top1 <= p.top1:
            continue
        j = result.points.index(rival)
        result.points[i] = replace(
            rival, label=p.label, kind="searched", budget=p.budget, chosen="final session",
            predicted_latency=predict(prices, rival.groups).get("latency_fraction"))
        seen[i] = seen[j]


def _point(label: str, kind: str, s, timed: dict, budget: Optional[float] = None) -> Point:
    won = [c["kind"] for c in s.candidates if c.get("chosen")]
    return Point(label, kind, dict(s.groups), s.top1_after, timed["latency_fraction"],
                 timed["ms"], timed["ms_dense"], s.measured["macs_fraction"],
                 s.measured["params_fraction"], budget,
                 s.predicted.get("latency_fraction") if s.predicted else None,
                 chosen=won[0] if won else None)


def _finetune(result: Frontier, source: Source, models, folder: Path, steps: int, opt: str,
              lr: float, device: str, data_dir, say) -> None:
    """Each point's model written as a checkpoint and fine-tuned, with distillation from
    the dense checkpoint, for ``steps`` steps by ``opt`` at ``lr`` (one epoch cut to ``steps``
    batches: the fine-tune of ``deeproots train --init FILE.pt --distill CHECKPOINT``)."""
    from ..config import TrainConfig
    from ..training.checkpoint import save_model
    from ..training.loop import train

    config = source.fields.get("config", {})
    for point, new in zip(result.points, models):
        say(f"fine-tuning {point.label}")
        name = point.label.replace(" ", "-")
        init = folder / "points" / f"{name}.pt"
        init.parent.mkdir(parents=True, exist_ok=True)
        save_model(init, new, source.fields, converted={"groups": point.groups})
        cfg = TrainConfig(init=str(init), distill=source.checkpoint, opt=opt, lr=lr, epochs=1,
                          limit_train_batches=steps, data=source.cal.data,
                          data_dir=data_dir or config.get("data_dir"),
                          image_size=config.get("image_size", 224),
                          batch_size=config.get("batch_size", 128), seed=config.get("seed", 0),
                          device=device, out=str(folder / "points" / name), overwrite=True,
                          progress=False, workers=0)
        with contextlib.redirect_stdout(sys.stderr):  # the run's epoch line: not the result
            point.top1_finetuned = train(cfg).top1
