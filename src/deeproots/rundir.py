"""The run folder: one owner for what lies in a training run's ``--out`` and for every file
a command writes where a run could be. Torch-free.

* :class:`RunFolder`: a run's files (:data:`RUN_FILES`), its lock (``.lock``, the PID of
  the process writing it; re-entrant within a process, taken over when its process is
  gone), the check of a new run against what the folder holds, and the replacement of an
  old run (``--overwrite``) that keeps every old file until the new run has written its
  first checkpoint: the old files are moved into ``.replaced/``, the new ``last.pt`` is
  written, then ``.replaced/`` is removed. A crash in between is finished or undone the
  next time the folder is locked (:meth:`RunFolder.recover`), so the folder always holds one
  whole run.
* :func:`check_new_file` / :func:`check_new_folder`: what every command that writes a file
  of the user's checks first: never a run's or a study's own file, never an existing file
  unless asked (``--overwrite``).

    with RunFolder(out).lock() as folder:     # RunFolderError if another process has it
        folder.check(resume=False, overwrite=True)
        folder.begin(overwrite=True)
        ...
        folder.write_checkpoint(lambda: save_checkpoint(folder.last, state))
"""
from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .errors import RunFolderError
from .runtime import check_output_dir, check_output_file, to_json, write_text

__all__ = ["RUN_FILES", "RUN_MARKERS", "STUDY_FILES", "RunFolder", "RunLock", "check_new_file",
           "check_new_folder", "lock_holder"]

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png",
             "tensorboard", "converted.pt")
# what only a run writes: a folder holding one of them (or its lock) is a run's. A file that
# other commands write too (converted.pt by ``rootify --out``, curves.png by ``plot-results``)
# does not make a folder a run's
RUN_MARKERS = ("last.pt", "best.pt", "metrics.jsonl")
STUDY_FILES = ("manifest.json", "study.md", "study.csv", "study.json", "accuracy.png")
LOCK = ".lock"
REPLACED = ".replaced"  # an old run's files, moved aside while a new run replaces it

# locks this process holds: path -> depth (a study holds a run's lock while train takes it)
_HELD: Dict[str, int] = {}


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def lock_holder(folder: Path | str) -> Optional[int]:
    """The PID of another live process that holds ``folder``'s lock, or None."""
    pid = _read_pid(Path(folder) / LOCK)
    return pid if pid is not None and pid != os.getpid() and _alive(pid) else None


class RunLock:
    """``folder/.lock`` holding this process's PID while it writes the folder. Re-entrant
    within a process; a lock whose process is gone is stale and taken over; a lock held by
    another live process is a :class:`RunFolderError` naming it."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._key = os.path.abspath(self.path)

    def acquire(self) -> "RunLock":
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = lock_holder(self.folder)
                if pid is not None:
                    raise RunFolderError(
                        f"--out {self.folder} is in use by another run (process {pid}, "
                        f"{self.path}); wait for it to end or give another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            _HELD[self._key] = 1
            return self
        raise RunFolderError(f"could not take the lock {self.path}; another process keeps "
                             f"taking it")

    def release(self) -> None:
        depth = _HELD.get(self._key, 0)
        if depth > 1:
            _HELD[self._key] = depth - 1
            return
        _HELD.pop(self._key, None)
        if _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder:
    """The folder of one training run (``--out``)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.replacing = False  # an old run waits to be replaced at the first checkpoint

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def files(self) -> List[str]:
        """The run files the folder holds, in :data:`RUN_FILES` order."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def holds_run(self) -> bool:
        return bool(self.files())

    def lock(self) -> "_LockedFolder":
        """A context that holds the folder's lock (and first finishes or undoes a
        replacement a crash interrupted); yields the folder."""
        return _LockedFolder(self)

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse a folder that cannot be written, or that holds a run neither ``resume``
        nor ``overwrite`` names (a one-line :class:`RunFolderError`). Writes nothing."""
        check_output_dir(self.path)
        if resume:
            if overwrite:
                raise RunFolderError("--resume continues the run in --out and --overwrite "
                                     "replaces it; give one of them")
            if not self.last.exists() and not (self.path / REPLACED / "last.pt").exists():
                raise RunFolderError(f"--resume: no checkpoint at {self.last}; start the run "
                                     f"without --resume, or pass the --out of the run to "
                                     f"resume")
            return
        held = self.files()
        if held and not overwrite:
            raise RunFolderError(f"--out {self.path} already holds a run ({', '.join(held)}); "
                                 f"add --resume to continue it or --overwrite to replace it")

    def recover(self) -> Optional[str]:
        """Finish or undo a replacement that a crash interrupted (call with the lock held):
        if the new run wrote its first checkpoint, the old run's files are removed; if not,
        they are put back. Returns what was done, or None."""
        aside = self.path / REPLACED
        if not aside.is_dir():
            return None
        if self.last.exists():
            shutil.rmtree(aside)
            return "removed the files of the run this one replaced"
        for item in aside.iterdir():
            os.replace(item, self.path / item.name)
        aside.rmdir()
        return "restored the run that an interrupted --overwrite was replacing"

    def begin(self, overwrite: bool) -> None:
        """Start writing a run: with ``overwrite`` the old run stays, whole, until
        :meth:`write_checkpoint` first writes ``last.pt``."""
        self.replacing = overwrite and self.holds_run()

    def write_checkpoint(self, write_last: Callable[[], None]) -> None:
        """Write ``last.pt`` by ``write_last()``; on the first call of a replacing run, the
        old run's files are moved aside first and removed after (see :meth:`recover`)."""
        if not self.replacing:
            write_last()
            return
        aside = self.path / REPLACED
        aside.mkdir(exist_ok=True)
        for name in self.files():
            os.replace(self.path / name, aside / name)
        try:
            write_last()
        except BaseException:  # a full disk, say: the old run goes back where it was
            self.recover()
            raise
        shutil.rmtree(aside)
        self.replacing = False

    def write_records(self, history: Sequence[dict], steps: Sequence[dict] = ()) -> None:
        """``metrics.jsonl`` (every step and epoch record, in the order of their steps) and
        ``metrics.csv`` (the epoch records), rewritten from the records a checkpoint holds
        (so a resumed run's files hold each record once, none from after its checkpoint),
        atomically."""
        order = {"step": 0, "epoch": 1}
        merged = sorted(list(steps) + list(history),
                        key=lambda r: (r.get("step", 0), order.get(r.get("kind"), 1)))
        write_text(self.path / "metrics.jsonl", "".join(to_json(r) + "\n" for r in merged))
        buf = io.StringIO()
        if history:  # every key of every record (a run resumed from an older version adds some)
            keys = list(dict.fromkeys(k for h in history for k in h))
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        write_text(self.path / "metrics.csv", buf.getvalue())

    def append_record(self, record: dict) -> None:
        """One record appended to ``metrics.jsonl`` as it happens (the file is rewritten
        whole at the next checkpoint, so a line cut by a crash does not last)."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(to_json(record) + "\n")


class _LockedFolder:
    def __init__(self, folder: RunFolder):
        self.folder, self._lock = folder, RunLock(folder.path)

    def __enter__(self) -> RunFolder:
        self._lock.acquire()
        try:
            self.folder.recover()
        except BaseException:
            self._lock.release()
            raise
        return self.folder

    def __exit__(self, *exc) -> None:
        self._lock.release()


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
