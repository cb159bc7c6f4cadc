"""A trained checkpoint made a root network, evaluated before and after:
``deeproots rootify RUN/best.pt --schedule root-8 --data fashion-mnist --out FILE.pt``.

The conversion itself is :func:`deeproots.rootify` with calibration images
(:mod:`deeproots.conversion.calibrate`); this module takes the model from a checkpoint, the
calibration images from the training split, evaluates every stage on the test split, and
writes the converted model as a checkpoint that ``deeproots eval``, ``export`` and
``train --init`` take.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from torch import nn

from .calibrate.pipeline import STAGES, check_trained
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, save_model
from .rule import RootifyReport, rootify
from ..training.data import CALIBRATION_IMAGES, build_loaders, sample_images
from ..errors import DeeprootsError
from ..models.layers import example_logits
from ..outputs import check_new_file
from ..training.loop import evaluate

__all__ = ["ConvertedCheckpoint", "convert_checkpoint", "CALIBRATION_IMAGES"]

@dataclass
class ConvertedCheckpoint:
    """What :func:`convert_checkpoint` did: the rootify report (per layer, with the
    calibration's), test top-1 of the trained model (``top1_before``), of each stage and of
    the converted model (``top1_after``, no gradient step), and the seconds the conversion
    took (the evaluations apart)."""

    checkpoint: str
    schedule: str
    data: str
    top1_before: float
    top1_after: float
    stages: Dict[str, float] = field(default_factory=dict)
    conversion_s: float = 0.0
    out: Optional[str] = None
    report: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)


def convert_checkpoint(checkpoint: Union[str, Path], schedule: str, *,
                       data: Optional[str] = None, data_dir=None,
                       calibration_images_n: Optional[int] = None,
                       out: Union[None, str, Path] = None, overwrite: bool = False,
                       model: Union[None, str, nn.Module] = None, stages: bool = True,
                       download: bool = True, **rootify_options
                       ) -> tuple[nn.Module, RootifyReport, ConvertedCheckpoint]:
    """The model of ``checkpoint`` converted to ``schedule`` with calibration images of the
    training split of ``data`` (default: the data it was trained on), evaluated on the test
    split before, at each stage (``stages``) and after; written to ``out`` if given (a
    deeproots checkpoint of the converted model). ``model``: for a model of your own, its
    ``FILE.py:FUNCTION`` or the module. Returns the model, the report and the summary."""
    if out is not None:
        check_new_file(out, overwrite=overwrite)  # before minutes of work
    state = load_checkpoint(checkpoint)
    trained = model_from_checkpoint(state, checkpoint, model).eval()
    check_trained(trained, str(checkpoint))  # before the data is read
    config = state["config"]
    data = data or config.get("data")
    train, test, spec = build_loaders(data, data_dir=data_dir or config.get("data_dir"),
                                      batch_size=256, image_size=config.get("image_size", 224),
                                      download_ok=download, workers=0)
    trained_on = state.get("data") if isinstance(state.get("data"), dict) else {}
    if trained_on.get("in_channels") not in (None, spec.in_channels):
        raise DeeprootsError(f"{checkpoint} was trained on {trained_on['in_channels']}-channel "
                             f"images ({trained_on.get('name', 'its data')}); {data} has "
                             f"{spec.in_channels}-channel ones: calibrate on images like those "
                             f"it was trained on")
    images = sample_images(train, spec, calibration_images_n)  # the data read once
    logits = example_logits(trained, images[:1], state["model_cfg"]["name"])
    if logits.shape[1] != spec.num_classes:
        raise DeeprootsError(f"{checkpoint} has {logits.shape[1]} classes but {data} has "
                             f"{spec.num_classes}: calibrate on the data it was trained on")
    measured: Dict[str, float] = {}
    evaluating = [0.0]  # seconds spent evaluating stages, not converting

    def stage(name, m):
        t0 = time.perf_counter()
        measured[name] = evaluate(m.eval(), test).top1
        evaluating[0] += time.perf_counter() - t0

    before = evaluate(trained, test).top1
    started = time.perf_counter()
    new, report = rootify(trained, schedule, example_input=images[:1], calibration=images,
                          on_stage=stage if stages else None, **rootify_options)
    seconds = time.perf_counter() - started - evaluating[0]  # the conversion's own time
    after = measured.get(STAGES[-1]) if stages else evaluate(new.eval(), test).top1
    report.calibration.stages = dict(measured)
    summary = ConvertedCheckpoint(str(checkpoint), report.schedule, data, before, after,
                                  measured, seconds, report=report.to_dict())
    if out is not None:
        save_model(out, new, state, converted=summary.to_dict())
        summary.out = str(out)
    return new, report, summary
