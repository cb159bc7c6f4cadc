"""Settings and their accepted values, in one place and torch-free: the training
configuration, the learning-rate schedule, and the names of the inference paths, dtypes and
modes that the library accepts. The command line builds its flags and choices from these, so
a default or a list of choices lives here alone."""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import DeeprootsError
from .speed.paths import (GROUPED_CONV, LAYER_PATHS, PATHS, TRITON_PATHS,
                          TRITON_VERIFIED_ON_GPU, UNVERIFIED)
from .checks import (check_choice, check_device, check_number, check_optional_positive,
                     check_positive, check_range, check_seed, check_whole)

__all__ = ["TrainConfig", "LR_SCHEDULES", "OPTIMIZERS", "DEFAULT_LR", "FINETUNE_LR",
           "FINETUNE_EPOCHS", "FINETUNE_OPT", "finetune_optimizer", "per_optimizer",
           "RESUMABLE_SETTINGS", "lr_at", "warmup_steps", "PATHS",
           "LAYER_PATHS", "EXPORT_FORMATS", "TRITON_VERIFIED_ON_GPU", "TRITON_PATHS", "UNVERIFIED",
           "DTYPES", "MODES", "DATA_HELP", "config_defaults", "COMPILE_MODES", "GROUPED_CONV",
           "setting_differences", "given_settings", "STEMS", "BATCHNORMS", "MEMORY_FORMATS"]

LR_SCHEDULES = ("cosine", "step")
# the optimizers of deeproots train (timm's --opt names): SGD with momentum, the paper's; AdamW
OPTIMIZERS = ("sgd", "adamw")
# the peak learning rate where none is given: of a training, and of a fine-tune (--init)
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
FINETUNE_LR = {"sgd": 0.01, "adamw": 3e-4}
# a fine-tune's defaults: a fraction of a training, by AdamW, which recovers more of what a
# conversion lost than SGD in as many steps (docs/conversion.md, "closing the gap")
FINETUNE_EPOCHS, FINETUNE_OPT = 1, "adamw"
# the inference paths and grouped-conv lowerings: one table, deeproots.speed.paths
# deployment formats (deeproots.speed.export): torch.export's .pt2, an AOTInductor package,
# ONNX, TorchScript (deprecated by PyTorch 2.13)
EXPORT_FORMATS = ("pt2", "aoti", "onnx", "torchscript")
DTYPES = ("float32", "bfloat16")
# torch.compile modes for the training step (deeproots.training.step); reduce-overhead:
# CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MODES = ("inference", "train")
# how the training step lays out its tensors (deeproots.training.step); auto: channels-last
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")
STEMS = ("input", "resolution")  # rootify's stems: convs reading the input, or its resolution
# a calibrated conversion's batch norms: the trained running statistics, or recomputed
BATCHNORMS = ("keep", "reestimate")
ROOFLINE_DEVICES = ("h100", "h200", "a100", "cpu")  # data-sheet GPUs, or this CPU measured
ROOFLINE_DTYPES = ("bfloat16", "float16", "float32")
DATA_HELP = "fashion-mnist, cifar10 or imagefolder:PATH (PATH/train, PATH/val)"
WARMUP_FRACTION = 0.05  # default warm-up: 5% of the run, at most one epoch
# distillation temperatures accepted: Hinton et al. use 1-20; below 0.1 the softened
# logits overflow, above 100 the soft targets are uniform to float32's precision
DISTILL_TEMPERATURES = (0.1, 100.0)
GROUP_LASSO_MAX = 1.0  # the penalty's weight: 1e-4 to 1e-2 in use; 1 already swamps the loss


def per_optimizer(values: Mapping[str, float]) -> str:
    """``DEFAULT_LR`` or ``FINETUNE_LR`` as help text: "0.1 with sgd, 0.001 with adamw"."""
    return ", ".join(f"{v:g} with {k}" for k, v in values.items())


def finetune_optimizer(opt: Optional[str] = None, lr: Optional[float] = None) -> tuple:
    """A fine-tune's ``(opt, lr)``: those given, else :data:`FINETUNE_OPT` and the
    optimizer's :data:`FINETUNE_LR` (None for an optimizer not known: refused by the
    config's check, by name)."""
    opt = opt or FINETUNE_OPT
    return opt, (lr if lr is not None else FINETUNE_LR.get(opt))


def _opt(default: Any, help: str, **meta) -> Any:
    """A dataclass field with its command-line help (and options) as metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint and summary."""

    model: Optional[str] = _opt(None, "model name (deeproots list) or FILE.py:FUNCTION, a "
                                "function of yours that returns the model (with --init: "
                                "the checkpoint's, unless it is a model of your own)",
                                positional=True)
    rootify: Optional[str] = _opt(None, "first make the model a root network with this "
                                  "schedule (root-N, tree-N, col-N; see deeproots rootify)")
    init: Optional[str] = _opt(None, "start from the model and weights of this checkpoint, "
                               "e.g. a converted one (deeproots rootify RUN/best.pt --out "
                               "FILE.pt); the model name is then the checkpoint's. On the "
                               "command line a fine-tune's defaults are 1 epoch by "
                               f"{FINETUNE_OPT} at a lower learning rate (see --opt, --lr)",
                               metavar="FILE")
    distill: Optional[str] = _opt(None, "a trained checkpoint to distil from: the loss adds "
                                  "the KL divergence to its softened logits", metavar="TEACHER")
    distill_temperature: float = _opt(4.0, "with --distill: the softmax temperature")
    distill_weight: float = _opt(0.5, "with --distill: the KL term's weight, from 0 to 1 (the "
                                 "cross-entropy gets the rest)")
    learn_groups: Optional[str] = _opt(None, "train the model to be groupable to this schedule "
                                       "(root-N, ...): a group-lasso penalty on the weights "
                                       "outside each layer's blocks, the assignment "
                                       "re-estimated each epoch; converted at the end",
                                       metavar="SCHEDULE")
    group_lasso: float = _opt(1e-3, "with --learn-groups: the penalty's weight")
    data: str = _opt("fashion-mnist", DATA_HELP)
    data_dir: Optional[str] = _opt(None, "where the dataset files are (default: "
                                   "$DEEPROOTS_DATA, then standard places)")
    out: Optional[str] = _opt(None, "output folder (default runs/MODEL-DATA-seedN)")
    epochs: int = _opt(10, "epochs to train")
    batch_size: int = _opt(128, "global batch size, split over torchrun processes")
    opt: str = _opt("sgd", "optimizer: sgd (with momentum, the paper's) or adamw; a "
                    f"fine-tune's, with --init, is {FINETUNE_OPT}", choices=OPTIMIZERS)
    lr: Optional[float] = _opt(None, f"peak learning rate (default {per_optimizer(DEFAULT_LR)}; a "
                               f"fine-tune's, with --init: {per_optimizer(FINETUNE_LR)})")
    momentum: float = _opt(0.9, "SGD momentum, from 0 to below 1")
    weight_decay: float = _opt(5e-4, "weight decay, not on biases and batch norm (L2 with sgd, "
                               "decoupled with adamw)")
    schedule: str = _opt("cosine", "learning-rate schedule after the warm-up",
                         choices=LR_SCHEDULES)
    warmup_epochs: Optional[float] = _opt(
        None, f"linear warm-up in epochs (default: {100 * WARMUP_FRACTION:g}%% of the run, at "
        "most one epoch)")
    step_milestones: List[float] = _opt([0.5, 0.75], "with --schedule step: fractions of the "
                                        "run where the rate drops", nargs="+")
    step_gamma: float = _opt(0.1, "with --schedule step: factor at each milestone")
    aux_weight: float = _opt(0.3, "weight of GoogLeNet's auxiliary losses")
    seed: int = _opt(0, "random seed (data order, augmentation, initialisation)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    workers: int = _opt(4, "image-folder decoding processes (at most the CPUs usable)")
    image_size: int = _opt(224, "crop size for image folders")
    in_channels: Optional[int] = _opt(None, "with an image folder: read its images with this "
                                      "many channels, 1 (greyscale: timm's --in-chans 1 with "
                                      "--input-img-mode L; give --mean and --std) or 3 (the "
                                      "default); the model is built for them")
    mean: Optional[List[float]] = _opt(None, "with an image folder: the mean its images are "
                                       "normalised with, per channel on the 0..1 scale (as "
                                       "timm takes it; default ImageNet's)", nargs="+",
                                       metavar="V")
    std: Optional[List[float]] = _opt(None, "with an image folder: the standard deviation, "
                                      "likewise", nargs="+", metavar="V")
    limit_train_batches: Optional[int] = _opt(None, "batches per epoch (default: all)")
    limit_eval_batches: Optional[int] = _opt(None, "test batches (default: all)")
    resume: bool = _opt(False, "continue the run in --out with its own settings "
                        "(`deeproots train --resume --out DIR` is enough)")
    overwrite: bool = _opt(False, "replace a run already in --out")
    change: List[str] = _opt([], "with --resume: settings allowed to differ from the run's "
                             "(e.g. --change epochs); each change is recorded", nargs="+",
                             metavar="SETTING")
    compile: Optional[str] = _opt(
        None, "compile the training step with torch.compile, in this mode (default; "
        "reduce-overhead: CUDA graphs; max-autotune); the first step's compile time is "
        "reported, and a failure falls back to eager with a warning", choices=COMPILE_MODES,
        nargs="?", const="default", metavar="MODE")
    grouped_conv: str = _opt(
        "auto", "how grouped convs run: native (PyTorch: cuDNN, oneDNN), triton (deeproots' "
        f"kernels, CUDA; {UNVERIFIED}), dispatch (the fastest of native, triton, "
        "block-diagonal dense and split, measured per layer on the first step; CUDA; "
        f"{UNVERIFIED}), auto (native" + (", dispatch on CUDA with Triton installed and no "
                                          "--compile" if TRITON_VERIFIED_ON_GPU else "") +
        ")", choices=GROUPED_CONV)
    memory_format: str = _opt(
        "auto", "the step's memory layout: channels-last, contiguous (NCHW), or auto "
        "(channels-last, the faster on GPUs and CPUs alike; a resumed run keeps its own)",
        choices=MEMORY_FORMATS)
    log_every: int = _opt(50, "steps between step records (training loss, learning rate, "
                          "images/s) in metrics.jsonl, curves.png and TensorBoard; also one "
                          "at least every 30 s")
    tensorboard: bool = _opt(False, "also write TensorBoard event files to OUT/tensorboard "
                             "(pip install tensorboard)")
    checkpoint_every_min: float = _opt(5.0, "minutes between mid-epoch checkpoints (0: "
                                       "only at the end of each epoch)")
    progress: Optional[bool] = _opt(None, "no progress bar", flag="--no-progress", const=False)
    download: bool = _opt(True, "never download data", flag="--no-download", const=False)

    def _check_folder_reading(self) -> None:
        """in_channels, mean and std read an image folder, for a new model."""
        given = [f"--{n.replace('_', '-')}" for n in ("in_channels", "mean", "std")
                 if getattr(self, n) is not None]
        if given and not str(self.data).startswith("imagefolder:"):
            many = len(given) > 1
            raise DeeprootsError(f"{' and '.join(given)} set{'' if many else 's'} how an image "
                                 f"folder's images are read; {self.data}'s are read as its "
                                 f"table says: leave {'them' if many else 'it'} out")
        if self.in_channels is not None and self.in_channels not in (1, 3):
            raise DeeprootsError(f"in_channels must be 1 (greyscale) or 3 (RGB); got "
                                 f"{self.in_channels!r}")
        if self.in_channels is not None and self.init:
            raise DeeprootsError("in_channels sets a new model's image channels; a fine-tune "
                                 "(--init) reads its images as its model's were: leave it out")

    def check(self) -> "TrainConfig":
        """ValueError for settings that cannot work, naming the value and what is accepted,
        or that would be ignored (a setting of an option not given)."""
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_positive("image_size", self.image_size)
        self._check_folder_reading()
        check_optional_positive("limit_train_batches", self.limit_train_batches)
        check_optional_positive("limit_eval_batches", self.limit_eval_batches)
        check_choice("opt", self.opt, OPTIMIZERS)
        if self.lr is not None:
            check_number("lr", self.lr, strict=True)
        check_number("momentum", self.momentum)
        if self.momentum >= 1:
            raise DeeprootsError(f"momentum must be from 0 to below 1; got {self.momentum!r}")
        if self.opt != "sgd" and self.momentum != _DEFAULTS["momentum"]:
            raise DeeprootsError(f"momentum = {self.momentum!r} sets SGD's momentum, but opt is "
                                 f"{self.opt!r}; give --opt sgd too, or leave momentum out")
        check_number("weight_decay", self.weight_decay)
        if self.warmup_epochs is not None:
            check_number("warmup_epochs", self.warmup_epochs)
        check_number("step_gamma", self.step_gamma, strict=True)
        check_number("aux_weight", self.aux_weight)
        check_number("checkpoint_every_min", self.checkpoint_every_min)
        check_range("distill_temperature", self.distill_temperature, *DISTILL_TEMPERATURES)
        check_range("distill_weight", self.distill_weight, 0.0, 1.0)
        check_range("group_lasso", self.group_lasso, 0.0, GROUP_LASSO_MAX)
        for name, needs in (("distill_temperature", "distill"), ("distill_weight", "distill"),
                            ("group_lasso", "learn_groups")):
            if getattr(self, name) != _DEFAULTS[name] and not getattr(self, needs):
                raise DeeprootsError(f"{name} = {getattr(self, name)!r} sets the --"
                                     f"{needs.replace('_', '-')} part of training, but "
                                     f"{needs} is not given; give --{needs.replace('_', '-')} "
                                     f"too, or leave {name} out")
        if self.init and self.rootify:
            raise DeeprootsError("give init (a converted model) or rootify (a schedule to "
                                 "convert with), not both")
        if self.learn_groups and (self.init or self.rootify):
            raise DeeprootsError("learn_groups trains a dense model to be groupable: give it "
                                 "without init or rootify")
        for name in self.change:
            if name not in RESUMABLE_SETTINGS:
                raise DeeprootsError(f"change takes settings of the run "
                                     f"({', '.join(RESUMABLE_SETTINGS)}); got {name!r}")
        for m in self.step_milestones:
            check_number("step_milestones", m)
        check_choice("schedule", self.schedule, LR_SCHEDULES)
        if self.compile is not None:
            check_choice("compile", self.compile, COMPILE_MODES)
        check_choice("grouped_conv", self.grouped_conv, GROUPED_CONV)
        check_choice("memory_format", self.memory_format, MEMORY_FORMATS)
        check_positive("log_every", self.log_every)
        check_seed(self.seed)
        check_whole("workers", self.workers)
        check_device(self.device)
        if self.model is None and not self.init and not self.resume:
            raise DeeprootsError("name a model to train (deeproots list shows them), start "
                                 "from a checkpoint with --init FILE.pt, or continue a run "
                                 "with --resume --out DIR")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise DeeprootsError(f"model must be a model name or FILE.py:FUNCTION; got "
                                 f"{self.model!r}")
        return self

    @property
    def peak_lr(self) -> float:
        """The peak learning rate: ``lr``, or where it is not given the optimizer's default
        (:data:`DEFAULT_LR`; a new run records it as ``lr``)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.opt]


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}

# the settings that define a run: a resumed run keeps the checkpoint's unless --change names them
RESUMABLE_SETTINGS = ("model", "rootify", "init", "distill", "distill_temperature",
                      "distill_weight", "learn_groups", "group_lasso", "data", "epochs",
                      "batch_size", "opt", "lr", "momentum", "weight_decay", "schedule",
                      "warmup_epochs", "step_milestones", "step_gamma", "aux_weight", "seed",
                      "image_size", "in_channels", "mean", "std", "limit_train_batches",
                      "memory_format")


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def setting_differences(saved: Mapping[str, Any], given: Mapping[str, Any],
                        names: Sequence[str] = RESUMABLE_SETTINGS) -> List[tuple]:
    """``(name, saved value, given value)`` for each setting in ``names`` that ``given``
    sets to another value than ``saved`` holds (lists and tuples compare alike): the one
    comparison behind a resumed run and a study's runs."""
    out = []
    for name in names:
        if name not in given:
            continue
        old, new = _comparable(saved.get(name)), _comparable(given[name])
        if old != new:
            out.append((name, saved.get(name), given[name]))
    return out


def given_settings(cfg: "TrainConfig") -> Dict[str, Any]:
    """The fields of ``cfg`` that differ from :class:`TrainConfig`'s defaults, and those it
    names in ``change``: what a caller of the Python API set, when it resumes a run with a
    config instead of the command line's flags."""
    defaults = config_defaults(TrainConfig)
    return {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)
            if _comparable(getattr(cfg, f.name)) != _comparable(defaults[f.name])
            or f.name in cfg.change}


def config_defaults(cls) -> Dict[str, Any]:
    """The default of every field of a config dataclass."""
    return {f.name: (f.default if f.default is not MISSING else f.default_factory())
            for f in fields(cls)}


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in steps: ``warmup_epochs`` when set, else 5% of the run's steps but at
    most one epoch, so a short run still decays."""
    if cfg.warmup_epochs is not None:
        return int(cfg.warmup_epochs * steps_per_epoch)
    return min(steps_per_epoch, math.ceil(WARMUP_FRACTION * cfg.epochs * steps_per_epoch))


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate at global ``step``: linear warm-up, then cosine to 0 or steps of
    ``step_gamma`` at the ``step_milestones`` (fractions of the run)."""
    total = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    if step < warmup:
        return cfg.peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.peak_lr * 0.5 * (1 + math.cos(math.pi * progress))
    passed = sum(step >= m * total for m in cfg.step_milestones)
    return cfg.peak_lr * cfg.step_gamma ** passed
