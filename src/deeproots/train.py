"""Training and evaluation with the paper's recipe (Sections 4.1, 4.3): SGD with momentum and
weight decay, He initialisation and batch norm (in the models), a step or cosine learning-rate
schedule with warm-up, random crops and mirroring.

Nothing is lost: a checkpoint is written atomically after every epoch and when the run is
stopped (Ctrl-C, SIGTERM), and ``resume=True`` continues from it, batch for batch, to the
same weights an uninterrupted run reaches. Under ``torchrun`` the run is data-parallel
(DistributedDataParallel; nccl on GPU, gloo on CPU); rank 0 writes every file.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .data import build_loaders
from .layers import check_positive
from .profile import profile
from .registry import create_model
from .runtime import allocator, atomic_write, check_device, resolve_device

__all__ = ["TrainConfig", "train", "evaluate", "load_checkpoint", "save_checkpoint",
           "model_from_checkpoint", "TrainingDiverged", "CheckpointError", "lr_at"]

SCHEDULES = ("cosine", "step")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint and summary."""

    model: str = "nin-root-8"
    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    out: Optional[str] = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])
    step_gamma: float = 0.1
    aux_weight: float = 0.3
    seed: int = 0
    device: str = "auto"
    workers: int = 4
    image_size: int = 224
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    resume: bool = False
    progress: Optional[bool] = None
    download: bool = True

    def check(self) -> None:
        """ValueError for settings that cannot work, naming the value."""
        for name in ("epochs", "batch_size"):
            check_positive(name, getattr(self, name))
        for name in ("limit_train_batches", "limit_eval_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; "
                             f"got {self.schedule!r}")
        check_device(self.device)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate at global ``step``: linear warm-up, then cosine to 0 or steps of
    ``step_gamma`` at the ``step_milestones`` (fractions of the run)."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    passed = sum(step >= m * total for m in cfg.step_milestones)
    return cfg.lr * cfg.step_gamma ** passed


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over the old one. A crash leaves the old file or the new one."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Read a deeproots checkpoint with ``torch.load(weights_only=True)``; CheckpointError if
    the file is missing, corrupt or not a deeproots checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several kinds on truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if not isinstance(state, dict) or "model" not in state or "model_cfg" not in state:
        raise CheckpointError(f"{path} is not a deeproots checkpoint (no model and model_cfg)")
    return state


def model_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    cfg = state["model_cfg"]
    model = create_model(cfg["name"], **cfg["kwargs"])
    model.load_state_dict(state["model"])
    return model


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE)


def _dist_setup(device: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_sum(values: List[float], device) -> List[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Evaluation


def _main_logits(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, autocast=None) -> dict:
    """Loss, top-1 and top-5 accuracy of ``model`` over ``loader`` (all ranks together).

    Returns ``{"loss", "top1", "top5", "n"}``; accuracies are fractions in [0, 1]."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = n = 0.0
    for x, y in loader.batches():
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or nullcontext():
            logits = _main_logits(model(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        best = logits.topk(k, 1).indices
        hits = best == y[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(1).sum().item()
        n += len(y)
    loss_sum, top1, top5, n = _all_sum([loss_sum, top1, top5, n], device)
    model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation data is empty")
    return {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}


# ---------------------------------------------------------------------------------------------
# Training


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is never taken
    half-way through an optimizer step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if _in_main_thread():
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


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Interrupted(Exception):
    """The run was stopped by a signal after writing its checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")


def _default_out(cfg: TrainConfig) -> Path:
    data = cfg.data.split(":")[0]
    return Path("runs") / f"{cfg.model}-{data}-seed{cfg.seed}"


def _versions() -> dict:
    from . import __version__

    return {"deeproots": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train(cfg: TrainConfig, callbacks: Optional[List[Callable[[dict], None]]] = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the summary (also written to
    ``summary.json`` in ``cfg.out``).

    ``callbacks`` are called after every optimizer step with a dict of ``epoch``, ``step``
    (within the epoch), ``global_step``, ``loss`` and ``lr``.

    Raises :class:`TrainingDiverged` when the loss becomes NaN or infinite (the last good
    checkpoint is kept) and :class:`Interrupted` after Ctrl-C or SIGTERM (once the checkpoint
    for resuming is written)."""
    cfg.check()
    device = resolve_device(cfg.device)
    rank, world = _dist_setup(str(device))
    is_main = rank == 0
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    cfg.out = str(out)
    last_path, best_path = out / "last.pt", out / "best.pt"

    torch.manual_seed(cfg.seed)
    train_loader, test_loader, spec = build_loaders(
        cfg.data, data_dir=cfg.data_dir, batch_size=cfg.batch_size, device=device,
        seed=cfg.seed, rank=rank, world_size=world, workers=cfg.workers,
        image_size=cfg.image_size, limit_train_batches=cfg.limit_train_batches,
        limit_eval_batches=cfg.limit_eval_batches, download_ok=cfg.download)
    if len(train_loader) == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set "
                         f"({len(train_loader.images) if hasattr(train_loader, 'images') else 0})")
    model_kwargs = {"num_classes": spec.num_classes, "in_channels": spec.in_channels}
    model = create_model(cfg.model, **model_kwargs).to(device)
    cost = profile(model, (spec.in_channels, spec.image_size, spec.image_size))
    cuda = device.type == "cuda"
    if cuda:  # tensor-core friendly layout and bf16 math on GPUs
        model = model.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # no weight decay on biases and batch norm
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    start_epoch, start_step, history, best_top1, wall_before = 0, 0, [], -1.0, 0.0

    if cfg.resume:
        if not last_path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {last_path}; start the run "
                                  f"without --resume, or pass the --out of the run to resume")
        state = load_checkpoint(last_path, map_location=device)
        if state["model_cfg"]["name"] != model.name:
            raise CheckpointError(f"{last_path} is a {state['model_cfg']['name']} run; this "
                                  f"run is {model.name}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = state["epoch"], state["step"]
        history, best_top1 = list(state["history"]), state["best_top1"]
        wall_before = state["wall_s"]
        torch.set_rng_state(state["rng_cpu"])
        if cuda and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cuda:  # batch statistics over the global batch, as one process would compute
            # (SyncBatchNorm runs on GPUs only; on CPU each process normalises its own part)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DDP(model, device_ids=[device.index] if cuda else None)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_records(out, history)

    steps_per_epoch = len(train_loader)
    started = time.perf_counter()
    images_seen, train_time = 0, 0.0

    def snapshot(epoch: int, step: int) -> dict:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step": step, "history": history, "best_top1": best_top1,
            "config": asdict(cfg), "model_cfg": model.deeproots_cfg,
            "data": asdict(spec), "rng_cpu": torch.get_rng_state(),
            "wall_s": wall_before + time.perf_counter() - started,
        }
        if cuda:
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return state

    show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and is_main)
    with _StopRequest() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch)
            net.train()
            first = start_step if epoch == start_epoch else 0
            bar = _progress(steps_per_epoch, first, f"epoch {epoch + 1}/{cfg.epochs}", show)
            loss_sum = correct = seen = 0.0
            lr = lr_at(cfg, epoch * steps_per_epoch + max(first - 1, 0), steps_per_epoch)
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(train_loader.batches(first), start=first):
                global_step = epoch * steps_per_epoch + step
                lr = lr_at(cfg, global_step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast or nullcontext():
                    out_ = net(x)
                    if isinstance(out_, tuple):  # GoogLeNet's auxiliary classifiers
                        logits = out_[0]
                        loss = F.cross_entropy(logits, y) + cfg.aux_weight * sum(
                            F.cross_entropy(a, y) for a in out_[1:] if a is not None)
                    else:
                        logits = out_
                        loss = F.cross_entropy(logits, y)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    where = last_path if last_path.exists() else "none written yet"
                    raise TrainingDiverged(
                        f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; "
                        f"stopped without saving this state. Last good checkpoint: {where}. "
                        f"Try a lower --lr (now {cfg.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss_value * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                images_seen += len(y) * world
                if bar is not None:
                    rate = seen * world / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                                    acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
                    bar.update(1)
                for callback in callbacks or ():
                    callback({"epoch": epoch, "step": step, "global_step": global_step,
                              "loss": loss_value, "lr": lr})
                if stop.signal is not None:
                    if bar is not None:
                        bar.close()
                    if is_main:
                        save_checkpoint(last_path, snapshot(epoch, step + 1))
                    raise Interrupted(stop.signal, last_path)
            if bar is not None:
                bar.close()
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], device)
            metrics = evaluate(model, test_loader, device, autocast)
            seen = max(seen, 1.0)  # a run resumed after the epoch's last step saw none
            record = {
                "epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
                "train_top1": correct / seen, "test_loss": metrics["loss"],
                "test_top1": metrics["top1"], "test_top5": metrics["top5"],
                "epoch_s": epoch_time, "images_per_s": seen / epoch_time,
            }
            history.append(record)
            best = metrics["top1"] > best_top1
            best_top1 = max(best_top1, metrics["top1"])
            if is_main:
                state = snapshot(epoch + 1, 0)
                save_checkpoint(last_path, state)
                if best:
                    save_checkpoint(best_path, state)
                _write_records(out, history)
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                      f"acc {record['train_top1']:.4f} | test loss {metrics['loss']:.4f} "
                      f"top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f} | "
                      f"{record['images_per_s']:.0f} img/s", flush=True)

    final = history[-1] if history else {}
    summary = {
        "model": cfg.model, "data": spec.name, "macs": cost.macs, "params": cost.params,
        "top1": final.get("test_top1"), "top5": final.get("test_top5"),
        "loss": final.get("test_loss"), "best_top1": best_top1, "epochs": len(history),
        "wall_s": wall_before + time.perf_counter() - started,
        "train_images_per_s": (sum(h["images_per_s"] * h["epoch_s"] for h in history) /
                               max(1e-9, sum(h["epoch_s"] for h in history))),
        "device": _device_name(device), "world_size": world, "versions": _versions(),
        "allocator": allocator(),
        "config": asdict(cfg), "checkpoint": str(last_path), "out": str(out),
    }
    if is_main:
        _write_text(out / "summary.json", json.dumps(summary, indent=2))
        _plot(out, history, cfg.model)
    return summary


def _progress(total: int, initial: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_records(out: Path, history: List[dict]) -> None:
    """metrics.jsonl and metrics.csv, rewritten from the history (so a resumed run's files
    hold each epoch once)."""
    _write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    _write_text(out / "metrics.csv", buf.getvalue())


def _plot(out: Path, history: List[dict], title: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title=f"{title}: loss")
    ax2.plot(epochs, [h["train_top1"] for h in history], "o-", label="train top-1")
    ax2.plot(epochs, [h["test_top1"] for h in history], "s-", label="test top-1")
    ax2.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
