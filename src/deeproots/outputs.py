"""What a command may write, one rule for all of them: never a run's or a study's own file
(a run's ``last.pt``, a study's ``manifest.json``, whatever ``--overwrite`` says), never an
existing file unless asked. Torch-free. The run folder itself is
:mod:`deeproots.training.folder`; these are the names it holds."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .errors import DeeprootsError, RunFolderError
from .runtime import check_output_dir, check_output_file

__all__ = ["RUN_FILES", "RUN_MARKERS", "STUDY_FILES", "LOCK", "REPLACED", "check_new_file",
           "check_new_plot", "plot_format", "PLOT_FORMATS",
           "check_new_folder"]

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png",
             "tensorboard", "converted.pt")
# what only a run writes: a folder holding one of them (or its lock) is a run's. A file that
# other commands write too (converted.pt by ``rootify --out``, curves.png by ``plot-results``)
# does not make a folder a run's
RUN_MARKERS = ("last.pt", "best.pt", "metrics.jsonl")
STUDY_FILES = ("manifest.json", "study.md", "study.csv", "study.json", "accuracy.png")
LOCK = ".lock"
REPLACED = ".replaced"  # an old run's files, moved aside while a new run replaces it


def _owner(path: Path) -> Optional[str]:
    """What ``path`` belongs to when it is a run's or a study's own file, else None."""
    folder = path.parent
    if path.name in RUN_FILES + (LOCK, REPLACED) and any(
            (folder / name).exists() for name in RUN_MARKERS + (LOCK,)):
        return f"the run in {folder}"
    if path.name in STUDY_FILES and (folder / "manifest.json").exists():
        return f"the study in {folder}"
    return None


def check_new_file(path: Path | str, what: str = "--out", overwrite: bool = False) -> Path:
    """``path`` if a command may write it: a one-line :class:`RunFolderError` for a run's or a
    study's own file (never replaced by another command, ``overwrite`` or not), and for an
    existing file unless ``overwrite``; the checks of
    :func:`deeproots.runtime.check_output_file` too. Creates nothing."""
    path = check_output_file(path, what)
    owner = _owner(path)
    if owner:
        raise RunFolderError(f"{what} {path} is a file of {owner}; another command never "
                             f"replaces it: give a path outside that folder, or another name")
    if path.exists() and not overwrite:
        raise RunFolderError(f"{what} {path} already exists; add --overwrite to replace it")
    return path


PLOT_FORMATS = ("png", "svg", "pdf")  # what a figure is written as, by its file's suffix


def plot_format(path: Path | str, what: str = "--plot") -> str:
    """The format a figure at ``path`` is written in, from its suffix (one of
    :data:`PLOT_FORMATS`); a one-line error for another suffix or none."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise DeeprootsError(f"{what} {path}: a figure is written as "
                             f"{', '.join('.' + f for f in PLOT_FORMATS)}, by the file's "
                             f"suffix; got {('.' + suffix) if suffix else 'no suffix'}")
    return suffix


def check_new_plot(path: Path | str, what: str = "--plot", overwrite: bool = False) -> Path:
    """:func:`check_new_file` for a figure, its suffix one of :data:`PLOT_FORMATS`."""
    path = check_new_file(path, what, overwrite)
    plot_format(path, what)
    return path


def check_new_folder(path: Path | str, names: Sequence[str], what: str = "--out",
                     overwrite: bool = False) -> Path:
    """``path`` if a command may write its files ``names`` (and others of its own) there: a
    one-line :class:`RunFolderError` if one of ``names`` exists there, unless ``overwrite``;
    the checks of :func:`deeproots.runtime.check_output_dir` too. Creates nothing."""
    path = check_output_dir(path, what)
    held = [n for n in names if (path / n).exists()]
    if held and not overwrite:
        raise RunFolderError(f"{what} {path} already holds {', '.join(held)}; add --overwrite "
                             f"to replace them, or give another folder")
    return path
