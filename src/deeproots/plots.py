"""Every figure deeproots draws, each written atomically (PNG, or SVG or PDF by its path's
suffix): training curves, the paper's cost, accuracy and covariance figures, and where the
time of a forward pass goes.
Functions take data (histories, matrices, results) and a path; the numbers behind them come
from :mod:`~deeproots.inspection.costs`, :mod:`~deeproots.inspection.covariance`, :mod:`~deeproots.speed.bench` and
:mod:`~deeproots.training.loop`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .errors import DeeprootsError
from .inspection.costs import profile
from .models.registry import build_model, is_model, model_entry
from .outputs import check_new_plot, plot_format
from .runtime import atomic_write, check_output_file

__all__ = ["plot_training_curves", "plot_run_curves", "plot_covariance_pair",
           "plot_matrix_grid", "plot_filters",
           "plot_costs", "plot_layer_times", "plot_results", "summarize_runs",
           "plot_accuracy_vs_cost"]


def __getattr__(name: str):
    # read_records is the run folder's (deeproots.training.folder), re-exported here; read
    # when asked for, since importing deeproots.training draws on this module (its curves)
    if name == "read_records":
        from .training.folder import read_records

        return read_records
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plt():
    # matplotlib is heavy: loaded when the first figure is drawn, not when deeproots starts
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write ``fig`` at ``path`` in the format its suffix names (PNG, SVG or PDF),
    atomically (a crash leaves the old file or the new one)."""
    path = check_output_file(path)
    try:
        fmt = plot_format(path, "a figure's path")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100))
    finally:
        _plt().close(fig)
    return path


def plot_training_curves(history: Sequence[dict], path: Path, title: str,
                         steps: Sequence[dict] = ()) -> Path:
    """A run's ``curves.png``: the training loss and the learning rate against steps (the
    step records; the epochs' train loss where there are none), and test top-1 (with train
    top-1) at each epoch's last step."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    at = [h.get("step", h["epoch"]) for h in history]
    unit = "step" if all("step" in h for h in history) else "epoch"
    if steps:
        ax1.plot([s["step"] for s in steps], [s["train_loss"] for s in steps], "-",
                 label="train (every step record)", lw=1)
    else:
        ax1.plot(at, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(at, [h["test_loss"] for h in history], "s", label="test, each epoch")
    ax1.set(xlabel=unit, ylabel="cross-entropy loss", title=f"{title}: loss")
    lr_ax = ax1.twinx()
    lr_points = [s for s in (steps or history) if "lr" in s]
    lr_ax.plot([s.get("step", s["epoch"]) for s in lr_points], [s["lr"] for s in lr_points],
               "--", color="gray", lw=0.8, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax2.plot(at, [h["train_top1"] for h in history], "o-", label="train top-1")
    ax2.plot(at, [h["test_top1"] for h in history], "s-", label="test top-1")
    ax2.set(xlabel=unit, ylabel="accuracy", title=f"{title}: accuracy at each epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    lines = ax1.get_legend_handles_labels()
    more = lr_ax.get_legend_handles_labels()
    ax1.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_run_curves(summaries: Sequence[Path], path: Path, *, overwrite: bool = False) -> Path:
    """Several runs side by side (``deeproots plot-results --curves``): each run's training
    loss and learning rate against steps, and its test top-1 at each epoch, read from the
    ``metrics.jsonl`` beside each ``summary.json``."""
    from .training.folder import find_summaries, read_records, read_summary  # (training
    # imports this module)

    path = check_new_plot(path, "--out", overwrite=overwrite)
    runs = []
    for s in find_summaries(summaries):
        s = Path(s)
        if not s.is_file():
            raise DeeprootsError(f"{s} is not a deeproots summary.json (no such file)")
        records = read_records(s.parent / "metrics.jsonl")
        label = read_summary(s, ("model",))["model"]
        runs.append((f"{label} ({s.parent.name})", records))
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (label, records) in enumerate(runs):
        steps = [r for r in records if r.get("kind") == "step"]
        epochs = [r for r in records if r.get("kind", "epoch") == "epoch"]
        points = steps or epochs
        x = [r.get("step", r.get("epoch")) for r in points]
        axes[0].plot(x, [r["train_loss"] for r in points], "-", lw=1, color=f"C{i}",
                     label=label)
        axes[1].plot(x, [r["lr"] for r in points], "-", lw=1, color=f"C{i}", label=label)
        axes[2].plot([r.get("step", r["epoch"]) for r in epochs],
                     [r["test_top1"] for r in epochs], "o-", color=f"C{i}", label=label)
    for ax, what in zip(axes, ("training loss", "learning rate", "test top-1")):
        ax.set(xlabel="step", ylabel=what, title=what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_covariance_pair(raw: torch.Tensor, white: torch.Tensor, a: str, b: str,
                         path: Path, scores: Tuple[float, float]) -> Path:
    """|covariance| of a layer pair, raw and whitened, side by side (Figures 6, 10, 12)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, m, title, s in zip(axes, (raw, white), ("raw", "ZCA-whitened"), scores):
        ax.imshow(m.abs().numpy(), cmap="inferno", interpolation="nearest", aspect="auto")
        ax.set_title(f"|cov| {title}, block score {s:.2f}")
        ax.set_xlabel(f"{b} filters")
        ax.set_ylabel(f"{a} filters")
    fig.suptitle(f"inter-layer covariance {a} -> {b}")
    fig.tight_layout()
    return _save(fig, path)


def plot_matrix_grid(matrices: Dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """Absolute values of several matrices in a grid (Figures 11 and 13)."""
    plt = _plt()
    n = len(matrices)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, matrices.items()):
        ax.imshow(m.abs().numpy(), cmap="inferno", interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_filters(name: str, w: torch.Tensor, groups: int, path: Path) -> Path:
    """First-layer filters ``w`` [n, C, k, k] of layer ``name``, one row per filter group of
    the next grouped layer (Figure 14; :func:`deeproots.inspection.covariance.first_layer_filters` gives
    the three arguments)."""
    plt = _plt()
    n = w.shape[0]
    rows = groups if groups > 1 else math.ceil(math.sqrt(n))
    cols = math.ceil(n / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.5 + 1, rows * 0.5 + 1),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        f = w[i]
        f = (f - f.min()) / (f.max() - f.min() + 1e-12)
        img = f.permute(1, 2, 0).numpy() if f.shape[0] == 3 else f.mean(0).numpy()
        axes.flat[i].imshow(img, cmap=None if f.shape[0] == 3 else "gray",
                            interpolation="nearest")
    how = f"rows = the {groups} filter groups of the next grouped layer" if groups > 1 else ""
    fig.suptitle(f"{name} filters {how}", fontsize=9)
    return _save(fig, path)


def plot_costs(model_a, model_b, path: Path, input_size=None, *,
               overwrite: bool = False) -> Path:
    """Per-layer multiply-adds and parameters of two models side by side (Figure 15): each a
    model name, ``FILE.py:FUNCTION`` or a module. An existing ``path`` is replaced only with
    ``overwrite`` (a run's own file never)."""
    path = check_new_plot(path, "--out", overwrite=overwrite)
    plt = _plt()
    costs = []
    for model in (model_a, model_b):
        if isinstance(model, str):
            with torch.device("meta"):
                model = build_model(model)
        costs.append(profile(model, input_size))
    model_a, model_b = (c.model for c in costs)
    layers = [layer.name for layer in costs[0].layers]
    index = np.arange(len(layers))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.25 * len(layers) + 3), 7), sharex=True)
    for ax, key, label in ((axes[0], "macs", "multiply-adds"), (axes[1], "params", "parameters")):
        for k, (cost, offset) in enumerate(zip(costs, (-0.2, 0.2))):
            by_name = {layer.name: getattr(layer, key) for layer in cost.layers}
            ax.bar(index + offset, [by_name.get(n, 0) for n in layers], width=0.4,
                   label=f"{cost.model} ({getattr(cost, key) / 1e6:.1f} M)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(index)
    axes[1].set_xticklabels(layers, rotation=90, fontsize=6)
    fig.suptitle(f"layer-wise costs: {model_a} vs {model_b}")
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_times(results: Sequence, path: Path, *, overwrite: bool = False) -> Path:
    """Where the time of a forward pass goes, one stacked bar per model and path: ms per image
    in 1x1 convs, dense and grouped spatial convs and the rest, each conv segment labelled
    with its GFLOP/s (``results``: :class:`deeproots.speed.bench.LayerTimes`, or their dicts as
    ``deeproots bench --layers --json`` writes them)."""
    path = check_new_plot(path, "--out", overwrite=overwrite)
    results = [r.to_dict() if hasattr(r, "to_dict") else r for r in results]
    plt = _plt()
    kinds = ["1x1 convs", "dense spatial convs", "grouped spatial convs", "grouped 1x1 convs",
             "fully connected"]
    rest = [k for r in results for k in r["summary"] if k not in kinds]
    order = kinds + sorted(set(rest))
    colors = dict(zip(order, plt.cm.tab10.colors))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.6 * len(results)))
    labels = []
    for i, r in enumerate(results):
        left = 0.0
        for kind in order:
            part = r["summary"].get(kind)
            if not part:
                continue
            width = part["ms"] / r["batch_size"]
            ax.barh(i, width, left=left, color=colors[kind],
                    label=kind if kind not in ax.get_legend_handles_labels()[1] else None)
            if part.get("gflops") and width > 0.06 * r["total_ms"] / r["batch_size"]:
                ax.text(left + width / 2, i, f"{part['gflops']:.0f}", ha="center",
                        va="center", fontsize=8, color="white")
            left += width
        labels.append(f"{r['model']} ({r['path']})")
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (numbers in bars: GFLOP/s)")
    handles, names = ax.get_legend_handles_labels()
    ranked = sorted(zip(handles, names), key=lambda hn: order.index(hn[1]))
    ax.legend([h for h, _ in ranked], [n for _, n in ranked], fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle("where the time of a forward pass goes")
    fig.tight_layout()
    return _save(fig, path)


def _topology(name: str) -> str:
    """orig/root/tree/col of a registered model; a model of the user's own is drawn as orig."""
    return model_entry(name).topology if is_model(name) else "orig"


def summarize_runs(summaries: Sequence[Path]) -> Dict[str, dict]:
    """Training ``summary.json`` files grouped by model: ``macs``, ``params``, the number of
    runs ``n``, the ``mean`` test top-1 and its sample standard deviation ``std`` over the
    runs (0 for a single run), and the model's ``topology``."""
    from .training.folder import find_summaries, read_summary  # (training imports this)

    runs: Dict[str, List[dict]] = {}
    for s in find_summaries(summaries):
        data = read_summary(s, ("model", "top1", "macs", "params"))
        runs.setdefault(data["model"], []).append(data)
    out = {}
    for model, items in sorted(runs.items()):
        acc = np.array([r["top1"] for r in items], dtype=float)
        out[model] = {"macs": items[0]["macs"], "params": items[0]["params"], "n": len(acc),
                      "mean": float(acc.mean()),
                      "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                      "topology": _topology(model)}
    return out


def plot_results(summaries: Sequence[Path], path: Path, *, overwrite: bool = False) -> Path:
    """Accuracy against multiply-adds and against parameters from training ``summary.json``
    files; mean and standard deviation over seeds as error bars, root/tree/column in distinct
    markers (Figures 5, 8, 9). An existing ``path`` is replaced only with ``overwrite`` (a
    run's own file never)."""
    path = check_new_plot(path, "--out", overwrite=overwrite)  # before the summaries are read
    return plot_accuracy_vs_cost(summarize_runs(summaries), path)


def plot_accuracy_vs_cost(runs: Dict[str, dict], path: Path, title: str = "",
                          frontier: Sequence[str] = ()) -> Path:
    """Mean test top-1 against multiply-adds and against parameters, one point per model
    (``runs``: model -> ``macs``, ``params``, ``mean``, ``std``, ``n``, ``topology``), the
    standard deviation over seeds as error bars, orig as a star; models named in
    ``frontier`` (the accuracy-vs-cost Pareto frontier) joined by a dashed line."""
    path = check_output_file(path)
    plt = _plt()
    markers = {"orig": "*", "root": "o", "tree": "^", "col": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "macs", "multiply-adds"), (axes[1], "params", "parameters")):
        plotted = set()
        for model, r in runs.items():
            kind = r["topology"]
            ax.errorbar(r[key], r["mean"], yerr=r["std"] if r["n"] > 1 else None,
                        fmt=markers[kind], ms=14 if kind == "orig" else 8, capsize=3,
                        color=f"C{list(markers).index(kind)}",
                        label=None if kind in plotted else kind)
            plotted.add(kind)
            ax.annotate(f"{model} (n={r['n']})", (r[key], r["mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        if key == "macs" and len(frontier) > 1:
            points = sorted((runs[m]["macs"], runs[m]["mean"]) for m in frontier)
            ax.plot(*zip(*points), "k--", lw=0.8, label="Pareto frontier")
        ax.set(xlabel=label, ylabel="top-1 accuracy")
        ax.margins(0.2)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "accuracy vs cost (mean and std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def plot_frontier(result, path: Path) -> Path:
    """Test top-1 (no gradient step) against measured time and against multiply-adds, each
    a fraction of the dense model's: the searched schedules and the uniform root-N ones
    (:class:`deeproots.conversion.frontier.Frontier`), the fine-tuned top-1 where taken."""
    path = check_output_file(path)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "latency_fraction", "measured time (fraction of dense)"),
                           (axes[1], "macs_fraction", "multiply-adds (fraction of dense)")):
        for kind, marker, color in (("searched", "o-", "C0"), ("uniform", "s--", "C1")):
            points = sorted((getattr(p, key), p.top1, p.label) for p in result.points
                            if p.kind == kind)
            if not points:
                continue
            xs, ys, labels = zip(*points)
            # measured times are noisy: points alone there; multiply-adds are exact: a line
            style = marker[0] if key == "latency_fraction" else marker
            ax.plot(xs, ys, style, color=color, label=f"{kind}, no gradient step")
            for x, y, text in points:
                ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
            tuned = sorted((getattr(p, key), p.top1_finetuned) for p in result.points
                           if p.kind == kind and p.top1_finetuned is not None)
            if tuned:
                ax.plot(*zip(*tuned), marker[0] + ("" if key == "latency_fraction" else ":"),
                        color=color, alpha=0.6, fillstyle="none",
                        label=f"{kind}, {result.finetune_steps} distilled steps")
        ax.axhline(result.top1_dense, color="k", lw=0.8, label="dense")
        ax.set(xlabel=label, ylabel="test top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.model} on {result.data}: batch {result.batch_size} on "
                 f"{result.device}")
    fig.tight_layout()
    return _save(fig, path)


def plot_sensitivity(prices, path: Path) -> Path:
    """Each layer's accuracy cost against the time it saves, one line a layer through its
    group counts (:class:`deeproots.conversion.sensitivity.Sensitivity`)."""
    path = check_output_file(path)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, layer in enumerate(prices.layers):
        xs = [100 * (layer.ms - o.ms) / prices.ms for o in layer.options]
        ys = [100 * (prices.top1 - o.top1) for o in layer.options]
        ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=layer.layer)
        for x, y, o in zip(xs, ys, layer.options):
            ax.annotate(str(o.groups), (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="time saved (% of the dense model's)",
           ylabel="top-1 cost (points, that layer alone)",
           title=f"{prices.model}: each layer's price, batch {prices.batch_size} on "
                 f"{prices.device}")
    ax.grid(alpha=0.3)
    if len(prices.layers) <= 20:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)
