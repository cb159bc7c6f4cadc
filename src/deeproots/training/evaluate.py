"""Evaluating a model: loss, top-1 and top-5 over a test split, all processes together under
torchrun, in the run's layout; and a checkpoint's model with its test split, for ``deeproots
eval`` and ``analyze``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DeeprootsError
from ..inspection.costs import profile
from ..layout import Layout, choose_layout
from ..models.layers import example_logits, input_channels, main_logits
from ..runtime import check_batch_fits, resolve_device
from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import (build_loaders, check_data_fits, check_normalisation, folder_like,
                   folder_size)
from .distributed import all_sum

__all__ = ["EvalResult", "evaluate", "load_for_eval"]


@dataclass
class EvalResult:
    """Mean cross-entropy ``loss``, ``top1`` and ``top5`` accuracy (fractions in [0, 1]) over
    ``n`` images."""

    loss: float
    top1: float
    top5: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, layout: Optional[Layout] = None
             ) -> EvalResult:
    """Loss, top-1 and top-5 accuracy of ``model`` over ``loader`` (all ranks together), in
    ``layout`` (default: the training layout of the model's device)."""
    device = device or next(model.parameters()).device
    layout = layout if layout is not None else choose_layout(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # on the device: no sync a batch
    n = 0
    for x, y in loader.batches():
        x, y = layout.input(x), y.to(device, non_blocking=True)
        with layout.autocast():
            logits = main_logits(model(x)).float()
        hits = logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double()])
        n += len(y)
    loss_sum, top1, top5 = sums.tolist()
    loss_sum, top1, top5, n = all_sum([loss_sum, top1, top5, n], device)
    model.train(was_training)
    if n == 0:
        raise DeeprootsError("the evaluation data is empty")
    return EvalResult(loss_sum / n, top1 / n, top5 / n, int(n))


def load_for_eval(checkpoint: Path | str, *, data: Optional[str] = None, data_dir=None,
                  batch_size: int = 256, device: str = "auto", workers: int = 4,
                  limit_eval_batches: Optional[int] = None, download: bool = True,
                  model: Union[None, str, nn.Module] = None,
                  mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """The model of ``checkpoint`` on its device (eval mode), and the test split of ``data``
    (default: the data it was trained on; an image folder read as its images were:
    :func:`~deeproots.training.data.folder_like`, ``mean``/``std`` on the 0..1 scale over
    what it was trained with). Returns ``(model, test_loader, spec, state, device)``.
    ``model``: for a model of your own, its ``FILE.py:FUNCTION`` or the module."""
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint, map_location=dev)
    model = model_from_checkpoint(state, checkpoint, model).to(dev).eval()
    config = state["config"]
    data = data or config.get("data")
    check_data_fits(data, model, str(checkpoint), "evaluate")  # before the data is read
    check_normalisation(data, mean, std)
    like = folder_like(state.get("data"), channels=input_channels(model), mean=mean,
                       std=std)  # an image folder read as its images were
    _, test_loader, spec = build_loaders(
        data, data_dir=data_dir or config.get("data_dir"), batch_size=batch_size, device=dev,
        workers=workers, image_size=folder_size(like, default=config.get("image_size")),
        limit_eval_batches=limit_eval_batches,
        download_ok=download, like=like)
    classes = getattr(model, "num_classes", None)
    if classes is None:  # a model of the user's own: count its outputs
        classes = example_logits(model, torch.zeros(
            1, spec.in_channels, spec.image_size, spec.image_size, device=dev)).shape[1]
    if spec.num_classes != classes:
        raise DeeprootsError(f"{checkpoint} has {classes} classes but {data} has "
                             f"{spec.num_classes}")
    size = (spec.in_channels, spec.image_size, spec.image_size)
    check_batch_fits(profile(model, size).activation_bytes(),
                     min(batch_size, test_loader.num_samples), dev,
                     f"evaluate {getattr(model, 'name', None) or type(model).__name__}")
    return model, test_loader, spec, state, dev
