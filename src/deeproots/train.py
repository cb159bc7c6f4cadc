"""Training and evaluation with the paper's recipe (Sections 4.1, 4.3): SGD with momentum and
weight decay, He initialisation and batch norm (in the models), a step or cosine learning-rate
schedule with warm-up, random crops and mirroring.

Nothing is lost: a checkpoint is written atomically after every epoch, every few minutes
within an epoch, and when the run is stopped (Ctrl-C, SIGTERM); ``resume=True`` continues
from it, batch for batch, to the same weights an uninterrupted run reaches, with the
settings the run was started with (:func:`deeproots.checkpoint.resume_config`). The run
folder (:mod:`deeproots.rundir`) is never overwritten unless asked, and then only once the
new run has its first checkpoint; its lock keeps a second process out. A loss, weight or
test loss that is not finite stops the run, keeping the last good checkpoint. Under
``torchrun`` the run is data-parallel (DistributedDataParallel; nccl on GPU, gloo on CPU);
rank 0 writes every file.

The loop reads top to bottom: :func:`_setup` (everything checked before anything is
written), :func:`_resume`, :func:`_start`, then per epoch :func:`_train_epoch` and
:func:`_end_epoch`, and :func:`_finish`.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import __version__
from .checkpoint import (CheckpointError, changes_of, config_from_checkpoint, load_checkpoint,
                         model_from_checkpoint, resume_config, save_checkpoint, save_model)
from .config import TrainConfig, lr_at
from .conversion import rootify
from .costs import profile
from .data import DataSpec, build_loaders, sample_images
from .errors import DeeprootsError
from .layers import conv_layers, example_logits, main_logits
from .plots import plot_training_curves
from .registry import (build_model, check_model_spec, file_digest, is_model, is_user_model,
                       model_entry, model_slug,
                       model_source_digest, resolve_model_spec)
from .rundir import RUN_FILES, RunFolder
from .runtime import allocator, check_output_dir, resolve_device, write_json
from .step import (Distillation, GroupLasso, Layout, TrainStep, choose_layout, make_optimizer,
                   resolve_grouped_conv)

__all__ = ["TrainConfig", "train", "evaluate", "load_checkpoint", "save_checkpoint",
           "model_from_checkpoint", "config_from_checkpoint", "load_for_eval",
           "TrainingDiverged", "CheckpointError", "Interrupted", "EvalResult", "TrainSummary",
           "lr_at", "RUN_FILES", "default_out", "resume_command"]


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the test loss became NaN or infinite."""


class Interrupted(Exception):
    """The run was stopped by a signal after writing its checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, command: str = ""):
        self.signum, self.checkpoint, self.command = signum, checkpoint, command
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")


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


@dataclass
class TrainSummary:
    """What a finished run reached (``summary.json``): final test ``top1``/``top5``/``loss``,
    the best top-1, the model's multiply-adds and params at the data's input size, wall time
    in seconds, training images per second, where it ran, and its full config."""

    model: str
    data: str
    macs: int
    params: int
    top1: Optional[float]
    top5: Optional[float]
    loss: Optional[float]
    best_top1: float
    epochs: int
    wall_s: float
    train_images_per_s: float
    device: str
    world_size: int
    versions: Dict[str, str]
    allocator: str
    config: dict
    checkpoint: str
    out: str
    changes: List[dict] = field(default_factory=list)
    compile_s: Optional[float] = None  # seconds of the first compiled step, if compiled
    compile_error: Optional[str] = None  # why torch.compile fell back to eager, if it did
    grouped_conv: str = "native"  # how grouped convs ran (native, triton, dispatch)
    memory_format: str = "contiguous"  # the step's layout: channels-last or contiguous
    files: List[str] = field(default_factory=list)  # the run's files, as written
    kernel_notes: List[str] = field(default_factory=list)  # kernels dropped on first use
    learned_groups: Optional[dict] = None  # --learn-groups: weight kept, top-1 converted

    def to_dict(self) -> dict:
        return asdict(self)


def load_for_eval(checkpoint: Path | str, *, data: Optional[str] = None, data_dir=None,
                  batch_size: int = 256, device: str = "auto", workers: int = 4,
                  limit_eval_batches: Optional[int] = None, download: bool = True,
                  model: Union[None, str, nn.Module] = None):
    """The model of ``checkpoint`` on its device (eval mode), and the test split of ``data``
    (default: the data it was trained on). Returns ``(model, test_loader, spec, state,
    device)``. ``model``: for a model of your own, its ``FILE.py:FUNCTION`` or the module."""
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint, map_location=dev)
    model = model_from_checkpoint(state, checkpoint, model).to(dev).eval()
    config = state["config"]
    data = data or config.get("data")
    _, test_loader, spec = build_loaders(
        data, data_dir=data_dir or config.get("data_dir"), batch_size=batch_size, device=dev,
        workers=workers, image_size=config.get("image_size", 224),
        limit_eval_batches=limit_eval_batches, download_ok=download)
    classes = getattr(model, "num_classes", None)
    if classes is None:  # a model of the user's own: count its outputs
        classes = example_logits(model, torch.zeros(
            1, spec.in_channels, spec.image_size, spec.image_size, device=dev)).shape[1]
    if spec.num_classes != classes:
        raise DeeprootsError(f"{checkpoint} has {classes} classes but {data} has "
                             f"{spec.num_classes}")
    return model, test_loader, spec, state, dev


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE)


def _dist_setup(device: torch.device) -> Tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist  # only under torchrun

    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl needs this process's GPU as current
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_sum(values: List[float], device) -> List[float]:
    import torch.distributed as dist  # only under torchrun

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Evaluation


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
    loss_sum, top1, top5, n = _all_sum([loss_sum, top1, top5, n], device)
    model.train(was_training)
    if n == 0:
        raise DeeprootsError("the evaluation data is empty")
    return EvalResult(loss_sum / n, top1 / n, top5 / n, int(n))


# ---------------------------------------------------------------------------------------------
# Training


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is never taken
    half-way through an optimizer step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def default_out(cfg: TrainConfig) -> Path:
    """``runs/MODEL-DATA-seedN``: where a run goes without ``out`` (``FILE-FUNCTION`` for a
    model of your own; ``INIT-finetune-...`` for a run that starts from the checkpoint
    ``INIT.pt``, ``MODEL-groupable-SCHEDULE-...`` for one that learns groups), so that a
    fine-tune never lands in the folder of the run it came from."""
    data = cfg.data.split(":")[0]
    if cfg.init:
        name = f"{_slug(Path(cfg.init).stem)}-finetune"
    elif cfg.learn_groups:
        name = f"{model_slug(cfg.model)}-groupable-{cfg.learn_groups}"
    else:
        name = model_slug(cfg.model)
    return Path("runs") / f"{name}-{data}-seed{cfg.seed}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text) or "run"


def resume_command(cfg: TrainConfig, out: Path | str) -> str:
    """The command that continues the run in ``out``, from any folder: the folder's
    absolute path, and a model of your own named (deeproots never runs code a checkpoint
    names)."""
    model = f"{resolve_model_spec(cfg.model)} " if is_user_model(cfg.model) else ""
    return f"deeproots train {model}--resume --out {os.path.abspath(out)}"


def _versions() -> dict:
    return {"deeproots": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _bytes_free(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_batch(model: nn.Module, cost, per_rank: int, device: torch.device) -> None:
    """Refuse a batch that cannot train: one image per process with batch norm, or more
    activations than the device has memory for (estimated: each conv and linear output
    kept about four times over, float32, for the backward pass)."""
    if per_rank == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                             for m in model.modules()):
        raise DeeprootsError(f"batch size 1 per process cannot train {model.name}: batch norm "
                             f"needs at least 2 images; use --batch-size 2 or more")
    per_image = 4 * 4 * sum(math.prod(layer.output_shape) * layer.calls
                            for layer in cost.layers if layer.output_shape)
    free = _bytes_free(device)
    if free and per_image * per_rank > free:
        fits = max(1, free // per_image)
        raise DeeprootsError(f"batch size {per_rank} needs about {_size(per_image * per_rank)} "
                             f"of activations to train {model.name}; {_size(free)} is free on "
                             f"{device}. The largest batch that fits is about {fits}")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class _Run:
    """The state of one training run, shared by the steps of :func:`train`: every field is
    declared here; :func:`_setup` fills them, the loop updates the position and records."""

    cfg: TrainConfig
    device: torch.device
    folder: RunFolder
    rank: int = 0
    world: int = 1
    writer: bool = True  # rank 0 writes the run's files
    state: Optional[dict] = None  # the checkpoint a resumed run continues
    seen: Optional[tuple] = None  # its last.pt as loaded (size, mtime), checked again
    init_state: Optional[dict] = None  # a fine-tune's --init checkpoint, loaded once
    changes: List[dict] = field(default_factory=list)
    spec: Optional[DataSpec] = None
    train_loader: Any = None
    test_loader: Any = None
    model: Optional[nn.Module] = None  # the model (its state dict is the checkpoint's)
    net: Optional[nn.Module] = None  # what runs forward: the model, or its DDP wrapper
    cost: Any = None  # its Profile at the data's input size
    optimizer: Optional[torch.optim.Optimizer] = None
    layout: Optional[Layout] = None  # memory format and autocast, the step's
    step_fn: Optional[TrainStep] = None
    distillation: Optional[Distillation] = None  # --distill: the teacher
    penalty: Optional[GroupLasso] = None  # --learn-groups: the group-lasso penalty
    # the position: epochs finished, steps into the next one, the history of finished epochs
    epoch: int = 0
    step: int = 0
    history: List[dict] = field(default_factory=list)
    best_top1: float = -1.0
    wall_before: float = 0.0  # seconds the run ran before this process
    sums: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # loss, correct,
    # seen, seconds of the epoch so far
    steps: List[dict] = field(default_factory=list)  # step records (every log_every steps)
    log_mark: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # the sums
    # at the last step record of this epoch
    logged_at: float = field(default_factory=time.perf_counter)  # when it was made
    board: Any = None  # the TensorBoard writer, with --tensorboard
    compile_recorded: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _build(run: _Run, spec: DataSpec, model: Optional[nn.Module]) -> nn.Module:
    """The model to train: a resumed run's from its own checkpoint (its architecture and
    groups; the weights are loaded by :func:`_resume`), a fine-tune's from its ``init``
    checkpoint, else built by name or ``FILE.py:FUNCTION`` (or a copy of ``model``) and made
    a root network when ``cfg.rootify`` says so; checked against the data. A name a
    checkpoint holds is never run as code: a model of your own is rebuilt only from the
    ``FILE.py:FUNCTION`` (or module) the caller gave."""
    cfg = run.cfg
    size = (spec.in_channels, spec.image_size, spec.image_size)
    own = model if model is not None else (cfg.model if is_user_model(cfg.model) else None)
    how = f"name it: deeproots train FILE.py:FUNCTION --init {cfg.init or 'FILE'}"
    if run.state is not None:  # resumed: no init or rootify needed again
        built = model_from_checkpoint(run.state, run.folder.last, own, how=how)
        built.name, built.deeproots_cfg = cfg.model, _builder_cfg(run.state["model_cfg"])
    elif cfg.init:  # a converted (or any trained) model: its architecture and weights
        built = model_from_checkpoint(run.init_state, cfg.init, own, how=how)
        built.name = cfg.model
    elif model is not None:
        built = copy.deepcopy(model)
        built.name = cfg.model
        built.deeproots_cfg = {"name": cfg.model, "kwargs": {}}
    else:
        built = build_model(cfg.model, num_classes=spec.num_classes,
                            in_channels=spec.in_channels)
    if cfg.rootify and run.state is None:
        name, built_cfg = built.name, built.deeproots_cfg
        built, _ = rootify(built, cfg.rootify, example_input=torch.zeros(1, *size))
        built.name, built.deeproots_cfg = name, built_cfg
    out = example_logits(copy.deepcopy(built), torch.zeros(1, *size), cfg.model)
    if out.shape[1] != spec.num_classes:
        raise DeeprootsError(f"{cfg.model} gives outputs of shape {tuple(out.shape)} for one "
                             f"{'x'.join(map(str, size))} image; {spec.name} needs "
                             f"(1, {spec.num_classes}): one score per class")
    return built


def _builder_cfg(model_cfg: dict) -> dict:
    """What rebuilds a checkpoint's model: its name and arguments (its groups are the
    checkpoint's own record)."""
    return {k: v for k, v in model_cfg.items() if k not in ("groups", "source_sha256")}


def _init_model(cfg: TrainConfig, state: dict, model: Optional[nn.Module]) -> str:
    """The model a fine-tune from ``cfg.init`` trains: the checkpoint's registered model (a
    name given too must be that one), or a model of your own, which the caller must name
    (``FILE.py:FUNCTION`` or the module), as deeproots never runs code a checkpoint names."""
    held = state["model_cfg"]["name"]
    if model is not None or (cfg.model is not None and is_user_model(cfg.model)):
        return cfg.model or held
    if not is_model(held):
        what = f"a model of your own, built by {held}" if is_user_model(held) else \
            f"a model deeproots does not know ({held!r})"
        raise CheckpointError(f"--init {cfg.init} holds {what}; deeproots never runs code "
                              f"named in a checkpoint: name the model yourself, deeproots "
                              f"train FILE.py:FUNCTION --init {cfg.init}")
    if cfg.model is not None and model_entry(cfg.model).name != model_entry(held).name:
        raise DeeprootsError(f"--init {cfg.init} holds a trained {held}, not {cfg.model}: a "
                             f"fine-tune trains the checkpoint's model; leave the model name "
                             f"out (or name {held})")
    return held


def _setup(cfg: TrainConfig, model: Optional[nn.Module] = None) -> _Run:
    """Validate everything before writing anything: the settings, the model's name, the
    device and the grouped-conv choice first (no data is looked for before they pass),
    then the folder (an interrupted replacement finished or undone first), the checkpoint
    a resumed run continues, the data, the model and the memory."""
    cfg.check()
    if cfg.tensorboard:
        _TensorBoard.check_installed()
    needed = (("distill", cfg.distill),) if cfg.resume else (("init", cfg.init),
                                                             ("distill", cfg.distill))
    for what, path in needed:
        if path and not Path(path).is_file():
            hint = (f"; restore it, or continue with another teacher: --change distill "
                    f"--distill FILE" if cfg.resume else "")
            raise CheckpointError(f"{what} {path}: no such checkpoint file{hint}")
    init_state = None
    if not cfg.resume:  # recorded absolute: the run resumes from any folder
        paths = {k: os.path.abspath(getattr(cfg, k)) for k in ("init", "distill")
                 if getattr(cfg, k)}
        if cfg.init:
            init_state = load_checkpoint(cfg.init)
            paths["model"] = _init_model(cfg, init_state, model)
        cfg = TrainConfig(**{**asdict(cfg), **paths})
    if model is None and cfg.model is not None:
        check_model_spec(cfg.model)
    device = resolve_device(cfg.device)
    resolve_grouped_conv(cfg.grouped_conv, device, cfg.compile)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    run = _Run(cfg=cfg, device=device, folder=RunFolder(out),
               world=int(os.environ.get("WORLD_SIZE", "1")), init_state=init_state)
    if cfg.resume or int(os.environ.get("RANK", "0")) == 0:
        # under torchrun rank 0 alone judges the folder: it may already be writing
        # there while another rank is still starting
        done = run.folder.recover_pending()
        if done:
            print(f"{out}: {done}", file=sys.stderr)
        run.folder.check(cfg.resume, cfg.overwrite)
    if cfg.resume:
        run.seen = run.folder.stamp()
        run.state = load_checkpoint(run.folder.last, map_location=device)
        run.cfg = cfg = resume_config(out, cfg, run.state)
        run.changes = list(run.state.get("changes", [])) + changes_of(cfg, run.state)
    elif model is None:  # recorded resolved: the run resumes from any folder
        run.cfg = cfg = TrainConfig(**{**asdict(cfg), "model": resolve_model_spec(cfg.model)})
    if cfg.tensorboard:
        check_output_dir(out / "tensorboard", "--tensorboard folder")
    run.rank, run.world = _dist_setup(device)
    torch.manual_seed(cfg.seed)
    run.train_loader, run.test_loader, run.spec = build_loaders(
        cfg.data, data_dir=cfg.data_dir, batch_size=cfg.batch_size, device=device,
        seed=cfg.seed, rank=run.rank, world_size=run.world, workers=cfg.workers,
        image_size=cfg.image_size, limit_train_batches=cfg.limit_train_batches,
        limit_eval_batches=cfg.limit_eval_batches, download_ok=cfg.download)
    if len(run.train_loader) == 0:
        raise DeeprootsError(f"batch size {cfg.batch_size} is larger than the training set "
                             f"({run.train_loader.num_samples})")
    spec = run.spec
    built = _build(run, spec, model)
    run.cost = profile(built, (spec.in_channels, spec.image_size, spec.image_size))
    _check_batch(built, run.cost, cfg.batch_size // run.world, device)
    run.model = run.net = built.to(device)
    run.layout = _layout(run)
    run.layout.apply(run.model)  # before DDP wraps the model
    run.optimizer = make_optimizer(run.model, cfg.lr, cfg.momentum, cfg.weight_decay)
    if cfg.distill:
        run.distillation = _teacher(run, spec)
    if cfg.learn_groups:
        run.penalty = _group_lasso(run, built, spec)
    return run


def _group_lasso(run: _Run, built: nn.Module, spec: DataSpec) -> GroupLasso:
    """The --learn-groups penalty on the convs the schedule would group."""
    cfg = run.cfg
    example = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    _, plan = rootify(built.cpu(), cfg.learn_groups, example_input=example)
    built.to(run.device)
    if not plan.groups:
        grouped = [c.layer for c in plan.layers if c.groups_before > 1]
        why = (f"its spatial convs are grouped already ({', '.join(grouped[:3])}): "
               f"--learn-groups trains a dense model, so give the dense one (e.g. "
               f"{model_entry(cfg.model).family if is_model(cfg.model) else 'its dense form'})"
               if grouped else "it has no spatial conv after the stem to group")
        raise DeeprootsError(f"learn_groups {cfg.learn_groups} groups no conv of {cfg.model}: "
                             f"{why}")
    return GroupLasso(run.model, plan.groups, cfg.group_lasso)


def _teacher(run: _Run, spec: DataSpec) -> Distillation:
    """The teacher of ``--distill``: its model rebuilt from its checkpoint (a registered
    model; one of your own by the same FILE.py:FUNCTION as the student), in the step's layout,
    its classes checked against the data's."""
    state = load_checkpoint(run.cfg.distill, map_location=run.device)
    name = state["model_cfg"]["name"]
    teacher = model_from_checkpoint(state, run.cfg.distill, run.cfg.model if is_user_model(
        name) and is_user_model(run.cfg.model) else None).to(run.device).eval()
    classes = example_logits(teacher, torch.zeros(
        1, spec.in_channels, spec.image_size, spec.image_size, device=run.device),
        name).shape[1]
    if classes != spec.num_classes:
        raise DeeprootsError(f"--distill {run.cfg.distill}: the teacher has {classes} classes "
                             f"but {spec.name} has {spec.num_classes}; distil from a model "
                             f"trained on the same classes")
    run.layout.apply(teacher)
    out = Distillation(teacher, run.cfg.distill_temperature, run.cfg.distill_weight)
    out.digest = file_digest(run.cfg.distill)  # a resumed run checks it is the same teacher
    return out


def _layout(run: _Run) -> Layout:
    """The step's layout: as the config names it (auto: the rule of
    :func:`deeproots.step.choose_layout`), or the one a resumed run was training in, so that
    a resumed run computes in the layout it started with."""
    fmt = run.cfg.memory_format
    if fmt == "auto" and run.state is not None and run.state.get("memory_format"):
        fmt = run.state["memory_format"]
    return choose_layout(run.device, fmt)


def _resume(run: _Run) -> None:
    """Load the checkpoint's weights, optimizer, position, history and random state (all
    checked by :func:`deeproots.checkpoint.validate_state` in :func:`_setup`)."""
    state = run.state
    if state["model_cfg"]["name"] != run.model.name:
        raise CheckpointError(f"{run.folder.last} is a {state['model_cfg']['name']} run; this "
                              f"run is {run.model.name}")
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{run.folder.last}: its weights do not fit {run.model.name} "
                              f"({str(err).strip().splitlines()[0][:300]})") from err
    _check_optimizer_state(run)
    if run.writer:
        _repair_best(run)
    _check_teacher(run)
    digest = state["model_cfg"].get("source_sha256")
    if digest and digest != model_source_digest(run.cfg.model):
        print(f"warning: {run.cfg.model.rpartition(':')[0]} changed since this run started "
              f"(its SHA-256 differs); the run continues with the code as it is now",
              file=sys.stderr)
    run.epoch, run.step = state["epoch"], state["step"]
    run.history, run.best_top1 = list(state["history"]), state["best_top1"]
    run.wall_before = state["wall_s"]
    run.steps = list(state.get("steps", []))
    if run.step:
        run.sums = list(state.get("epoch_sums", run.sums))
        run.log_mark = list(state.get("log_mark", run.log_mark))
    if run.penalty is not None and isinstance(state.get("group_masks"), dict):
        for name, mask in state["group_masks"].items():
            if name in run.penalty.masks and mask.shape == run.penalty.masks[name].shape:
                run.penalty.masks[name] = mask.to(run.penalty.masks[name])
    torch.set_rng_state(state["rng_cpu"])
    if run.cuda and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])


def _check_optimizer_state(run: _Run) -> None:
    """Every buffer the optimizer state holds (SGD's momentum) shaped as its parameter: an
    edited checkpoint is one line here, not an error inside the first step."""
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            for key, value in run.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise CheckpointError(
                        f"{run.folder.last}: field 'optimizer' holds a {key} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)}; the "
                        f"checkpoint was edited or is not one this deeproots wrote")


def _repair_best(run: _Run) -> None:
    """A run stopped between its best epoch's last.pt and best.pt (a deeproots that wrote
    them in that order): that epoch is the checkpoint resumed, so best.pt is written from
    it again."""
    state, best = run.state, run.folder.best
    history = state["history"]
    if state["step"] or not history or history[-1]["test_top1"] != state["best_top1"]:
        return
    if best.exists():
        try:
            if load_checkpoint(best).get("epoch") == state["epoch"]:
                return
        except CheckpointError:
            pass
    save_checkpoint(best, state)
    print(f"{best}: written again from {run.folder.last} (its epoch {state['epoch']} is the "
          f"best; the run had stopped before writing it)", file=sys.stderr)


def _check_teacher(run: _Run) -> None:
    """A resumed run distils from the teacher it started with: its file's SHA-256 as the
    checkpoint recorded it, unless ``--change distill`` allows another (recorded)."""
    if not run.cfg.distill:
        return
    recorded = run.state.get("distill_sha256")
    now = file_digest(run.cfg.distill)
    if recorded is None or recorded == now:
        return
    if "distill" not in run.cfg.change:
        raise CheckpointError(f"--distill {run.cfg.distill} changed since this run started (its "
                              f"SHA-256 differs from the one recorded): the resumed run would "
                              f"learn from another teacher. Restore the file, or allow it with "
                              f"--change distill (recorded in the run's history)")
    run.changes.append({"setting": "distill", "from": f"sha256:{recorded}",
                        "to": f"sha256:{now}", "epoch": run.state["epoch"],
                        "step": run.state["step"]})


def _start(run: _Run) -> None:
    """With the folder locked: the DDP wrapper and the training step (grouped convs as
    configured, a resumed run's measured choices kept, compiled if asked). Nothing of the
    run is written before its first checkpoint; with ``overwrite`` the old run stays whole
    until then."""
    run.writer = run.rank == 0
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # only under torchrun

        if run.cuda:  # batch statistics over the global batch, as one process would compute
            # (SyncBatchNorm runs on GPUs only; on CPU each process normalises its own part)
            run.model = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
        run.net = DDP(run.model, device_ids=[run.device.index] if run.cuda else None)
    if run.state is not None and run.state.get("dispatch"):
        from .kernels.modules import restore_choices  # Triton layer: a GPU run's choices

        restore_choices(run.state["dispatch"])  # each verified again before its first use
    run.step_fn = TrainStep(run.model, run.optimizer, net=run.net,
                            aux_weight=run.cfg.aux_weight, compile=run.cfg.compile,
                            grouped_conv=run.cfg.grouped_conv, layout=run.layout,
                            distillation=run.distillation, penalty=run.penalty)
    for line in run.step_fn.fallbacks:
        print(f"grouped conv left to PyTorch: {line}", file=sys.stderr)
    if run.writer:
        run.folder.begin(run.cfg.overwrite)
        if run.state is not None:  # the records as the checkpoint has them: none after it
            run.folder.write_records(run.history, run.steps)
        if run.cfg.tensorboard:
            run.board = _TensorBoard(run.folder.path / "tensorboard",
                                     purge_step=run.epoch * len(run.train_loader) + run.step)


def _snapshot(run: _Run, epoch: int, step: int) -> dict:
    model_cfg = {**run.model.deeproots_cfg, "groups": {
        name: conv.groups for name, conv in conv_layers(run.model).items() if conv.groups > 1}}
    digest = model_source_digest(run.cfg.model)
    if digest:
        model_cfg["source_sha256"] = digest
    if run.cfg.distill and run.distillation is not None:
        state_teacher = {"distill_sha256": run.distillation.digest}
    else:
        state_teacher = {}
    state = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "epoch": epoch, "step": step, "history": run.history, "best_top1": run.best_top1,
        "config": asdict(run.cfg) | {"out": str(run.folder.path)}, "model_cfg": model_cfg,
        "data": asdict(run.spec), "rng_cpu": torch.get_rng_state(), "changes": run.changes,
        "epoch_sums": list(run.sums), "memory_format": run.layout.memory_format,
        "steps": run.steps, "log_mark": list(run.log_mark),
        "wall_s": run.wall_before + time.perf_counter() - run.started, **state_teacher,
    }
    if run.cuda:
        state["rng_cuda"] = torch.cuda.get_rng_state()
    if run.penalty is not None:  # the blocks of this epoch, so a resume penalises the same
        state["group_masks"] = {n: m.bool().cpu() for n, m in run.penalty.masks.items()}
    if run.step_fn is not None and run.step_fn.grouped_conv == "dispatch":
        from .kernels.modules import dispatch_cache  # loaded already: the run uses it

        state["dispatch"] = list(dispatch_cache().items())  # tuples load safely
    return state


def _last_good(run: _Run) -> str:
    return str(run.folder.last) if run.folder.last.exists() else "none written yet"


def _save_last(run: _Run, epoch: int, step: int, best: bool = False) -> dict:
    """Checkpoint to last.pt (and first to best.pt when ``best``: see
    :meth:`RunFolder.write_checkpoint`), after checking that every weight is finite."""
    for name, value in run.model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDiverged(f"weight {name} is not finite at epoch {epoch + 1}, step "
                                   f"{step}; stopped without saving it. Last good checkpoint: "
                                   f"{_last_good(run)}. Try a lower --lr (now {run.cfg.lr})")
    state = _snapshot(run, epoch, step)
    if run.writer:
        run.folder.write_checkpoint(
            lambda: save_checkpoint(run.folder.last, state),
            (lambda: save_checkpoint(run.folder.best, state)) if best else None)
        run.folder.write_records(run.history, run.steps)  # the records match the checkpoint
        if run.board is not None:
            run.board.write(run.steps + run.history)
    return state


def _check_finite(run: _Run, epoch: int) -> None:
    """Bring the step's device sums into ``run.sums`` (one synchronisation) and stop if a
    loss of this epoch was not finite."""
    r = run.step_fn.read()
    if r["bad_step"]:
        raise TrainingDiverged(
            f"loss became {r['bad_loss']} at epoch {epoch + 1}, step {r['bad_step']}; "
            f"stopped without saving this state. Last good checkpoint: {_last_good(run)}. "
            f"Try a lower --lr (now {run.cfg.lr})")
    run.sums[:3] = [r["loss_sum"], r["correct"], r["seen"]]


def _out_of_memory(run: _Run, x: torch.Tensor, y: torch.Tensor) -> DeeprootsError:
    """The error for a batch that ran out of GPU memory, with the largest batch that fits."""
    fits = run.step_fn.largest_batch(x, y)
    what = f"batch size {len(x)} per process does not fit in the memory of {run.device}"
    if fits < 1:
        return DeeprootsError(f"{what}: even one image ran out of memory")
    return DeeprootsError(f"{what} (out of memory in a training step); the largest batch that "
                          f"fit, halving: {fits}. Use --batch-size {fits * run.world}")


LOG_EVERY_S = 30.0  # a step record at least this often, however slow the steps


def _record_step(run: _Run, epoch: int, global_step: int, lr: float, now: float) -> None:
    """A step record of the steps since the last one (their mean training loss and top-1,
    images/s over all processes, the learning rate), kept for the checkpoint, appended to
    metrics.jsonl and written to TensorBoard."""
    d_loss, d_correct, d_seen, d_s = (a - b for a, b in zip(run.sums, run.log_mark))
    record = {"kind": "step", "epoch": epoch + 1, "step": global_step, "lr": lr,
              "train_loss": d_loss / max(d_seen, 1.0), "train_top1": d_correct / max(d_seen, 1.0),
              "images_per_s": d_seen * run.world / max(d_s, 1e-9),
              "wall_s": run.wall_before + now - run.started}
    run.steps.append(record)
    run.log_mark = list(run.sums)
    run.logged_at = now
    if run.writer and not run.folder.replacing:  # a replaced run's files stay until then
        run.folder.append_record(record)
        if run.board is not None:
            run.board.write([record])


class _TensorBoard:
    """TensorBoard event files in ``folder`` (``--tensorboard``): the step records'
    training loss, top-1, learning rate and images/s, the epochs' test loss and top-1. A
    resumed run purges the events after its checkpoint's step, so none repeat; a run that
    replaces another writes none before its first checkpoint (the old run's stay until then)
    and then catches up."""

    @staticmethod
    def check_installed() -> None:
        try:
            import tensorboard  # noqa: F401  (optional package)
        except ImportError:
            raise DeeprootsError("--tensorboard needs the tensorboard package: pip install "
                                 "tensorboard (or deeproots[tensorboard])") from None

    def __init__(self, folder: Path, purge_step: int):
        self.check_installed()
        from torch.utils.tensorboard import SummaryWriter

        self._make = lambda: SummaryWriter(str(folder), purge_step=purge_step or None)
        self.writer = None
        # a resumed run's events from its checkpoint's step on were purged: written again
        self.floor, self.written = purge_step, set()

    def write(self, records) -> None:
        """The records not written yet, in the order of their steps."""
        for r in sorted(records, key=lambda r: (r["step"], r["kind"] == "epoch")):
            if r["step"] < self.floor or (r["kind"], r["step"]) in self.written:
                continue
            self.written.add((r["kind"], r["step"]))
            self.writer = self.writer or self._make()
            keys = ("train_loss", "train_top1", "lr", "images_per_s") if r["kind"] == "step" \
                else ("test_loss", "test_top1", "test_top5", "train_loss", "train_top1")
            for key in keys:
                self.writer.add_scalar(f"{r['kind']}/{key}", r[key], r["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _interrupted(run: _Run, signum: int) -> Interrupted:
    return Interrupted(signum, run.folder.last, resume_command(run.cfg, run.folder.path))


def _train_epoch(run: _Run, epoch: int, stop: _StopRequest, callbacks) -> float:
    """One epoch from ``run.step`` on; returns the last learning rate."""
    cfg, loader = run.cfg, run.train_loader
    steps = len(loader)
    loader.set_epoch(epoch)
    run.net.train()
    first = run.step if epoch == run.epoch else 0
    if first == 0:
        run.sums = [0.0, 0.0, 0.0, 0.0]
        run.log_mark = [0.0, 0.0, 0.0, 0.0]
        if run.penalty is not None and epoch > 0:  # blocks re-estimated from the weights
            run.penalty.reassign()
    show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and run.writer)
    bar = _progress(steps, first, f"epoch {epoch + 1}/{cfg.epochs}", show)
    lr = lr_at(cfg, epoch * steps + max(first - 1, 0), steps)
    t0 = last_save = time.perf_counter()
    before = run.sums[3]
    step_fn = run.step_fn
    step_fn.reset(*run.sums[:3], steps=first)
    shown = t0
    try:
        for step, (x, y) in enumerate(loader.batches(first), start=first):
            global_step = epoch * steps + step
            lr = lr_at(cfg, global_step, steps)
            try:
                loss = step_fn.step(x, y, lr)  # queued: no wait for the GPU
            except torch.cuda.OutOfMemoryError:
                raise _out_of_memory(run, x, y) from None
            now = time.perf_counter()
            run.sums[3] = before + now - t0
            log_due = (global_step + 1) % cfg.log_every == 0 or \
                now - run.logged_at >= LOG_EVERY_S
            if bar is not None:
                if now - shown >= 0.5 or step + 1 == steps:  # one sync per refresh
                    _check_finite(run, epoch)
                    s = run.sums
                    bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.3f}",
                                    acc=f"{s[1] / max(s[2], 1):.3f}",
                                    img_s=f"{s[2] * run.world / max(s[3], 1e-9):.0f}")
                    shown = now
                bar.update(1)
            if log_due:  # the sums read once (a sync), as for the progress bar
                _check_finite(run, epoch)
                _record_step(run, epoch, global_step + 1, lr, now)
            if callbacks:  # the loss as a number: a sync, only for those who ask
                info = {"epoch": epoch, "step": step, "global_step": global_step,
                        "loss": loss.item(), "lr": lr, "model": run.model}
                for callback in callbacks:
                    callback(info)
            if stop.signal is not None:
                _check_finite(run, epoch)
                _save_last(run, epoch, step + 1)
                raise _interrupted(run, stop.signal)
            if cfg.checkpoint_every_min and step + 1 < steps and \
                    time.perf_counter() - last_save >= 60 * cfg.checkpoint_every_min:
                _check_finite(run, epoch)
                _save_last(run, epoch, step + 1)  # an interrupted long epoch loses little
                last_save = time.perf_counter()
        _check_finite(run, epoch)  # waits for the epoch's last step
        run.sums[3] = before + time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    return lr


def _end_epoch(run: _Run, epoch: int, lr: float) -> None:
    """Evaluate, record, and checkpoint a finished epoch (best.pt when top-1 improved)."""
    loss_sum, correct, seen = _all_sum(run.sums[:3], run.device)
    seen = max(seen, 1.0)  # a run resumed after the epoch's last step saw none
    metrics = evaluate(run.model, run.test_loader, run.device, run.layout)
    if not math.isfinite(metrics.loss):
        raise TrainingDiverged(f"test loss is {metrics.loss} after epoch {epoch + 1}; stopped "
                               f"without saving this state. Last good checkpoint: "
                               f"{_last_good(run)}. Try a lower --lr (now {run.cfg.lr})")
    epoch_s = max(run.sums[3], 1e-9)
    compile_s = run.step_fn.compile_s if not run.compile_recorded else None
    run.compile_recorded = run.compile_recorded or compile_s is not None
    record = {"kind": "epoch", "epoch": epoch + 1,
              "step": (epoch + 1) * len(run.train_loader), "lr": lr,
              "train_loss": loss_sum / seen,
              "train_top1": correct / seen, "test_loss": metrics.loss,
              "test_top1": metrics.top1, "test_top5": metrics.top5, "epoch_s": epoch_s,
              # throughput without the first step's compilation, which is paid once
              "images_per_s": seen / max(epoch_s - (compile_s or 0.0), 1e-9),
              "compile_s": compile_s}
    run.history.append(record)
    best = metrics.top1 > run.best_top1
    run.best_top1 = max(run.best_top1, metrics.top1)
    run.sums = [0.0, 0.0, 0.0, 0.0]
    run.log_mark = [0.0, 0.0, 0.0, 0.0]
    _save_last(run, epoch + 1, 0, best=best)
    if run.writer:
        if compile_s is not None:
            print(f"compiled the training step (torch.compile, mode {run.cfg.compile}) in its "
                  f"first step: {compile_s:.1f} s", flush=True)
        print(f"epoch {epoch + 1}/{run.cfg.epochs}: train loss {record['train_loss']:.4f} "
              f"acc {record['train_top1']:.4f} | test loss {metrics.loss:.4f} "
              f"top1 {metrics.top1:.4f} top5 {metrics.top5:.4f} | "
              f"{record['images_per_s']:.0f} img/s", flush=True)


def _finish(run: _Run) -> TrainSummary:
    """The summary, written with the training curves."""
    history, final = run.history, (run.history[-1] if run.history else {})
    seconds = sum(h["epoch_s"] for h in history)
    summary = TrainSummary(
        model=run.cfg.model, data=run.spec.name, macs=run.cost.macs, params=run.cost.params,
        top1=final.get("test_top1"), top5=final.get("test_top5"), loss=final.get("test_loss"),
        best_top1=run.best_top1, epochs=len(history),
        wall_s=run.wall_before + time.perf_counter() - run.started,
        train_images_per_s=sum(h["images_per_s"] * h["epoch_s"] for h in history) /
        max(1e-9, seconds),
        device=_device_name(run.device), world_size=run.world, versions=_versions(),
        allocator=allocator(), config=asdict(run.cfg) | {"out": str(run.folder.path)},
        checkpoint=str(run.folder.last), out=str(run.folder.path), changes=run.changes,
        compile_s=next((h["compile_s"] for h in history if h.get("compile_s") is not None),
                       None),
        compile_error=run.step_fn.compile_error, grouped_conv=run.step_fn.grouped_conv,
        memory_format=run.layout.memory_format, kernel_notes=_kernel_notes(run))
    if run.penalty is not None:
        summary.learned_groups = _convert_learned(run, summary)
    if run.writer:
        if history:
            plot_training_curves(history, run.folder.path / "curves.png", run.cfg.model,
                                 steps=run.steps)
        if run.board is not None:
            run.board.close()
        summary.files = [name for name in RUN_FILES if name == "summary.json"
                         or (run.folder.path / name).exists()]
        write_json(run.folder.path / "summary.json", summary.to_dict())
    return summary


LEARNED = "converted.pt"  # --learn-groups: the model converted at the end of the run


def _convert_learned(run: _Run, summary: TrainSummary) -> dict:
    """The end of a --learn-groups run: the trained model converted to its schedule with
    calibration (a sample of its training images), evaluated, and (rank 0) written as
    ``converted.pt`` beside the run's files."""
    kept = run.penalty.kept()
    loader = run.train_loader
    calib = sample_images(loader, run.spec).to(run.device)  # the one default sample
    new, report = rootify(run.model.eval(), run.cfg.learn_groups, example_input=calib[:1],
                          calibration=calib)
    after = evaluate(new, run.test_loader, run.device, run.layout).top1
    out = {"schedule": run.cfg.learn_groups, "weight_kept": kept, "top1_before": summary.top1,
           "top1_after": after, "macs_fraction": report.macs_fraction,
           "converted": str(run.folder.path / LEARNED)}
    if run.writer:
        save_model(run.folder.path / LEARNED, new, {
            "model_cfg": run.model.deeproots_cfg, "config": asdict(run.cfg),
            "data": asdict(run.spec)}, converted={**out, "report": report.to_dict()})
    return out


def _kernel_notes(run: _Run) -> List[str]:
    """What the measured dispatch dropped (a lowering that raised or disagreed with the
    native conv on its first use), and why."""
    if run.step_fn is None or run.step_fn.grouped_conv != "dispatch":
        return []
    from .kernels.modules import dispatch_notes  # loaded already: the run uses it

    return dispatch_notes(run.model)


def train(cfg: TrainConfig, callbacks: Optional[List[Callable[[dict], None]]] = None, *,
          model: Optional[nn.Module] = None) -> TrainSummary:
    """Train ``cfg.model`` on ``cfg.data``; returns the :class:`TrainSummary` (also written
    to ``summary.json`` in the run's folder). ``cfg`` is not changed.

    ``resume=True`` continues the run in ``cfg.out`` with the settings it was started with:
    ``TrainConfig(resume=True, out=D)`` alone is enough; a setting that defines the run and
    differs from its own must be named in ``change`` (see
    :func:`deeproots.checkpoint.resume_config`). ``overwrite=True`` replaces the run in
    ``cfg.out``, keeping it whole until the new run's first checkpoint.

    ``model``: a model of your own to train (a copy is trained; ``cfg.model`` names it in the
    records), instead of building ``cfg.model``. ``callbacks`` are called after every
    optimizer step with a dict of ``epoch``, ``step`` (within the epoch), ``global_step``,
    ``loss``, ``lr`` and the ``model``.

    Raises :class:`TrainingDiverged` when the loss, a weight or the test loss becomes NaN or
    infinite (the last good checkpoint is kept) and :class:`Interrupted` after Ctrl-C or
    SIGTERM (once the checkpoint for resuming is written). Every setting, the output folder
    and the data are checked before anything is written."""
    run = _setup(cfg, model)
    if run.state is not None:
        _resume(run)
    lock = run.folder.lock() if run.rank == 0 else _NoLock(run.folder)
    with lock:
        if run.rank == 0:  # judged again now that no other process can write here
            run.folder.confirm(run.cfg.resume, run.cfg.overwrite, run.seen)
        _start(run)
        with _StopRequest() as stop:
            for epoch in range(run.epoch, run.cfg.epochs):
                lr = _train_epoch(run, epoch, stop, callbacks)
                _end_epoch(run, epoch, lr)
        return _finish(run)


class _NoLock:
    """A rank other than 0 writes nothing and takes no lock."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def __enter__(self) -> RunFolder:
        return self.folder

    def __exit__(self, *exc) -> None:
        pass


def _progress(total: int, initial: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm  # only on a terminal

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
