"""Training and evaluation with the paper's recipe (Sections 4.1, 4.3): SGD with momentum and
weight decay, He initialisation and batch norm (in the models), a step or cosine learning-rate
schedule with warm-up, random crops and mirroring.

Nothing is lost: a checkpoint is written atomically after every epoch, every few minutes
within an epoch, and when the run is stopped (Ctrl-C, SIGTERM); ``resume=True`` continues
from it, batch for batch, to the same weights an uninterrupted run reaches, with the
settings the run was started with (:func:`deeproots.training.checkpoint.resume_config`). The run
folder (:mod:`deeproots.training.folder`) is never overwritten unless asked, and then only once the
new run has its first checkpoint; its lock keeps a second process out. A loss, weight or
test loss that is not finite stops the run, keeping the last good checkpoint. Under
``torchrun`` the run is data-parallel (DistributedDataParallel; nccl on GPU, gloo on CPU);
rank 0 writes every file.

The loop reads top to bottom: :func:`_setup` (the run opened by
:func:`deeproots.training.run.open_run`, everything checked before anything is written),
:func:`deeproots.training.checkpoint.restore`, :func:`_start`, then per epoch
:func:`_train_epoch` and :func:`_end_epoch`, and :func:`_finish`.
"""
from __future__ import annotations

import copy
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from .. import __version__
from ..config import TrainConfig, lr_at
from ..conversion.rule import rootify
from ..errors import DeeprootsError
from ..inspection.costs import profile
from ..layout import Layout, choose_layout
from ..models.layers import example_logits
from ..models.registry import build_model, is_model, is_user_model, model_entry
from ..plots import plot_training_curves
from ..runtime import allocator, check_batch_fits, file_digest, write_json
from . import distributed
from .checkpoint import (CheckpointError, load_checkpoint, model_from_checkpoint, restore,
                         save_checkpoint, save_model, snapshot)
from .data import DataSpec, build_loaders, folder_like, folder_size, sample_images
from .evaluate import EvalResult, evaluate, load_for_eval
from .folder import RUN_FILES, RunFolder, read_summary
from .objectives import Distillation, GroupLasso
from .records import LOG_EVERY_S, TensorBoard, progress, record_step
from .run import default_out, open_run, resume_command
from .step import TrainStep, make_optimizer

__all__ = ["train", "TrainingDiverged", "Interrupted", "TrainSummary", "LEARNED",
           # where they live now (deeproots 0.1 had them here)
           "TrainConfig", "evaluate", "load_for_eval", "EvalResult", "load_checkpoint",
           "save_checkpoint", "model_from_checkpoint", "CheckpointError", "lr_at",
           "RUN_FILES", "default_out", "resume_command"]


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the test loss became NaN or infinite."""


class Interrupted(Exception):
    """The run was stopped by a signal after writing its checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, command: str = ""):
        self.signum, self.checkpoint, self.command = signum, checkpoint, command
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")


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
    # resumed after its last epoch: the summary it wrote then, nothing trained or written now
    already_finished: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


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


def _versions() -> dict:
    return {"deeproots": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _check_batch(model: nn.Module, cost, per_rank: int, device: torch.device) -> None:
    """Refuse a batch that cannot train: one image per process with batch norm, or more
    activations than the device has memory for (``Profile.activation_bytes``)."""
    if per_rank == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                             for m in model.modules()):
        raise DeeprootsError(f"batch size 1 per process cannot train {model.name}: batch norm "
                             f"needs at least 2 images; use --batch-size 2 or more")
    check_batch_fits(cost.activation_bytes(training=True), per_rank, device,
                     f"train {model.name}")


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
    grouped_conv: str = "native"  # how grouped convs run, resolved once when opened
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
    groups; the weights are loaded by ``restore``), a fine-tune's from its ``init``
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


def _setup(cfg: TrainConfig, model: Optional[nn.Module] = None,
           given: Optional[Mapping[str, Any]] = None,
           continue_if_possible: bool = False) -> _Run:
    """The run opened (:func:`deeproots.training.run.open_run`: every setting, name, file,
    device and the folder checked, a resumed run's checkpoint loaded once, before any data
    is read), then the data, the model, its memory, the optimizer, the teacher and the
    penalty."""
    opened = open_run(cfg, given=given, model=model,
                      continue_if_possible=continue_if_possible)
    cfg, device = opened.cfg, opened.device
    run = _Run(cfg=cfg, device=device, folder=opened.folder, world=distributed.world_size(),
               state=opened.state, seen=opened.seen, init_state=opened.init_state,
               changes=opened.changes, grouped_conv=opened.grouped_conv)
    run.rank, run.world = distributed.setup(device)
    torch.manual_seed(cfg.seed)
    # an image folder: a fine-tune reads it as its model's images were (a resumed one as its
    # first epoch did); --in-channels, --mean and --std as given
    like = folder_like((run.state or run.init_state or {}).get("data") if cfg.init else None,
                       channels=cfg.in_channels, mean=cfg.mean, std=cfg.std)
    run.train_loader, run.test_loader, run.spec = build_loaders(
        cfg.data, data_dir=cfg.data_dir, batch_size=cfg.batch_size, device=device,
        seed=cfg.seed, rank=run.rank, world_size=run.world, workers=cfg.workers,
        image_size=folder_size(like, default=cfg.image_size),
        limit_train_batches=cfg.limit_train_batches,
        limit_eval_batches=cfg.limit_eval_batches, download_ok=cfg.download, like=like)
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
    run.optimizer = make_optimizer(run.model, cfg.peak_lr, cfg.momentum, cfg.weight_decay,
                                   cfg.opt)
    if cfg.distill:
        run.distillation = _teacher(run, spec)
    if cfg.learn_groups:
        run.penalty = _group_lasso(run, built, spec)
    return run


def _layout(run: _Run) -> Layout:
    """The step's layout: as the config names it (auto: the rule of
    :func:`deeproots.training.step.choose_layout`), or the one a resumed run was training in, so that
    a resumed run computes in the layout it started with."""
    fmt = run.cfg.memory_format
    if fmt == "auto" and run.state is not None and run.state.get("memory_format"):
        fmt = run.state["memory_format"]
    return choose_layout(run.device, fmt)


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
        from ..kernels.modules import restore_choices  # Triton layer: a GPU run's choices

        restore_choices(run.state["dispatch"])  # each verified again before its first use
    run.step_fn = TrainStep(run.model, run.optimizer, net=run.net,
                            aux_weight=run.cfg.aux_weight, compile=run.cfg.compile,
                            grouped_conv=run.grouped_conv, layout=run.layout,
                            distillation=run.distillation, penalty=run.penalty)
    for line in run.step_fn.fallbacks:
        print(f"grouped conv left to PyTorch: {line}", file=sys.stderr)
    if run.writer:
        run.folder.begin(run.cfg.overwrite)
        if run.state is not None:  # the records as the checkpoint has them: none after it
            run.folder.write_records(run.history, run.steps)
        if run.cfg.tensorboard:
            run.board = TensorBoard(run.folder.path / "tensorboard",
                                     purge_step=run.epoch * len(run.train_loader) + run.step)


def _last_good(run: _Run) -> str:
    return str(run.folder.last) if run.folder.last.exists() else "none written yet"


def _save_last(run: _Run, epoch: int, step: int, best: bool = False) -> dict:
    """Checkpoint to last.pt (and first to best.pt when ``best``: see
    :meth:`RunFolder.write_checkpoint`), after checking that every weight is finite."""
    for name, value in run.model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDiverged(f"weight {name} is not finite at epoch {epoch + 1}, step "
                                   f"{step}; stopped without saving it. Last good checkpoint: "
                                   f"{_last_good(run)}. Try a lower --lr (now "
                                   f"{run.cfg.peak_lr:g})")
    state = snapshot(run, epoch, step)
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
            f"Try a lower --lr (now {run.cfg.peak_lr:g})")
    run.sums[:3] = [r["loss_sum"], r["correct"], r["seen"]]


def _out_of_memory(run: _Run, x: torch.Tensor, y: torch.Tensor) -> DeeprootsError:
    """The error for a batch that ran out of GPU memory, with the largest batch that fits."""
    fits = run.step_fn.largest_batch(x, y)
    what = f"batch size {len(x)} per process does not fit in the memory of {run.device}"
    if fits < 1:
        return DeeprootsError(f"{what}: even one image ran out of memory")
    return DeeprootsError(f"{what} (out of memory in a training step); the largest batch that "
                          f"fit, halving: {fits}. Use --batch-size {fits * run.world}")


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
    bar = progress(steps, first, f"epoch {epoch + 1}/{cfg.epochs}", show)
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
                record_step(run, epoch, global_step + 1, lr, now)
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
    loss_sum, correct, seen = distributed.all_sum(run.sums[:3], run.device)
    seen = max(seen, 1.0)  # a run resumed after the epoch's last step saw none
    metrics = evaluate(run.model, run.test_loader, run.device, run.layout)
    if not math.isfinite(metrics.loss):
        raise TrainingDiverged(f"test loss is {metrics.loss} after epoch {epoch + 1}; stopped "
                               f"without saving this state. Last good checkpoint: "
                               f"{_last_good(run)}. Try a lower --lr (now {run.cfg.peak_lr:g})")
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


def _finished_already(run: _Run) -> Optional[TrainSummary]:
    """A resumed run that had finished its epochs and written its summary: that summary,
    marked ``already_finished`` (nothing is trained, and nothing rewritten: its wall time,
    curves and --learn-groups conversion stay as they were). None otherwise, as when the
    summary was never written (stopped between the last checkpoint and the summary)."""
    if run.epoch < run.cfg.epochs or run.step:
        return None
    try:
        saved = read_summary(run.folder.path / "summary.json")
    except (OSError, DeeprootsError):
        return None
    known = {f.name for f in fields(TrainSummary)}
    summary = TrainSummary(**{k: v for k, v in saved.items() if k in known})
    summary.already_finished = True
    return summary


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
    from ..kernels.modules import dispatch_notes  # loaded already: the run uses it

    return dispatch_notes(run.model)


def train(cfg: TrainConfig, callbacks: Optional[List[Callable[[dict], None]]] = None, *,
          model: Optional[nn.Module] = None, given: Optional[Mapping[str, Any]] = None,
          continue_if_possible: bool = False) -> TrainSummary:
    """Train ``cfg.model`` on ``cfg.data``; returns the :class:`TrainSummary` (also written
    to ``summary.json`` in the run's folder). ``cfg`` is not changed.

    ``resume=True`` continues the run in ``cfg.out`` with the settings it was started with:
    ``TrainConfig(resume=True, out=D)`` alone is enough; a setting that defines the run and
    differs from its own must be named in ``change`` (see
    :func:`deeproots.training.checkpoint.resume_config`). ``overwrite=True`` replaces the run in
    ``cfg.out``, keeping it whole until the new run's first checkpoint.

    ``model``: a model of your own to train (a copy is trained; ``cfg.model`` names it in the
    records), instead of building ``cfg.model``. ``callbacks`` are called after every
    optimizer step with a dict of ``epoch``, ``step`` (within the epoch), ``global_step``,
    ``loss``, ``lr`` and the ``model``. ``given``: the settings the caller named (the
    command line's flags), for the resume rule; ``continue_if_possible``: resume the run in
    ``cfg.out`` if its checkpoint is good, else start (a study's runs); see
    :func:`deeproots.training.run.open_run`.

    Raises :class:`TrainingDiverged` when the loss, a weight or the test loss becomes NaN or
    infinite (the last good checkpoint is kept) and :class:`Interrupted` after Ctrl-C or
    SIGTERM (once the checkpoint for resuming is written). Every setting, the output folder
    and the data are checked before anything is written."""
    run = _setup(cfg, model, given, continue_if_possible)
    if run.state is not None:
        restore(run)
        done = _finished_already(run)
        if done is not None:
            return done
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


