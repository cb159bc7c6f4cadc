"""A trained model made a root network, evaluated before and after:
``deeproots rootify RUN/best.pt --schedule root-8 --data fashion-mnist --out FILE.pt``, or the
best schedule a budget allows, ``--latency 0.7`` (the converted model's measured time as a
fraction of the dense model's), ``--macs 0.5``, ``--params 0.5``.

The conversion itself is :func:`deeproots.rootify` with calibration images
(:mod:`deeproots.conversion.calibrate`); a budget is met by the search of :mod:`.search` over
each layer's price (:mod:`.sensitivity`), the layers it proposes checked by converting each
alone, the schedule's time measured beside the dense model's and the search run again where
the measurement says it missed; its best proposals and the least root-N within the budget
are then converted and measured, and the most accurate kept. This
module reads the trained model (a deeproots checkpoint, or a plain ``state_dict`` with the
model named), takes the calibration images from the training split, evaluates each stage on
a subset of the test split and the converted model on all of it, and writes the converted
model as a checkpoint that ``deeproots eval``, ``export`` and ``train --init`` take.
:func:`convert_model` does the same for a trained module in memory (timm's, torchvision's,
yours) on images given in Python, returning the converted module.
"""
from __future__ import annotations

import copy
import glob
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..checks import check_whole
from ..errors import CheckpointError, DeeprootsError
from ..layout import Placement, float32_cpu_copy
from ..models.layers import example_logits, input_channels
from ..models.registry import build_model, resolve_model_spec
from ..outputs import check_new_file
from ..training.checkpoint import NEEDED, load_checkpoint, model_from_checkpoint, save_model
from ..training.data import (CALIBRATION_IMAGES, build_loaders, check_data_fits, check_labels,
                             check_normalisation, folder_like, folder_size, head,
                             sample_split)
from ..training.evaluate import evaluate
from ..weights import fit_weights, load_weights_only, state_dict_of
from .calibrate import DensePasses, calibration_batches
from .calibrate.pipeline import calibrate, check_trained
from .rule import RootifyReport, rootify
from .search import (Plan, check_fraction, check_reachable, cheapest, choose, latency_scale,
                     predict)
from .sensitivity import (ROOT_COUNTS, Sensitivity, layer_prices, model_ms, most_saved,
                          select_top1, selection_scores)

__all__ = ["ConvertedCheckpoint", "convert_checkpoint", "convert_model", "model_source",
           "LabelledImages", "read_trained", "Calibration",
           "calibration_data", "Source", "open_source", "CALIBRATION_IMAGES", "EVAL_IMAGES",
           "measure_latency", "measure_latencies", "check_device", "as_mapping", "price_checkpoint"]

EVAL_IMAGES = 1000  # test images each stage is evaluated on (the converted model: all)
SELECT_IMAGES = 1000  # training images, apart from the calibration ones, a search chooses by
# a measured time within this fraction above the budget meets it: on a shared 2-core CPU the
# same model measures 5-10% apart from one run to the next (docs/conversion.md)
LATENCY_TOLERANCE = 0.05
REFINE_ROUNDS = 3  # searches run again after a whole-model measurement rescaled the layers'
CANDIDATES = 2  # searched schedules within a budget converted and measured (and the best root-N)
CHECK_ROUNDS = 3  # proposals whose layers are each checked by a calibrated conversion alone


@dataclass
class ConvertedCheckpoint:
    """What :func:`convert_checkpoint` did: the schedule (and for a budget the per-layer
    ``groups`` the search chose, with its ``predicted`` and ``measured`` costs), the test
    top-1 of the trained model (``top1_before``), of each stage (on ``eval_images`` test
    images) and of the converted model (``top1_after``, the whole split, no gradient step),
    and the seconds the conversion took (the evaluations apart) and the whole command."""

    checkpoint: str
    schedule: str
    data: str
    top1_before: float
    top1_after: float
    stages: Dict[str, float] = field(default_factory=dict)
    conversion_s: float = 0.0
    wall_s: float = 0.0
    eval_images: Optional[int] = None
    groups: Dict[str, int] = field(default_factory=dict)
    budget: Optional[Dict[str, Any]] = None
    predicted: Dict[str, float] = field(default_factory=dict)
    measured: Dict[str, float] = field(default_factory=dict)
    candidates: List[Dict[str, Any]] = field(default_factory=list)
    out: Optional[str] = None
    report: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The trained model, from a checkpoint or a state_dict


def read_trained(checkpoint: Union[str, Path], model: Union[None, str, nn.Module] = None
                 ) -> Tuple[nn.Module, dict]:
    """The trained model of ``checkpoint`` (eval mode) and a deeproots checkpoint's fields
    describing it (its model, config, data). ``checkpoint`` is a deeproots checkpoint, or a
    plain ``state_dict`` (``torch.save(model.state_dict(), F)``; also under ``"state_dict"``
    or ``"model"``), read with ``weights_only=True`` either way; for a state_dict, or a
    deeproots checkpoint of a model of your own, ``model`` names it (a registered name,
    ``FILE.py:FUNCTION``, or the module)."""
    raw = load_weights_only(checkpoint)
    if isinstance(raw, dict) and all(k in raw for k in NEEDED):
        state = load_checkpoint(checkpoint)
        return model_from_checkpoint(state, checkpoint, model).eval(), state
    weights = state_dict_of(raw)
    if weights is None:
        raise CheckpointError(f"{checkpoint} is neither a deeproots checkpoint nor a state_dict "
                              f"(a mapping of parameter names to tensors, or one under "
                              f"'state_dict' or 'model')")
    if model is None:
        raise CheckpointError(f"{checkpoint} holds weights only (a state_dict): name the model "
                              f"they belong to, --model FILE.py:FUNCTION or a registered name "
                              f"(model=...)")
    built = copy.deepcopy(model) if isinstance(model, nn.Module) else build_model(model)
    name = getattr(built, "name", None) or (model if isinstance(model, str) else
                                            type(built).__name__)
    fit_weights(built, weights, str(checkpoint), name)
    spec = resolve_model_spec(model) if isinstance(model, str) else name
    cfg = getattr(built, "deeproots_cfg", None) or {"name": spec, "kwargs": {}}
    return built.eval(), {"model_cfg": {**cfg, "name": spec}, "config": {}, "data": {}}


# ---------------------------------------------------------------------------------------------
# The images


@dataclass
class Calibration:
    """What a conversion reads of its data: calibration images, labelled selection images
    (a search chooses by them), the test split and its first ``eval_images`` (the stages'),
    the data's spec and name."""

    fit: torch.Tensor
    select: Optional[Tuple[torch.Tensor, torch.Tensor]]
    test: Any
    test_subset: Any
    spec: Any
    data: str


def calibration_data(source: dict, *, data: Optional[str], data_dir=None,
                     image_size: Optional[int] = None, fit_images: Optional[int] = None,
                     select_images: int = 0, eval_images: Optional[int] = EVAL_IMAGES,
                     download: bool = True, name: str = "the model",
                     channels: Optional[int] = None, mean=None, std=None) -> Calibration:
    """The images a conversion of the model ``source`` describes reads: by default of the
    data it was trained on (a state_dict's model names none: ``data`` then needed); an image
    folder read as its images were (:func:`~deeproots.training.data.folder_like`:
    ``channels``, the model's own; ``mean``/``std``, on the 0..1 scale, over its data's)."""
    config = source.get("config", {})
    data = data or config.get("data")
    if not data:
        raise DeeprootsError(f"{name} records no data it was trained on: give --data (e.g. "
                             f"fashion-mnist or imagefolder:DIR, the images to calibrate on)")
    check_normalisation(data, mean, std)
    trained_on = source.get("data") if isinstance(source.get("data"), dict) else {}
    like = folder_like(trained_on, channels=channels, mean=mean,
                       std=std)  # an image folder read as its images were
    size = folder_size(like, given=image_size, default=config.get("image_size"))
    train, test, spec = build_loaders(data, data_dir=data_dir or config.get("data_dir"),
                                      batch_size=256, image_size=size, download_ok=download,
                                      workers=0, like=like)
    if trained_on.get("in_channels") not in (None, spec.in_channels):
        raise DeeprootsError(f"{name} was trained on {trained_on['in_channels']}-channel "
                             f"images ({trained_on.get('name', 'its data')}); {data} has "
                             f"{spec.in_channels}-channel ones: calibrate on images like those "
                             f"it was trained on")
    counts = [fit_images] + ([select_images] if select_images else [])
    if select_images:  # a small split: half to fit on, the rest (at most asked) to choose by
        available = train.num_samples
        fit = fit_images or min(CALIBRATION_IMAGES, available // 2)
        counts = [fit, min(select_images, max(available - fit, 1))]
    samples = sample_split(train, spec, counts)  # the data read once
    subset = head(test, eval_images) if eval_images else test
    return Calibration(samples[0][0], samples[1] if select_images else None, test, subset,
                       spec, data)


# ---------------------------------------------------------------------------------------------
# The conversion


@dataclass
class Source:
    """A trained model and what a conversion of it reads: the model (eval mode), the
    checkpoint's fields describing it, its name, the images (:class:`Calibration`) and its
    test top-1 before conversion; and what the trained model computes on the calibration
    images, kept for every conversion of it (:meth:`dense_passes`)."""

    checkpoint: str
    trained: nn.Module
    fields: dict
    name: str
    cal: Calibration
    top1_before: float
    passes: Optional[DensePasses] = field(default=None, repr=False)

    def dense_passes(self) -> DensePasses:
        """The calibration images with the trained model's passes over them, made on first
        use and shared by every conversion of this source (the layer checks, the candidates,
        a frontier's points): what the trained model computes is computed once."""
        if self.passes is None:
            self.passes = DensePasses(self.trained, self.cal.fit)
        return self.passes


def open_source(checkpoint: Union[str, Path], *, model=None, data: Optional[str] = None,
                data_dir=None, image_size: Optional[int] = None,
                calibration_images_n: Optional[int] = None, select_images: int = 0,
                eval_images: Optional[int] = EVAL_IMAGES, download: bool = True,
                top1: bool = True, mean=None, std=None) -> Source:
    """The trained model of ``checkpoint`` (:func:`read_trained`), checked convertible, the
    images of ``data`` (:func:`calibration_data`) checked to fit it, and its test top-1
    (``top1``; else NaN)."""
    if eval_images is not None:
        check_whole("eval_images", eval_images, 1)
    trained, source = read_trained(checkpoint, model)
    check_trained(trained, str(checkpoint))  # before the data is read
    name = source["model_cfg"]["name"]
    check_data_fits(data or source.get("config", {}).get("data"), trained, str(checkpoint),
                    "calibrate")
    cal = calibration_data(source, data=data, data_dir=data_dir, image_size=image_size,
                           fit_images=calibration_images_n, select_images=select_images,
                           eval_images=eval_images, download=download, name=str(checkpoint),
                           channels=input_channels(trained), mean=mean, std=std)
    logits = example_logits(trained, cal.fit[:1], name)
    if logits.shape[1] != cal.spec.num_classes:
        raise DeeprootsError(f"{checkpoint} has {logits.shape[1]} classes but {cal.data} has "
                             f"{cal.spec.num_classes}: calibrate on the data it was trained on")
    before = float("nan") if not top1 else (_recorded_top1(source, cal.data)
                                             or evaluate(trained, cal.test).top1)
    return Source(str(checkpoint), trained, source, name, cal, before)


def convert_checkpoint(checkpoint: Union[str, Path], schedule=None, *,
                       latency: Optional[float] = None, data: Optional[str] = None,
                       data_dir=None, calibration_images_n: Optional[int] = None,
                       eval_images: Optional[int] = EVAL_IMAGES,
                       out: Union[None, str, Path] = None, overwrite: bool = False,
                       model: Union[None, str, nn.Module] = None, stages: bool = True,
                       download: bool = True, device: str = "cpu", batch_size: int = 128,
                       image_size: Optional[int] = None, mean=None, std=None,
                       prices: Optional[Sensitivity] = None, progress=None,
                       source: Optional[Source] = None,
                       **rootify_options) -> Tuple[nn.Module, RootifyReport,
                                                   ConvertedCheckpoint]:
    """The model of ``checkpoint`` converted, with calibration images of the training split
    of ``data`` (default: the data it was trained on), to ``schedule`` (root-N, tree-N,
    col-N, or a mapping of layers to groups), or to the best schedule a budget allows:
    ``latency`` (the converted model's time as a fraction of the dense model's, measured on
    ``device`` at ``batch_size``), or ``macs``/``params`` in ``rootify_options``; evaluated on
    the test split before (the run's own record of it, where it has one), at each stage
    (``stages``, on ``eval_images`` test images; None: all) and after (all); written to
    ``out`` if given (a deeproots checkpoint of the converted model, its schedule in it).
    ``model``: for a state_dict or a model of your own, its name, ``FILE.py:FUNCTION`` or
    the module. ``source``: a :func:`open_source` already read (several conversions of one
    model: the frontier). ``mean``/``std``: how an image folder's images are normalised (the
    0..1 scale; default: as the model's were). Returns the model, the report and the
    summary."""
    started = time.perf_counter()
    budget = _budget(schedule, latency, rootify_options)
    if budget and budget[0] == "latency":
        check_device(device, "--latency")
    if out is not None:
        check_new_file(out, overwrite=overwrite)  # before minutes of work
    if source is None:
        source = open_source(checkpoint, model=model, data=data, data_dir=data_dir,
                             image_size=image_size, calibration_images_n=calibration_images_n,
                             select_images=SELECT_IMAGES if budget else 0,
                             eval_images=eval_images, download=download, mean=mean, std=std)
    new, report, summary = _convert(source, schedule, budget, started, eval_images=eval_images,
                                    stages=stages, device=device, batch_size=batch_size,
                                    prices=prices, progress=progress,
                                    rootify_options=rootify_options)
    if out is not None:
        save_model(out, new, _with_data(source.fields, source.cal, data_dir),
                   converted=summary.to_dict())
        summary.out = str(out)
    return new, report, summary


def convert_model(model: nn.Module, schedule=None, *, calibration, select=None, test=None,
                  latency: Optional[float] = None, eval_images: Optional[int] = EVAL_IMAGES,
                  stages: bool = True, device: str = "cpu", batch_size: int = 128,
                  prices: Optional[Sensitivity] = None, progress=None, name: Optional[str] = None,
                  **rootify_options) -> Tuple[nn.Module, RootifyReport, ConvertedCheckpoint]:
    """A trained model in memory (yours, timm's, torchvision's; not changed) converted with
    calibration, as :func:`convert_checkpoint` converts a checkpoint's: to ``schedule``
    (root-N, tree-N, col-N, or ``{layer: groups}``), or to the best schedule a budget allows,
    ``latency`` (the converted model's time as a fraction of the trained one's, measured on
    ``device`` at ``batch_size``) or ``macs``/``params``, the search's candidates compared by
    their top-1 on ``select``.

    Args:
        calibration: training images, normalised as the model reads them: a tensor
            (N, C, H, W), or batches of them (a DataLoader yielding images or
            ``(images, labels)``); a thousand or so is enough.
        select: for a budget, labelled training images apart from the calibration ones,
            ``(images, labels)`` tensors or batches of them.
        test: labelled test images, the same forms: the top-1 before and after (and each
            stage's on its first ``eval_images``; None: all); without it they are NaN.
        name: what the summary and the messages call the model (default: its class).

    Returns the converted model (held as ``model`` is: its device, dtype and memory format;
    converted in float32 on the CPU), the :class:`RootifyReport` and the summary
    (:class:`ConvertedCheckpoint`, its ``checkpoint`` the model's name).

        >>> new, report, summary = convert_model(model, latency=0.7, calibration=images,
        ...                                      select=(x, y), test=test_loader)
        >>> summary.groups, summary.measured["latency_fraction"], summary.top1_after
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise DeeprootsError(f"convert_model converts an nn.Module; got "
                             f"{type(model).__name__} (for a checkpoint file: "
                             f"convert_checkpoint)")
    budget = _budget(schedule, latency, rootify_options)
    if budget and budget[0] == "latency":
        check_device(device, "latency")
    if budget and select is None:
        raise DeeprootsError(f"a {budget[0]} budget compares its candidates by their top-1 on "
                             f"labelled training images apart from the calibration ones: give "
                             f"select=(images, labels)")
    if eval_images is not None:
        check_whole("eval_images", eval_images, 1)
    source = model_source(model, calibration, select=select, test=test,
                          eval_images=eval_images, name=name)
    new, report, summary = _convert(source, schedule, budget, started,
                                    eval_images=eval_images, stages=stages, device=device,
                                    batch_size=batch_size, prices=prices, progress=progress,
                                    rootify_options=rootify_options)
    return Placement(model).restore(new), report, summary


def model_source(model: nn.Module, calibration, *, select=None, test=None,
                 eval_images: Optional[int] = EVAL_IMAGES, name: Optional[str] = None
                 ) -> Source:
    """A :class:`Source` of a model in memory: a float32 copy of it on the CPU in eval mode
    (the model itself is not changed, whatever its precision and device), its calibration
    images, the labelled ``select`` and ``test`` images (as :func:`convert_model` takes
    them) and its test top-1 (NaN without ``test``)."""
    name = name or getattr(model, "name", None) or type(model).__name__
    trained = float32_cpu_copy(model).eval()
    check_trained(trained, name)
    fit = torch.cat([b.cpu() for b in calibration_batches(calibration)])
    # class scores are asked of a model only where labels are given (a U-Net converts too)
    classes = (None if select is None and test is None
               else example_logits(trained, fit[:1], name).shape[1])
    chosen = None if select is None else _gathered(select, "select", classes)
    tests = None if test is None else LabelledImages(test, "test", classes)
    subset = None if tests is None else LabelledImages(test, "test", classes, eval_images)
    cal = Calibration(fit, chosen, tests, subset, None, "given images")
    before = float("nan") if tests is None else evaluate(trained, tests).top1
    return Source(name, trained, {}, name, cal, before)


class LabelledImages:
    """Labelled images given in Python as a conversion evaluates them: ``(images, labels)``
    tensors, or batches of them (a DataLoader yielding ``(images, labels)``); :meth:`batches`
    yields them as deeproots' own loaders do, the first ``limit`` images alone where given,
    each checked (images (N, C, H, W), labels N class indices below ``classes``); data read
    more than once (``reread``) must be more than a generator."""

    def __init__(self, data, what: str, classes: int, limit: Optional[int] = None,
                 reread: bool = True):
        self.data, self.what, self.classes, self.limit = data, what, classes, limit
        if _is_pair(data):
            _check_labelled(*data, what, classes)
        elif isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
            raise DeeprootsError(_labelled_needed(what, data))
        elif reread and iter(data) is data:  # a generator: empty the second time
            raise DeeprootsError(f"{what} is read more than once (before, at each stage, "
                                 f"after): give a DataLoader, a list of batches or (images, "
                                 f"labels), not a {type(data).__name__} that is read once")

    def batches(self):
        """``(images, labels)`` batches, the first ``limit`` images alone where given."""
        pair = _is_pair(self.data)  # checked whole when given; batches each time they come
        pairs = (((self.data[0][i:i + 256], self.data[1][i:i + 256])
                  for i in range(0, len(self.data[0]), 256)) if pair else self.data)
        seen = 0
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise DeeprootsError(_labelled_needed(self.what, item, "a batch of "))
            x, y = item[0], item[1]
            if not pair:
                _check_labelled(x, y, self.what, self.classes)
            if self.limit is not None:
                x, y = x[:self.limit - seen], y[:self.limit - seen]
            yield x.float(), y.long()
            seen += len(y)
            if self.limit is not None and seen >= self.limit:
                return


def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data))


def _labelled_needed(what: str, got, part: str = "") -> str:
    return (f"{what} must be labelled images: (images, labels) tensors, or batches of them (a "
            f"DataLoader yielding (images, labels)); got {part}{type(got).__name__}")


def _check_labelled(images, labels, what: str, classes: int) -> None:
    """A one-line error unless ``images`` (N, C, H, W) and ``labels`` (N class indices, each
    below ``classes``: :func:`~deeproots.training.data.check_labels`) are a labelled
    batch."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DeeprootsError(_labelled_needed(what, images if not isinstance(
            images, torch.Tensor) else labels, "a batch holding "))
    if images.dim() != 4:
        raise DeeprootsError(f"{what}: images must be a batch (N, C, H, W); got shape "
                             f"{tuple(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise DeeprootsError(f"{what}: labels must be class indices, a 1-D integer tensor; got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
    if len(labels) != len(images):
        raise DeeprootsError(f"{what}: {len(images)} images but {len(labels)} labels")
    check_labels(labels, classes, what)


def _gathered(data, what: str, classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labelled images (:class:`LabelledImages`' forms) as one ``(images, labels)`` pair on
    the CPU."""
    pairs = list(LabelledImages(data, what, classes, reread=False).batches())
    if not pairs or not sum(len(y) for _, y in pairs):
        raise DeeprootsError(f"{what}: no images")
    return (torch.cat([x.cpu() for x, _ in pairs]), torch.cat([y.cpu() for _, y in pairs]))


def _convert(source: Source, schedule, budget, started: float, *, eval_images, stages: bool,
             device: str, batch_size: int, prices, progress, rootify_options
             ) -> Tuple[nn.Module, RootifyReport, ConvertedCheckpoint]:
    """What :func:`convert_checkpoint` and :func:`convert_model` share: ``source`` converted
    to ``schedule`` or ``budget``, its stages and the result evaluated where it has test
    images; ``started``: when the command began (its wall time counts from there)."""
    cal = source.cal
    stages = stages and cal.test is not None
    measured: Dict[str, float] = {}
    evaluating = [0.0]  # seconds spent evaluating stages, not converting

    def stage_top1(m) -> float:
        t0 = time.perf_counter()
        top1 = evaluate(m.eval(), cal.test_subset).top1
        evaluating[0] += time.perf_counter() - t0
        return top1

    def stage(stage_name, m):
        measured[stage_name] = stage_top1(m)

    options = {k: v for k, v in rootify_options.items() if k not in ("macs", "params")}
    candidates: List[Dict[str, Any]] = []
    if budget:
        new, report, plan, timed, candidates, stage_table = _convert_to_budget(
            source, budget, prices, options, stage_top1 if stages else None, device,
            batch_size, progress)
        measured.update(stage_table)
    else:
        new, report = rootify(source.trained, schedule, example_input=cal.fit[:1],
                              calibration=source.dense_passes(),
                              on_stage=stage if stages else None,
                              **rootify_options)
        plan, timed = None, {}
    seconds = time.perf_counter() - started - evaluating[0]
    after = float("nan") if cal.test is None else evaluate(new.eval(), cal.test).top1
    report.calibration.stages = dict(measured)
    summary = ConvertedCheckpoint(
        source.checkpoint, report.schedule, cal.data, source.top1_before, after, measured,
        seconds, eval_images=eval_images, groups=report.groups,
        budget=dict(zip(("kind", "fraction"), budget)) if budget else None,
        predicted=plan.predicted if plan else {},
        measured={"macs": report.macs_after, "params": report.params_after,
                  "macs_fraction": report.macs_fraction,
                  "params_fraction": report.params_fraction, **timed},
        candidates=candidates, report=report.to_dict())
    summary.wall_s = time.perf_counter() - started
    return new, report, summary


def _with_data(fields: dict, cal: Calibration, data_dir) -> dict:
    """A source's fields with the data it was calibrated on recorded where it records none
    (a state_dict's): ``deeproots eval`` and ``train --init`` of the file then find it."""
    from dataclasses import asdict as as_dict

    config = fields.get("config") or {}
    if config.get("data"):
        return fields
    config = {"data": cal.data, "image_size": cal.spec.image_size,
              **({"data_dir": str(data_dir)} if data_dir else {}), **config}
    return {**fields, "config": config, "data": fields.get("data") or as_dict(cal.spec)}


def check_device(device: str, flag: str) -> None:
    """A one-line error where ``device`` is not a device this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeeprootsError(f"device {device!r} is not a device name; accepted: cpu, cuda, "
                             f"cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise DeeprootsError(f"{flag} times on cpu or cuda; got device {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (dev.index or 0) >= count:
        there = ["cpu"] + ([f"cuda:0..{count - 1}"] if count else [])
        # an option on the command line (--latency), a keyword from Python (latency)
        how = ("--device " + " or ".join(there) if flag.startswith("--")
               else " or ".join(f"device={d!r}" for d in there))
        raise DeeprootsError(f"{flag} on {device}: this machine has "
                             f"{count or 'no'} CUDA device{'s' if count != 1 else ''}; "
                             f"time on {how}")


def _budget(schedule, latency, options) -> Optional[Tuple[str, float]]:
    """The budget asked for, checked before any work: ``(kind, fraction)``, or None for a
    schedule."""
    given = [(k, v) for k, v in (("latency", latency), ("macs", options.get("macs")),
                                 ("params", options.get("params"))) if v is not None]
    if (schedule is None) == (not given) or len(given) > 1:
        raise DeeprootsError("give a schedule (e.g. 'root-8') or one budget (latency, macs or "
                             "params: a fraction of the dense model's), not both and not "
                             "neither")
    if not given:
        return None
    kind, fraction = given[0]
    return kind, check_fraction(kind, fraction)


def _recorded_top1(source: dict, data: str) -> Optional[float]:
    """The test top-1 the run recorded for this checkpoint (its last epoch's, on the whole
    test split of the data it was trained on), or None where it recorded none."""
    history, config = source.get("history"), source.get("config", {})
    if (not history or source.get("step") or data != config.get("data")
            or config.get("limit_eval_batches")):
        return None
    top1 = history[-1].get("test_top1")
    return float(top1) if isinstance(top1, (int, float)) else None


def _convert_to_budget(source: Source, budget, prices, options, stage_top1, device,
                       batch_size, progress):
    """The schedule a budget buys, converted with calibration. The search proposes
    (:func:`~deeproots.conversion.search.choose`; for latency, refined by measurement:
    :func:`_search_latency`), the best uniform root-N within the budget stands beside its
    proposals, and the best :data:`CANDIDATES` proposals and that root-N are each converted
    with calibration and measured on the selection images (training images apart from the
    calibration ones): the most accurate is the result, so that a search never returns less
    than the uniform schedule it could have. For latency the candidates are first timed
    again side by side (:func:`_timed_together`). ``stage_top1``: a model's top-1 for the stage
    table, evaluated on the chosen candidate's stages alone (None: no stage table). Returns
    the model, its report, its plan, its measured time, every candidate (groups, kind, time,
    predicted and measured top-1) and its stage table."""
    kind, fraction = budget
    trained, cal = source.trained, source.cal
    say = progress or (lambda text: None)
    if prices is None:
        if kind != "latency":  # counted, not measured: refused before minutes of pricing
            check_reachable(kind, fraction, *most_saved(
                trained, cal.fit[:1], ignore=options.get("ignore", ()),
                stem=options.get("stem", "input"))[kind])
        prices = layer_prices(trained, cal.fit, cal.select, batch_size=batch_size,
                              device=device, name=source.name, progress=progress,
                              ignore=options.get("ignore", ()),
                              stem=options.get("stem", "input"))
    if kind != "latency":
        plan = _checked(source, prices, say, lambda: choose(prices, **{kind: fraction}),
                        options.get("batchnorm", "keep"))
        proposals = [(plan, {})]
        uniform = _best_uniform(source, prices, kind, fraction, options)
    else:
        proposals, uniform = _search_latency(source, prices, fraction, options, device,
                                             batch_size, progress)
    candidates = [(p, t, "searched") for p, t in proposals[:CANDIDATES]]
    for plan, timed in uniform:
        if all(p.groups != plan.groups for p, _, _ in candidates):
            candidates.append((plan, timed, "uniform"))
    if kind == "latency" and len(candidates) > 1:
        candidates = _timed_together(source, candidates, fraction, options, device,
                                     batch_size, say)
    best, rows = None, []
    for plan, timed, how in candidates:
        shown: List[Tuple[str, nn.Module]] = []  # its stages' models, evaluated if it wins
        on_stage = None if stage_top1 is None else (
            lambda name, m, shown=shown: shown.append((name, m)))
        new, report = rootify(trained, as_mapping(plan.groups), example_input=cal.fit[:1],
                              calibration=source.dense_passes(), on_stage=on_stage, **options)
        top1 = select_top1(new, cal.select) if len(candidates) > 1 else float("nan")
        plan.predicted = predict(prices, plan.groups)  # the layers alone, as the table says
        rows.append({"kind": how, "groups": dict(plan.groups),
                     "predicted_top1": plan.predicted["top1"], "select_top1": top1,
                     **({"latency_fraction": timed["latency_fraction"]} if timed else {})})
        say(f"{how} {_label(plan.groups)}: " + (
            f"selection top-1 {top1:.4f} (predicted {plan.predicted['top1']:.4f})"
            if len(candidates) > 1 else f"converted, the only candidate (predicted top-1 "
                                        f"{plan.predicted['top1']:.4f})"))
        if best is None or top1 > best[0]:  # a tie keeps the searched proposal
            best = (top1, new, report, plan, timed, shown)
    _, new, report, plan, timed, shown = best
    for row in rows:
        row["chosen"] = row["groups"] == plan.groups
    table = {name: stage_top1(m) for name, m in shown}  # the result's stages alone
    return new, report, plan, timed, rows, table


def _label(groups: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in groups.items()) or "(none)"


def _uniform_groups(source: Source, n: int, options
                    ) -> Tuple[Dict[str, int], RootifyReport, nn.Module]:
    """The per-layer groups root-``n`` gives this model, the report and the structure of that
    build (uncalibrated)."""
    structure, report = rootify(source.trained, f"root-{n}", example_input=source.cal.fit[:1],
                                init="block-diagonal", **options)
    return {k: v for k, v in report.groups.items() if v > 1}, report, structure


def _best_uniform(source: Source, prices: Sensitivity, kind: str, fraction: float, options):
    """The root-N of least N whose multiply-adds (or parameters) are within ``fraction`` of
    the dense model's, as ``[(plan, {})]``; none when none is."""
    for n in ROOT_COUNTS:
        groups, report, _ = _uniform_groups(source, n, options)
        if getattr(report, f"{kind}_fraction") <= fraction:
            return [(Plan(kind, fraction, groups, predict(prices, groups)), {})]
    return []


def _timed_together(source: Source, candidates, fraction: float, options, device,
                    batch_size, say):
    """The candidates of a latency budget timed again, all of them and the dense model side
    by side in one session (each was timed beside the dense model alone before, and on a
    shared CPU two sessions differ by 5-10%): those within the budget (5% over allowed),
    each with its new time; none within: the fastest."""
    size = source.cal.fit[:1].shape[1:]
    models = {}
    for i, (plan, _, _) in enumerate(candidates):
        models[str(i)], _ = rootify(source.trained, as_mapping(plan.groups),
                                    example_input=source.cal.fit[:1], init="block-diagonal",
                                    **options)
    together = measure_latencies(source.trained, models, size, batch_size, device)
    timed = []
    for i, (plan, _, how) in enumerate(candidates):
        t = together[str(i)]
        say(f"{how} {_label(plan.groups)}: measured {t['latency_fraction']:.3f} beside the "
            f"other candidates")
        timed.append((plan, t, how))
    limit = fraction * (1 + LATENCY_TOLERANCE)
    within = [c for c in timed if c[1]["latency_fraction"] <= limit]
    return within or [min(timed, key=lambda c: c[1]["latency_fraction"])]


def _search_latency(source: Source, prices: Sensitivity, fraction: float, options, device,
                    batch_size, progress):
    """Search, build, measure, rescale, search again: each proposal's structure is built
    (no calibration) and timed beside the dense model; the measurement rescales the layers'
    time savings (:func:`latency_scale`) and the search runs again, at most
    :data:`REFINE_ROUNDS` times, until it proposes a schedule already measured. Then each
    root-N from the least N up is timed until one is within the budget. Returns the measured
    proposals within the budget (give or take :data:`LATENCY_TOLERANCE`), best predicted
    top-1 first (none within: the cheapest schedule if it is within, else a one-line
    refusal naming what it measured), each ``(plan, timed)``, and the least
    root-N within the budget as ``(plan, timed)`` (none: an empty list), with the root-N
    before it where that missed the budget by less than the tolerance again."""
    trained, size = source.trained, source.cal.fit[:1].shape[1:]
    say = progress or (lambda text: None)
    measured: Dict[Tuple, Tuple[Plan, Dict[str, float]]] = {}
    limit = fraction * (1 + LATENCY_TOLERANCE)
    scale = 1.0

    def build_and_time(groups):
        structure, _ = rootify(trained, as_mapping(groups), example_input=source.cal.fit[:1],
                               init="block-diagonal", **options)
        return measure_latency(trained, structure, size, batch_size, device)

    batchnorm = options.get("batchnorm", "keep")

    def checked(scale=1.0):  # a proposal, its layers converted alone first
        return _checked(source, prices, say, lambda: choose(prices, latency=fraction,
                                                            scale=scale), batchnorm)

    def cheapest_within():  # the cheapest schedule, measured: within the budget, or a refusal
        groups = cheapest(prices)
        key = tuple(sorted(groups.items()))
        timed = measured[key][1] if key in measured else build_and_time(groups)
        say(f"the cheapest schedule measured {timed['latency_fraction']:.3f}")
        if timed["latency_fraction"] > limit:
            raise DeeprootsError(
                f"no schedule brings latency to {fraction:g} of the dense model's: the cheapest "
                f"schedule (every groupable layer at its largest count) measured "
                f"{timed['latency_fraction']:.3f} on {device}. Accepted: "
                f"{timed['latency_fraction']:.3f} or more")
        plan = Plan("latency", fraction, groups, predict(prices, groups))
        measured[key] = (plan, timed)
        return plan, timed

    try:
        plan = checked()
    except DeeprootsError:  # the layers alone say no: does the whole model?
        plan, timed = cheapest_within()
        scale = latency_scale(prices, plan.groups, timed["latency_fraction"])
        try:
            plan = checked(scale)
        except DeeprootsError:  # within the tolerance only: the cheapest it is
            pass
    for _ in range(REFINE_ROUNDS + 1):
        key = tuple(sorted(plan.groups.items()))
        if key in measured:
            break
        timed = build_and_time(plan.groups)
        measured[key] = (plan, timed)
        say(f"groups {_label(plan.groups)}: predicted "
            f"{plan.predicted['latency_fraction']:.3f}, measured "
            f"{timed['latency_fraction']:.3f}")
        scale = latency_scale(prices, plan.groups, timed["latency_fraction"])
        try:
            plan = checked(scale)
        except DeeprootsError:
            break
    uniform, near = [], None
    for n in ROOT_COUNTS:
        groups, _, structure = _uniform_groups(source, n, options)
        key = tuple(sorted(groups.items()))
        if key in measured:  # a proposal already: it stays one
            timed = measured[key][1]
        else:
            timed = measure_latency(trained, structure, size, batch_size, device)
        say(f"root-{n}: measured {timed['latency_fraction']:.3f}")
        here = (Plan("latency", fraction, groups, predict(prices, groups)), timed)
        if timed["latency_fraction"] <= limit:
            # and the root-N before it, where it missed by the noise between two sessions:
            # it is timed again beside the others (_timed_together)
            uniform = [here] + ([near] if near else [])
            break
        near = here if timed["latency_fraction"] <= limit * (1 + LATENCY_TOLERANCE) else None
    within = [(p, t) for p, t in measured.values() if t["latency_fraction"] <= limit]
    if within:
        within.sort(key=lambda pt: -pt[0].predicted["top1"])
        return within, uniform
    if uniform:
        return [], uniform
    # the layers' prices said yes and no measurement agreed: the whole model decides
    return [cheapest_within()], []


def _checked(source: Source, prices: Sensitivity, say, propose, batchnorm: str = "keep"
             ) -> Plan:
    """The search's proposal once the layers it groups are checked: each (layer, count) of
    it not checked yet is converted alone by the calibrated pipeline (the 1x1 conv after it
    refit, the batch norms as ``batchnorm`` says) and its divergence on the selection images
    recorded in ``prices.verified``, which rescales that layer's priced divergences
    (:meth:`Sensitivity.kl_of`); the search runs again until it proposes only checked layers
    (at most :data:`CHECK_ROUNDS` rounds); the proposals a time measurement refines are
    checked the same way. The closed-form price is one layer's least-squares refit in the
    dense model; the conversion also refits the 1x1 conv after it and (``"reestimate"``)
    recomputes the batch norms, which on a model whose statistics drifted in training
    made a layer cost three times its price (a one-epoch resnet50's layer4)."""
    plan = propose()
    reference = None
    for _ in range(CHECK_ROUNDS):
        todo = [(k, g) for k, g in plan.groups.items() if f"{k}@{g}" not in prices.verified]
        if not todo:
            break
        if reference is None:  # read once, and only when something is to be checked
            reference = selection_scores(source.trained, source.cal.select)[2]
        passes = source.dense_passes()
        for layer, g in todo:
            alone, _ = calibrate(source.trained, {layer: g}, passes, refit="root",
                                 batchnorm=batchnorm)
            kl = selection_scores(alone, source.cal.select, reference)[1]
            prices.verified[f"{layer}@{g}"] = kl
            priced = next(o.kl for p in prices.layers if p.layer == layer
                          for o in p.options if o.groups == g)
            say(f"{layer} at {g} groups, converted alone: KL {kl:.4f} (priced "
                f"{priced if priced is None else round(priced, 4)})")
        plan = propose()
    return plan


def as_mapping(groups: Dict[str, int]) -> Dict[str, int]:
    """A plan's ``{layer: groups}`` as rootify's schedule: each name a pattern matching
    itself alone (a layer named ``a[0]`` is not a character class)."""
    return {glob.escape(layer): g for layer, g in groups.items()}


def measure_latency(dense: nn.Module, new: nn.Module, size, batch_size: int, device: str,
                    repeats: int = 10) -> Dict[str, float]:
    """The dense and converted models' ms per batch in the ``fold`` path, timed side by
    side, and the converted one's as a fraction of the dense one's."""
    return measure_latencies(dense, {"converted": new}, size, batch_size, device,
                             repeats)["converted"]


def measure_latencies(dense: nn.Module, models: Dict[str, nn.Module], size, batch_size: int,
                      device: str, repeats: int = 10) -> Dict[str, Dict[str, float]]:
    """Each of ``models`` and the dense model timed side by side in one session, as
    :func:`measure_latency` times one: for each name its ``ms``, the dense ``ms_dense``, its
    ``latency_fraction`` and, where it is known, ``others``: the share of the CPUs other
    processes used meanwhile (a loaded machine's ratios are not a quiet one's)."""
    ms, others = model_ms({"": dense, **{f"m{name}": m for name, m in models.items()}}, size,
                          batch_size, device, repeats)
    return {name: {"ms_dense": ms[""], "ms": ms[f"m{name}"],
                   "latency_fraction": ms[f"m{name}"] / ms[""],
                   **({} if others is None else {"others": others})} for name in models}


def price_checkpoint(checkpoint: Union[str, Path], *, data: Optional[str] = None,
                     data_dir=None, model=None, device: str = "cpu", batch_size: int = 128,
                     image_size: Optional[int] = None, mean=None, std=None,
                     calibration_images_n: Optional[int] = None, download: bool = True,
                     progress=None, ignore=(), stem: str = "input") -> Sensitivity:
    """Each groupable layer's price (:func:`~deeproots.conversion.sensitivity.layer_prices`)
    for the trained model of ``checkpoint``, on the training split of ``data`` (calibration
    and selection images), timed on ``device`` at ``batch_size``: ``deeproots rootify
    CHECKPOINT --sensitivity``."""
    check_device(device, "--sensitivity")
    source = open_source(checkpoint, model=model, data=data, data_dir=data_dir,
                         image_size=image_size, calibration_images_n=calibration_images_n,
                         select_images=SELECT_IMAGES, eval_images=1, download=download,
                         top1=False, mean=mean, std=std)
    return layer_prices(source.trained, source.cal.fit, source.cal.select,
                        batch_size=batch_size, device=device, name=source.name,
                        progress=progress, ignore=ignore, stem=stem)
