"""Looking inside root networks (Appendix A.2): inter-layer covariance, ZCA-whitened
covariance, intra-layer correlation and a block-diagonality score. The figures are drawn by
:mod:`deeproots.plots`; :func:`analyze` runs the whole analysis and writes its report.

Responses of a layer are the outputs of the named layer: the conv-bn-relu block where the
model has one (NiN, GoogLeNet), else the convolution itself (ResNet). Every pixel of a
feature map is a sample; when two maps differ in size the smaller is upsampled with
nearest-neighbour interpolation (Appendix A.2). Sums are accumulated batch by batch in
float64, so a whole test set never has to fit in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..capture import hooks
from ..errors import DeeprootsError
from ..checks import check_number, check_optional_positive, check_positive
from ..models.layers import conv_layers
from ..plots import plot_covariance_pair, plot_filters, plot_matrix_grid
from ..outputs import check_new_folder
from ..runtime import write_json, write_text

__all__ = [
    "REPORT_FILES",
    "PairStats",
    "upsample_to",
    "collect_pair_stats",
    "zca_matrix",
    "whitened_cross_covariance",
    "correlation",
    "block_diagonality",
    "adjacent_pairs",
    "first_layer_filters",
    "analyze",
    "format_score",
]

REPORT_FILES = ("analysis.json", "report.md")  # an analysis folder's own files


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
            raise DeeprootsError(f"covariance needs at least 2 samples; got {self.n}")
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
        raise DeeprootsError(f"eps must be >= 0; got {eps}")
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
        raise DeeprootsError(f"{groups} groups do not divide a {rows} x {cols} matrix")
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
            model_name = getattr(model, "name", type(model).__name__)
            raise DeeprootsError(f"no layer {name!r} in {model_name}; conv layers: "
                                 f"{', '.join(conv_layers(model))}")
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
    watched = _response_modules(model, names)
    keep = lambda name, module, args, out: captured.__setitem__(name, out)  # noqa: E731
    stats: Dict[Tuple[str, str], PairStats] = {}
    was_training = model.training
    model.eval()
    iterator = batches
    if progress:
        from tqdm import tqdm  # only on a terminal

        iterator = tqdm(batches, total=max_batches, desc="responses", leave=False)
    try:
        with hooks(watched, after=keep):
            _accumulate(model, iterator, pairs, captured, stats, max_batches, device)
    finally:
        model.train(was_training)
    if not stats:
        raise DeeprootsError("no batches were analysed; the data is empty")
    return stats


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


# ---------------------------------------------------------------------------------------------
# The whole analysis


def _check_blocks(blocks: int, plain: List[Tuple[str, str, int, int]]) -> None:
    """A one-line error where ``blocks`` (> 1) divides the channels of none of the ungrouped
    pairs ``plain`` (a, b, channels of a, of b): every one of them would go unscored."""
    if blocks == 1 or not plain or any(r % blocks == 0 and c % blocks == 0
                                       for _, _, r, c in plain):
        return
    fits = [n for n in range(2, 65) if any(r % n == 0 and c % n == 0 for _, _, r, c in plain)]
    shapes = ", ".join(f"{a}->{b} {r}x{c}" for a, b, r, c in plain[:3])
    more = f" and {len(plain) - 3} more" if len(plain) > 3 else ""
    raise DeeprootsError(f"blocks {blocks} divides the channels of none of the ungrouped layer "
                         f"pairs ({shapes}{more}): none would be scored. Accepted: 1, "
                         f"{', '.join(map(str, fits[:8]))}{', ...' if len(fits) > 8 else ''}")


def analyze(model: nn.Module, batches, out: Path, *, max_batches: Optional[int] = None,
            eps: float = 1e-5, blocks: int = 4, device=None, progress: bool = False,
            overwrite: bool = False) -> dict:
    """Covariance, correlation and filter figures for ``model`` on ``batches``, written to
    ``out`` with ``analysis.json`` and ``report.md``. Returns the analysis dict. A folder
    that holds an analysis already is written over only with ``overwrite``.

    For each adjacent conv pair (a -> b) the block-diagonality score uses b's filter groups,
    or ``blocks`` groups where b is ungrouped (so an orig model is scored on the same
    blocks as a root one)."""
    check_number("eps", eps)
    check_positive("blocks", blocks)
    check_optional_positive("max_batches", max_batches)
    out = check_new_folder(out, REPORT_FILES, overwrite=overwrite)
    pairs = adjacent_pairs(model)
    if not pairs:
        raise DeeprootsError("the model has no adjacent conv layers to analyse")
    convs = conv_layers(model)
    _check_blocks(blocks, [(a, b, convs[a].out_channels, convs[b].out_channels)
                           for a, b in pairs if convs[b].groups == 1])
    stats = collect_pair_stats(model, batches, pairs, max_batches, device, progress)
    out.mkdir(parents=True, exist_ok=True)
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
    plot_filters(*first_layer_filters(model), out / "filters.png")
    write_json(out / "analysis.json", result)
    _report(result, figures, out)
    return result


def _finite(x: float) -> Optional[float]:
    # JSON has no NaN: a pair with one block has no score
    return x if math.isfinite(x) else None


def format_score(x: Optional[float]) -> str:
    """A block score for a table: three decimals, or n/a where there is none."""
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
                     f"{format_score(p['score_raw'])} | {format_score(p['score_whitened'])} |")
    lines += ["", "## All layer pairs", "", "![covariance](covariance_all.png)", "",
              "![whitened](covariance_all_whitened.png)", "",
              "## Intra-layer correlation", "", "![correlation](correlation.png)", "",
              "## First-layer filters", "", "![filters](filters.png)", "",
              "## Each pair, raw and whitened", ""]
    lines += [f"### {key}\n\n![{key}]({name})\n" for key, name in figures]
    write_text(out / "report.md", "\n".join(lines) + "\n")


def _accumulate(model, batches, pairs, captured, stats, max_batches, device) -> None:
    """Each batch's responses (``captured`` by the hooks) added into each pair's stats."""
    for i, (x, _) in enumerate(batches):
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
