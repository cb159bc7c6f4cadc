"""Opening a run, one owner for the CLI, :func:`deeproots.training.train` and the study: where
the run goes (its folder's name), whether it starts, resumes or replaces the run there, the
checks that come before anything is written, and the checkpoint a resumed run continues,
loaded once (:func:`open_run`)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import DeeprootsError
from ..models.registry import (check_model_spec, is_model, is_user_model, model_entry,
                               model_slug, resolve_model_spec)
from ..runtime import check_output_dir, resolve_device
from ..speed.paths import resolve_grouped_conv
from .checkpoint import (CheckpointError, changes_of, load_checkpoint, resume_config,
                         validate_state)
from .distributed import rank
from .folder import RunFolder
from .records import TensorBoard

__all__ = ["OpenedRun", "open_run", "default_out", "study_run_folder", "resume_command"]


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


def study_run_folder(study: Path | str, model: str, seed: int) -> Path:
    """``STUDY/runs/MODEL-seedN``: where a study trains ``model`` with ``seed``."""
    return Path(study) / "runs" / f"{model}-seed{seed}"


@dataclass
class OpenedRun:
    """A run opened by :func:`open_run`: its config (a resumed run's own settings, paths
    and model recorded resolved), device, folder, how its grouped convs run (resolved
    once), the checkpoint a resumed run continues and when it was written (``seen``, checked
    again under the lock), a fine-tune's ``init`` checkpoint, and the changes of setting."""

    cfg: TrainConfig
    device: torch.device
    folder: RunFolder
    grouped_conv: str
    state: Optional[dict] = None
    seen: Optional[tuple] = None
    init_state: Optional[dict] = None
    changes: List[dict] = field(default_factory=list)


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


def open_run(cfg: TrainConfig, *, given: Optional[Mapping[str, Any]] = None,
             model: Optional[nn.Module] = None, continue_if_possible: bool = False
             ) -> OpenedRun:
    """Everything a run decides before it reads data: the settings (``cfg.check``), the
    files it names, the model's name (a fine-tune's from its ``init`` checkpoint, never code
    a checkpoint names), the device and how grouped convs run there, the folder (an
    interrupted replacement finished or undone first, then judged: a run there is never
    replaced unless asked), and for a resumed run its checkpoint, loaded and validated once,
    with :func:`~deeproots.training.checkpoint.resume_config`'s rule for the settings.

    ``given``: the settings the caller named (the command line's flags), for the resume rule;
    default, those of ``cfg`` that differ from the defaults. ``continue_if_possible`` (a
    study's runs): resume the run in the folder when its checkpoint is good, else start over
    what a failed start left. Writes nothing."""
    cfg.check()
    if cfg.tensorboard:
        TensorBoard.check_installed()
    init_state = None
    cfg = _files_checked(cfg)
    if not cfg.resume:  # recorded absolute (the run resumes from any folder) and resolved
        paths = {k: os.path.abspath(getattr(cfg, k)) for k in ("init", "distill")
                 if getattr(cfg, k)}
        if cfg.init:
            init_state = load_checkpoint(cfg.init)
            paths["model"] = _init_model(cfg, init_state, model)
        cfg = replace(cfg, lr=cfg.peak_lr, **paths)
    if model is None and cfg.model is not None:
        check_model_spec(cfg.model)
    device = resolve_device(cfg.device)
    grouped_conv = resolve_grouped_conv(cfg.grouped_conv, device.type, cfg.compile)
    if cfg.resume and not cfg.out and cfg.model is None:
        raise DeeprootsError("--resume continues the run in --out: give --out DIR (or the "
                             "model name, for its default folder runs/MODEL-DATA-seedN)")
    folder = RunFolder(cfg.out or default_out(cfg))
    opened = OpenedRun(cfg, device, folder, grouped_conv, init_state=init_state)
    if cfg.resume or continue_if_possible or rank() == 0:
        # under torchrun rank 0 alone judges the folder: it may already be writing
        # there while another rank is still starting
        done = folder.recover_pending()
        if done:
            print(f"{folder.path}: {done}", file=sys.stderr)
        if continue_if_possible:
            cfg = opened.cfg = _continue_or_start(opened)
        folder.check(cfg.resume, cfg.overwrite)
    if cfg.resume:
        opened.seen = folder.stamp()
        if opened.state is None:
            opened.state = load_checkpoint(folder.last, map_location=device)
        opened.cfg = cfg = resume_config(folder.path, cfg if given is None else given,
                                         opened.state)
        opened.changes = list(opened.state.get("changes", [])) + changes_of(cfg, opened.state)
    elif model is None:  # recorded resolved: the run resumes from any folder
        opened.cfg = replace(cfg, model=resolve_model_spec(cfg.model))
    if cfg.tensorboard:
        check_output_dir(folder.path / "tensorboard", "--tensorboard folder")
    return opened


def _files_checked(cfg: TrainConfig) -> TrainConfig:
    """The checkpoint files the run reads: a fine-tune's ``init`` (not a resumed run's: its
    own checkpoint holds the model) and a ``distill`` teacher."""
    needed = (("distill", cfg.distill),) if cfg.resume else (("init", cfg.init),
                                                             ("distill", cfg.distill))
    for what, path in needed:
        if path and not Path(path).is_file():
            hint = ("; restore it, or continue with another teacher: --change distill "
                    "--distill FILE" if cfg.resume else "")
            raise CheckpointError(f"{what} {path}: no such checkpoint file{hint}")
    return cfg


def _continue_or_start(opened: OpenedRun) -> TrainConfig:
    """A study's run: resumed from its checkpoint when that is a good one (loaded here,
    once), else started over what a failed start left (which the new run replaces at its
    first checkpoint)."""
    cfg, folder = opened.cfg, opened.folder
    if folder.last.exists():
        try:
            state = load_checkpoint(folder.last, map_location=opened.device)
            validate_state(state, folder.last)
            opened.state = state
            return replace(cfg, resume=True, overwrite=False)
        except CheckpointError as err:
            print(f"deeproots: {err}; starting {folder.path.name} afresh", file=sys.stderr)
    return replace(cfg, resume=False, overwrite=folder.holds_run())
