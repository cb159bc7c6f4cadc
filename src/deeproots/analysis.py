"""Looking inside root networks (Appendix A.2): inter-layer covariance, ZCA-whitened
covariance, intra-layer correlation, a block-diagonality score, and the paper's figures.

Responses of a layer are the outputs of the named layer: the conv-bn-relu block where the
model has one (NiN, GoogLeNet), else the convolution itself (ResNet). Every pixel of a
feature map is a sample; when two maps differ in size the smaller is upsampled with
nearest-neighbour interpolation (Appendix A.2). Sums are accumulated batch by batch in
float64, so a whole test set never has to fit in memory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import conv_layers

__all__ = [
    "PairStats",
    "upsample_to",
    "collect_pair_stats",
    "zca_matrix",
    "whitened_cross_covariance",
    "correlation",
    "block_diagonality",
    "adjacent_pairs",
    "analyze",
]


def upsample_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of [N, C, h, w] maps to ``size`` (H, W): output pixel
    (i, j) takes input pixel (floor(i * h / H), floor(j * w / W))."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest")


@dataclass
class PairStats:
    """Running sums over samples (pixels) of two layers' responses a [n, c1], b [n, c2]."""

    n: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sum_aa: torch.Tensor
    sum_bb: torch.Tensor
    sum_ab: torch.Tensor

    @classmethod
    def empty(cls, c1: int, c2: int) -> "PairStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(0, z(c1), z(c2), z(c1, c1), z(c2, c2), z(c1, c2))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add samples: ``a`` [n, c1] and ``b`` [n, c2], row i of each from the same pixel."""
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sum_aa += a.T @ a
        self.sum_bb += b.T @ b
        self.sum_ab += a.T @ b

    def _cov(self, s_xy, s_x, s_y) -> torch.Tensor:
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples; got {self.n}")
        return (s_xy - torch.outer(s_x, s_y) / self.n) / (self.n - 1)

    def cov_ab(self) -> torch.Tensor:
        """Inter-layer covariance (equations 1-2): E[(a - mean a)(b - mean b)^T], [c1, c2]."""
        return self._cov(self.sum_ab, self.sum_a, self.sum_b)

    def cov_aa(self) -> torch.Tensor:
        return self._cov(self.sum_aa, self.sum_a, self.sum_a)

    def cov_bb(self) -> torch.Tensor:
        return self._cov(self.sum_bb, self.sum_b, self.sum_b)


def zca_matrix(cov: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ZCA whitening matrix W = P (D + eps)^(-1/2) P^T of a covariance C = P D P^T
    (equations 3-8): W C W^T is the identity when eps is 0."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    d, p = torch.linalg.eigh(cov)
    d = d.clamp_min(0)
    return p @ torch.diag((d + eps).rsqrt()) @ p.T


def whitened_cross_covariance(stats: PairStats, eps: float = 1e-5) -> torch.Tensor:
    """cov(W1 X1, W2 X2) = W1 cov(X1, X2) W2^T (equation 9)."""
    return zca_matrix(stats.cov_aa(), eps) @ stats.cov_ab() @ zca_matrix(stats.cov_bb(), eps).T


def correlation(cov: torch.Tensor) -> torch.Tensor:
    """Correlation matrix from a covariance matrix (Figure 11 shows its absolute value);
    channels that never vary get correlation 0."""
    std = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(std, std)
    return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def block_mask(rows: int, cols: int, groups: int) -> torch.Tensor:
    """True on the ``groups`` diagonal blocks of a rows x cols matrix."""
    if groups < 1 or rows % groups or cols % groups:
        raise ValueError(f"{groups} groups do not divide a {rows} x {cols} matrix")
    r = torch.arange(rows) // (rows // groups)
    c = torch.arange(cols) // (cols // groups)
    return r[:, None] == c[None, :]


def block_diagonality(matrix: torch.Tensor, groups: int) -> float:
    """Mean |value| inside the ``groups`` diagonal blocks divided by mean |value| outside.

    1 for a matrix with no block structure (a constant one exactly), larger when the
    diagonal blocks are stronger. With one group there is no outside: NaN."""
    if groups == 1:
        return math.nan
    mask = block_mask(*matrix.shape, groups)
    m = matrix.abs()
    outside = m[~mask].mean()
    return float(m[mask].mean() / outside) if outside > 0 else math.inf


def adjacent_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Consecutive conv layers of a plain chain (NiN): (conv1a, conv1b), (conv1b, conv1c), ...
    Only pairs where the second layer's input channels equal the first layer's outputs."""
    layers = list(conv_layers(model).items())
    return [(a, b) for (a, ca), (b, cb) in zip(layers, layers[1:])
            if ca.out_channels == cb.in_channels]


def _response_modules(model: nn.Module, names: Iterable[str]) -> Dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"no layer {name!r} in {getattr(model, 'name', type(model).__name__)}"
                             f"; conv layers: {', '.join(conv_layers(model))}")
        out[name] = modules[name]
    return out


@torch.no_grad()
def collect_pair_stats(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                       pairs: Sequence[Tuple[str, str]], max_batches: Optional[int] = None,
                       device=None, progress: bool = False) -> Dict[Tuple[str, str], PairStats]:
    """Run ``model`` (eval mode) over ``batches`` and accumulate :class:`PairStats` for each
    layer pair, upsampling the smaller map of a pair (nearest neighbour)."""
    device = device or next(model.parameters()).device
    names = sorted({n for pair in pairs for n in pair})
    captured: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: captured.__setitem__(name, o))
             for name, m in _response_modules(model, names).items()]
    stats: Dict[Tuple[str, str], PairStats] = {}
    was_training = model.training
    model.eval()
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, total=max_batches, desc="responses", leave=False)
    try:
        for i, (x, _) in enumerate(iterator):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
            for a_name, b_name in pairs:
                a, b = captured[a_name].float(), captured[b_name].float()
                size = (max(a.shape[2], b.shape[2]), max(a.shape[3], b.shape[3]))
                a, b = upsample_to(a, size), upsample_to(b, size)
                a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).cpu()
                b = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]).cpu()
                if (a_name, b_name) not in stats:
                    stats[(a_name, b_name)] = PairStats.empty(a.shape[1], b.shape[1])
                stats[(a_name, b_name)].update(a, b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("no batches were analysed; the data is empty")
    return stats


# ---------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    _plt().close(fig)
    return path


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


def first_layer_filters(model: nn.Module) -> Tuple[str, torch.Tensor, int]:
    """The first conv's filters and the groups that arrange them (Figure 14): those of the
    first grouped conv among the following convs that still read as many channels as the
    first conv makes (ResNet: conv1 -> layer1.0.conv1 -> layer1.0.conv2), else 1."""
    convs = list(conv_layers(model).items())
    name, first = convs[0]
    groups = 1
    for _, c in convs[1:]:
        if c.in_channels != first.out_channels:
            break
        if c.groups > 1:
            groups = c.groups
            break
    return name, first.weight.detach().float().cpu(), groups


def plot_filters(model: nn.Module, path: Path) -> Path:
    """First-layer filters, one row per filter group of the next grouped layer (Figure 14)."""
    plt = _plt()
    name, w, groups = first_layer_filters(model)
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


def plot_costs(model_a: str, model_b: str, path: Path, input_size=None) -> Path:
    """Per-layer multiply-adds and parameters of two models side by side (Figure 15)."""
    from .profile import profile
    from .registry import create_model

    plt = _plt()
    costs = []
    for name in (model_a, model_b):
        with torch.device("meta"):
            costs.append(profile(create_model(name), input_size))
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


def plot_layer_times(results: Sequence[dict], path: Path) -> Path:
    """Where the time of a forward pass goes, one stacked bar per model and path: ms per image
    in 1x1 convs, dense and grouped spatial convs and the rest, each conv segment labelled
    with its GFLOP/s (``results``: :func:`deeproots.bench.layer_times` dicts with ``model``,
    ``path`` and ``batch_size`` added, as ``deeproots bench --layers --json`` writes them)."""
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
    for kind in ("root", "tree", "col"):
        if f"-{kind}-" in name:
            return kind
    return "orig"


def plot_results(summaries: Sequence[Path], path: Path) -> Path:
    """Accuracy against multiply-adds and against parameters from training ``summary.json``
    files; mean and standard deviation over seeds as error bars, root/tree/column in distinct
    markers (Figures 5, 8, 9)."""
    plt = _plt()
    runs: Dict[str, List[dict]] = {}
    for s in summaries:
        try:
            data = json.loads(Path(s).read_text())
            runs.setdefault(data["model"], []).append(data)
            float(data["top1"]), int(data["macs"]), int(data["params"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{s} is not a deeproots summary.json ({err})") from err
    markers = {"orig": "*", "root": "o", "tree": "^", "col": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "macs", "multiply-adds"), (axes[1], "params", "parameters")):
        plotted = set()
        for model, items in sorted(runs.items()):
            acc = np.array([r["top1"] for r in items], dtype=float)
            kind = _topology(model)
            ax.errorbar(items[0][key], acc.mean(), yerr=acc.std() if len(acc) > 1 else None,
                        fmt=markers[kind], ms=8, capsize=3, color=f"C{list(markers).index(kind)}",
                        label=None if kind in plotted else kind)
            plotted.add(kind)
            ax.annotate(f"{model} (n={len(acc)})", (items[0][key], acc.mean()), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=label, ylabel="top-1 accuracy")
        ax.margins(0.2)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("accuracy vs cost (mean and std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The whole analysis


def analyze(model: nn.Module, batches, out: Path, *, max_batches: Optional[int] = None,
            eps: float = 1e-5, blocks: int = 4, device=None, progress: bool = False) -> dict:
    """Covariance, correlation and filter figures for ``model`` on ``batches``, written to
    ``out`` with ``analysis.json`` and ``report.md``. Returns the analysis dict.

    For each adjacent conv pair (a -> b) the block-diagonality score uses b's filter groups,
    or ``blocks`` groups where b is ungrouped (so an orig model is scored on the same
    blocks as a root one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = adjacent_pairs(model)
    if not pairs:
        raise ValueError("the model has no adjacent conv layers to analyse")
    stats = collect_pair_stats(model, batches, pairs, max_batches, device, progress)
    convs = conv_layers(model)
    result = {"model": getattr(model, "name", type(model).__name__), "eps": eps,
              "pairs": {}}
    raw_grid, white_grid, corr_grid = {}, {}, {}
    figures = []
    for (a, b), s in stats.items():
        raw = s.cov_ab().float()
        white = whitened_cross_covariance(s, eps).float()
        g = convs[b].groups
        used = g if g > 1 else blocks
        if raw.shape[0] % used or raw.shape[1] % used:
            used = 1
        scores = (block_diagonality(raw, used), block_diagonality(white, used))
        key = f"{a}->{b}"
        result["pairs"][key] = {"groups": g, "blocks_scored": used, "samples": s.n,
                                "score_raw": _finite(scores[0]),
                                "score_whitened": _finite(scores[1])}
        fig = plot_covariance_pair(raw, white, a, b, out / f"cov_{a}_{b}.png".replace("/", "_"),
                                   scores)
        figures.append((key, fig.name))
        raw_grid[key], white_grid[key] = raw, white
        corr_grid.setdefault(a, correlation(s.cov_aa()).float())
        corr_grid.setdefault(b, correlation(s.cov_bb()).float())
    plot_matrix_grid(raw_grid, out / "covariance_all.png", "inter-layer |covariance| (Fig. 13)")
    plot_matrix_grid(white_grid, out / "covariance_all_whitened.png",
                     "inter-layer |covariance|, ZCA-whitened")
    plot_matrix_grid(corr_grid, out / "correlation.png", "intra-layer |correlation| (Fig. 11)")
    plot_filters(model, out / "filters.png")
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    _report(result, figures, out)
    return result


def _finite(x: float) -> Optional[float]:
    # JSON has no NaN: a pair with one block has no score
    return x if math.isfinite(x) else None


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _report(result: dict, figures, out: Path) -> None:
    lines = [f"# Inside {result['model']}", "",
             f"Every pixel of the larger map of a layer pair is a sample; ZCA epsilon "
             f"{result['eps']}.", "",
             "Block-diagonality: mean |covariance| inside the filter-group blocks over mean "
             "|covariance| outside (1 = no block structure; n/a where the channels do not split "
             "into the blocks).", "",
             "| layer pair | groups | blocks scored | samples | raw | whitened |",
             "|---|---|---|---|---|---|"]
    for key, p in result["pairs"].items():
        lines.append(f"| {key} | {p['groups']} | {p['blocks_scored']} | {p['samples']:,} | "
                     f"{_fmt(p['score_raw'])} | {_fmt(p['score_whitened'])} |")
    lines += ["", "## All layer pairs", "", "![covariance](covariance_all.png)", "",
              "![whitened](covariance_all_whitened.png)", "",
              "## Intra-layer correlation", "", "![correlation](correlation.png)", "",
              "## First-layer filters", "", "![filters](filters.png)", "",
              "## Each pair, raw and whitened", ""]
    lines += [f"### {key}\n\n![{key}]({name})\n" for key, name in figures]
    (out / "report.md").write_text("\n".join(lines))
