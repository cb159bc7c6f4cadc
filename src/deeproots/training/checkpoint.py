"""Checkpoints: writing and reading them safely, checking what they hold, rebuilding their
model, and the one rule for resuming a run (:func:`resume_config`).

A checkpoint holds only tensors and plain Python values and loads with
``torch.load(weights_only=True)``: a file from outside cannot run code. Before a resumed run
writes anything, every field it will use is checked (:func:`validate_state`), so an edited
or foreign checkpoint is one line naming the field, never a run on nonsense.
"""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from ..config import (RESUMABLE_SETTINGS, TrainConfig, config_defaults, given_settings,
                     setting_differences)
from ..errors import CheckpointError, DeeprootsError, first_line
from ..models.layers import apply_groups, conv_layers
from ..models.registry import (build_model, is_model, is_user_model, model_source_digest,
                               resolve_model_spec)
from ..runtime import atomic_write, file_digest, to_json
from ..weights import load_weights_only

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "validate_state",
           "snapshot", "restore",
           "model_from_checkpoint", "config_from_checkpoint", "resume_config",
           "changes_of", "save_model", "NEEDED"]

NEEDED = ("model", "model_cfg", "config", "epoch", "step")  # what makes a deeproots checkpoint


def save_checkpoint(path: Path | str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over the old one. A crash or a full disk leaves the old file."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_model(path: Union[str, Path], model: nn.Module, source: dict, **extra) -> None:
    """``model`` (converted from the checkpoint ``source`` holds) written as a deeproots
    checkpoint: its weights, the source's model name and arguments with the groups of
    ``model``'s convs, the source's run config and data; ``extra`` fields beside them.
    ``deeproots eval``, ``export`` and ``train --init`` take it."""
    cfg = source["model_cfg"]
    save_checkpoint(path, {
        "model": model.state_dict(),
        "model_cfg": {"name": cfg["name"], "kwargs": cfg.get("kwargs", {}), "groups": {
            n: c.groups for n, c in conv_layers(model).items() if c.groups > 1}},
        "config": source["config"], "epoch": 0, "step": 0, "data": source.get("data", {}),
        # plain values only (a report's numpy floats would not load with weights_only)
        **json.loads(to_json(extra))})


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Read a deeproots checkpoint with ``torch.load(weights_only=True)``: a file from
    outside cannot run code. CheckpointError if it is missing, empty, corrupt, unsafe or not
    a deeproots checkpoint."""
    state = load_weights_only(path, map_location)
    if not isinstance(state, dict) or any(k not in state for k in NEEDED):
        missing = [k for k in NEEDED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a deeproots checkpoint (it lacks "
                              f"{', '.join(missing)})")
    return state


# ---------------------------------------------------------------------------------------------
# What a checkpoint may hold


def _bad(path, name: str, value: Any, expected: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{path}: field {name!r} is {shown}; expected {expected}. The "
                           f"checkpoint was edited or is not one this deeproots wrote")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _check_rng(path, name: str, value, reference: torch.Tensor) -> None:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8
            and value.shape == reference.shape):
        shown = (f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                 if isinstance(value, torch.Tensor) else type(value).__name__)
        raise _bad(path, name, shown, f"the generator's state, a uint8 tensor of shape "
                                      f"{tuple(reference.shape)}")


def validate_state(state: dict, path: Path | str = "the checkpoint") -> TrainConfig:
    """Check every field of a training checkpoint that a resumed run uses (types, ranges, and
    agreement with its own config); returns the run's :class:`TrainConfig`. A one-line
    :class:`CheckpointError` names the first field that is wrong."""
    cfg_dict = state["config"]
    if not isinstance(cfg_dict, dict):
        raise _bad(path, "config", cfg_dict, "a dict of the run's settings")
    known = {f.name for f in fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in cfg_dict.items() if k in known and k != "resume"})
        cfg.check()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config is not a run's settings ({first_line(err)})"
                              ) from None
    model_cfg = state["model_cfg"]
    if not (isinstance(model_cfg, dict) and isinstance(model_cfg.get("name"), str)
            and isinstance(model_cfg.get("kwargs", {}), dict)
            and isinstance(model_cfg.get("groups", {}), dict)
            and all(isinstance(k, str) and _whole(g) and g >= 1
                    for k, g in model_cfg.get("groups", {}).items())):
        raise _bad(path, "model_cfg", model_cfg, "a dict of name, kwargs and groups")
    epoch, step = state["epoch"], state["step"]
    if not _whole(epoch) or not 0 <= epoch <= cfg.epochs:
        raise _bad(path, "epoch", epoch, f"a whole number from 0 to the run's {cfg.epochs} "
                                         f"epochs")
    if not _whole(step) or step < 0 or (epoch == cfg.epochs and step):
        raise _bad(path, "step", step, "a whole number >= 0 (0 once the last epoch ended)")
    if not isinstance(state["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise _bad(path, "model", type(state["model"]).__name__, "a state dict of tensors")
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch or not all(
            isinstance(h, dict) and h.get("epoch") == i + 1 and _finite(h.get("epoch_s"))
            for i, h in enumerate(history)):
        raise _bad(path, "history", history, f"a list of {epoch} epoch records (epoch 1 to "
                                             f"{epoch})")
    best = state.get("best_top1")
    if not _finite(best) or not -1 <= best <= 1:
        raise _bad(path, "best_top1", best, "a number from -1 (none yet) to 1")
    if not _finite(state.get("wall_s")) or state["wall_s"] < 0:
        raise _bad(path, "wall_s", state.get("wall_s"), "a finite number of seconds >= 0")
    sums = state.get("epoch_sums", [0.0, 0.0, 0.0, 0.0])
    if not (isinstance(sums, list) and len(sums) == 4 and all(_finite(s) and s >= 0
                                                             for s in sums)):
        raise _bad(path, "epoch_sums", sums, "4 finite numbers >= 0 (loss, correct, seen, "
                                             "seconds)")
    if not isinstance(state.get("changes", []), list) or not all(
            isinstance(c, dict) for c in state.get("changes", [])):
        raise _bad(path, "changes", state.get("changes"), "a list of change records")
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and "state" in optimizer
            and isinstance(optimizer.get("param_groups"), list)):
        raise _bad(path, "optimizer", type(optimizer).__name__, "an optimizer state dict")
    if "rng_cpu" not in state:
        raise _bad(path, "rng_cpu", None, "the CPU generator's state")
    _check_rng(path, "rng_cpu", state["rng_cpu"], torch.get_rng_state())
    if "rng_cuda" in state and torch.cuda.is_available():
        _check_rng(path, "rng_cuda", state["rng_cuda"], torch.cuda.get_rng_state())
    if state.get("memory_format", "contiguous") not in ("channels-last", "contiguous"):
        raise _bad(path, "memory_format", state.get("memory_format"),
                   "channels-last or contiguous")
    steps = state.get("steps", [])
    if not isinstance(steps, list) or not all(
            isinstance(s, dict) and s.get("kind") == "step" and _whole(s.get("step"))
            for s in steps):
        raise _bad(path, "steps", steps, "a list of step records")
    if not isinstance(state.get("distill_sha256", ""), str):
        raise _bad(path, "distill_sha256", state.get("distill_sha256"), "a SHA-256 in hex")
    if not isinstance(state.get("dispatch", []), list):
        raise _bad(path, "dispatch", state.get("dispatch"), "a list of measured choices")
    return cfg


def model_from_checkpoint(state: dict, path: Path | str = "the checkpoint",
                          model: Union[None, str, nn.Module] = None,
                          how: Optional[str] = None) -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights. A registered
    model is rebuilt by name; a model of the user's own (``FILE.py:FUNCTION``, or one passed
    to :func:`deeproots.training.loop.train`) only from ``model`` (that spec, or the module), since
    deeproots never runs code named inside a file: the name a checkpoint holds is never run.
    ``how``: what the refusal advises (the command's own way to name the model; default
    ``--model FILE.py:FUNCTION``). CheckpointError if the weights do not fit."""
    cfg = state["model_cfg"]
    name = cfg["name"]
    if model is None and not is_model(name):
        if how is None:
            how = (f"pass --model {name} (model='{name}')" if is_user_model(name) else
                   "pass the model it was trained as (model=...)")
        raise CheckpointError(f"{path} holds a model of your own, {name}; deeproots never runs "
                              f"code named in a checkpoint: {how} to rebuild it")
    try:
        if isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        else:
            model = build_model(model or name, **cfg["kwargs"])
        apply_groups(model, {glob.escape(k): g for k, g in cfg.get("groups", {}).items()},
                     reinit=False)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its weights do not fit the model its config names "
                              f"({first_line(err)})") from err
    if isinstance(state.get("data"), dict) and state["data"]:
        model.trained_on = dict(state["data"])  # what its inputs were (pretrained_cfg)
    return model


def config_from_checkpoint(path: Path | str) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint's run was started with (``resume`` off)."""
    saved = load_checkpoint(path)["config"]
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known and k != "resume"})


# ---------------------------------------------------------------------------------------------
# Resuming


def _normalised(given: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(given)
    if isinstance(out.get("model"), str):
        out["model"] = resolve_model_spec(out["model"])
    return out


def resume_config(out: Path | str, given: Union[None, TrainConfig, Mapping[str, Any]] = None,
                  state: Optional[dict] = None) -> TrainConfig:
    """The config that continues the run in ``out``: the settings the run was started with,
    and of ``given`` (the settings a caller set: a mapping, or a :class:`TrainConfig`, whose
    fields that differ from the defaults count as set) only those that do not define the run
    (device, workers, ...), or those ``change`` names. A setting that defines the run
    (:data:`~deeproots.config.RESUMABLE_SETTINGS`) and differs from the run's is a one-line
    error naming both values, unless ``change`` names it. ``train(TrainConfig(resume=True,
    out=D))`` alone continues the run in D."""
    out = Path(out)
    if given is None:
        given = {}
    elif isinstance(given, TrainConfig):
        given = given_settings(given)
    if given.get("overwrite"):
        raise DeeprootsError("--resume continues the run in --out and --overwrite replaces "
                             "it; give one of them")
    if state is None:
        state = load_checkpoint(out / "last.pt")
    saved = asdict(validate_state(state, out / "last.pt"))
    given = _normalised({k: v for k, v in given.items() if k not in ("resume", "out")})
    if "memory_format" in given:  # compared as the layouts they name ("auto": the run's own)
        run_layout = state.get("memory_format") or _layout_of(saved["memory_format"])
        wanted = run_layout if given["memory_format"] == "auto" else given["memory_format"]
        saved["memory_format"] = run_layout
        if wanted == run_layout:
            given.pop("memory_format")
    if is_user_model(saved["model"]) and "model" not in given:
        raise CheckpointError(
            f"this run's model is built by {saved['model']}; deeproots never runs code named "
            f"in a checkpoint: name it to resume with deeproots train {saved['model']} --resume "
            f"--out {os.path.abspath(out)} (in Python: model='{saved['model']}')")
    change = list(given.get("change", []))
    for name in change:
        if name not in RESUMABLE_SETTINGS:
            raise DeeprootsError(f"change takes settings of the run "
                                 f"({', '.join(RESUMABLE_SETTINGS)}); got {name!r}")
    if "opt" in change and given.get("opt", saved["opt"]) != saved["opt"]:
        raise DeeprootsError(f"resume: this run was started with opt = {saved['opt']!r}, and "
                             f"its checkpoint holds that optimizer's state; it cannot go on "
                             f"by {given['opt']!r}. Fine-tune its weights instead: deeproots "
                             f"train --init {out / 'last.pt'} --opt {given['opt']}")
    for name, old, new in setting_differences(saved, given):
        if name not in change:
            raise DeeprootsError(
                f"resume: this run was started with {name} = {old!r}, not {new!r}; leave "
                f"{name} out to keep the run's value, or allow the change with change="
                f"['{name}'] (--change {name} on the command line; it is recorded in the "
                f"run's history)")
    defaults = config_defaults(TrainConfig)
    merged = {**defaults, **saved, **given, "resume": True, "overwrite": False, "out": str(out)}
    return TrainConfig(**{k: merged[k] for k in defaults}).check()


def _layout_of(memory_format: str) -> str:
    """The layout a ``memory_format`` setting names (``auto``: channels-last, the rule of
    :func:`deeproots.training.step.choose_layout` on every device)."""
    return "channels-last" if memory_format == "auto" else memory_format


def changes_of(cfg: TrainConfig, state: dict) -> List[dict]:
    """The settings ``cfg`` changes against the checkpoint's run, as history records (each
    one named in ``cfg.change``; :func:`resume_config` refused the rest). The memory format
    is compared as the layout each names."""
    saved = {**config_defaults(TrainConfig), **state["config"]}
    now = asdict(cfg)
    run_layout = state.get("memory_format") or _layout_of(saved["memory_format"])
    saved["memory_format"] = run_layout
    now["memory_format"] = run_layout if now["memory_format"] == "auto" else \
        now["memory_format"]
    return [{"setting": name, "from": old, "to": new, "epoch": state["epoch"],
             "step": state["step"]}
            for name, old, new in setting_differences(saved, now)]


# ---------------------------------------------------------------------------------------------
# A training run's checkpoint: written and read back


def snapshot(run, epoch: int, step: int) -> dict:
    """The training checkpoint of ``run`` (the loop's state) at ``epoch`` and ``step``: the
    one place that says what a checkpoint holds (:func:`restore` reads it back,
    :func:`validate_state` checks it). Tensors and plain values only, so it loads with
    ``torch.load(weights_only=True)``."""
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
        from ..kernels.modules import dispatch_cache  # loaded already: the run uses it

        state["dispatch"] = list(dispatch_cache().items())  # tuples load safely
    return state


def restore(run) -> None:
    """A resumed run (``run``, the loop's state) given what its checkpoint ``run.state``
    holds: the weights, the optimizer (its buffers checked against the parameters), the
    position, the records, the penalty's blocks and the random state, all validated by
    :func:`validate_state` when the run was opened; the teacher checked to be the one it
    started with, a model file of the user's that changed since said, and a best.pt an older
    deeproots lost written again."""
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


def _check_optimizer_state(run) -> None:
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


def _repair_best(run) -> None:
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


def _check_teacher(run) -> None:
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
