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
* (what every command that writes a file of the user's checks first,
  :func:`~deeproots.outputs.check_new_file` and ``check_new_folder``, lives in
  :mod:`deeproots.outputs`: never a run's or a study's own file, never an existing file
  unless asked.)

    with RunFolder(out).lock() as folder:     # RunFolderError if another process has it
        folder.check(resume=False, overwrite=True)
        folder.begin(overwrite=True)
        ...
        folder.write_checkpoint(lambda: save_checkpoint(folder.last, state))
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import RunFolderError
from ..outputs import (LOCK, REPLACED, RUN_FILES, RUN_MARKERS, STUDY_FILES, check_new_file,
                       check_new_folder)
from ..runtime import check_output_dir, pid_alive, to_json, write_text

__all__ = ["RUN_FILES", "RUN_MARKERS", "STUDY_FILES", "RunFolder", "RunLock", "check_new_file",
           "check_new_folder", "lock_holder", "read_summary", "read_records"]


# locks this process holds: path -> depth (a study holds a run's lock while train takes it)
_HELD: Dict[str, int] = {}


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def lock_holder(folder: Path | str) -> Optional[int]:
    """The PID of another live process that holds ``folder``'s lock, or None."""
    pid = _read_pid(Path(folder) / LOCK)
    return pid if pid is not None and pid != os.getpid() and pid_alive(pid) else None


class RunLock:
    """``folder/.lock`` holding this process's PID while it writes the folder. Re-entrant
    within a process; a lock whose process is gone is stale and taken over; a lock held by
    another live process is a :class:`RunFolderError` naming it. The folders the lock made
    are removed with it where nothing else was written in them (a run that failed on its
    first batch leaves no empty folder behind)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._key = os.path.abspath(self.path)
        self._made: List[Path] = []  # the folders acquire() created, deepest first

    def acquire(self) -> "RunLock":
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            return self
        self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
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
        for made in self._made:  # deepest first; a folder something was written in stays
            try:
                made.rmdir()
            except OSError:
                break
        self._made = []

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
        nor ``overwrite`` names (a one-line :class:`RunFolderError`). Writes nothing; call
        :meth:`recover_pending` first, so that a run an interrupted ``--overwrite`` moved
        aside counts as the run it is."""
        check_output_dir(self.path)
        if resume:
            if overwrite:
                raise RunFolderError("--resume continues the run in --out and --overwrite "
                                     "replaces it; give one of them")
            if not self.last.exists():
                raise RunFolderError(f"--resume: no checkpoint at {self.last}; start the run "
                                     f"without --resume, or pass the --out of the run to "
                                     f"resume")
            return
        if (self.path / STUDY_FILES[0]).exists():  # manifest.json: the study's folder
            raise RunFolderError(f"--out {self.path} holds a study ({STUDY_FILES[0]}); its "
                                 f"runs are the study's, in {self.path / 'runs'}: give another "
                                 f"--out (deeproots study FAMILY --out {self.path} adds "
                                 f"variants and seeds to it)")
        held = self.files()
        if held and not overwrite:
            raise RunFolderError(f"--out {self.path} already holds a run ({', '.join(held)}); "
                                 f"add --resume to continue it or --overwrite to replace it")

    def recover_pending(self) -> Optional[str]:
        """Before a run is set up: finish or undo a replacement a crash interrupted
        (:meth:`recover`), holding the lock for that moment, so that the folder holds one
        whole run before anything is judged or read. Nothing is created where there is
        nothing to recover. Returns what was done, or None."""
        if not (self.path / REPLACED).is_dir():
            return None
        with RunLock(self.path):
            return self.recover()

    def confirm(self, resume: bool, overwrite: bool, seen: Optional[tuple] = None) -> None:
        """With the lock held, just before a run writes: :meth:`check` again (another
        process may have finished a run here while this one was starting) and, for a
        resumed run, that ``last.pt`` is still the checkpoint it loaded (``seen``, from
        :meth:`stamp`)."""
        try:
            self.check(resume, overwrite)
        except RunFolderError as err:
            raise RunFolderError(f"{err} (it changed while this run was starting; nothing "
                                 f"was written)") from None
        if resume and seen is not None and self.stamp() != seen:
            raise RunFolderError(f"{self.last} changed while this run was starting (another "
                                 f"process wrote it); nothing was written: resume again")

    def stamp(self) -> Optional[tuple]:
        """``last.pt``'s size and modification time (None if absent): what a resumed run
        checks again before it writes."""
        try:
            st = self.last.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

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
        for name in RUN_FILES:  # what the new run wrote before its first last.pt (best.pt)
            new = self.path / name
            if new.is_file() and not (aside / name).exists():
                new.unlink()
        for item in aside.iterdir():
            os.replace(item, self.path / item.name)
        aside.rmdir()
        return "restored the run that an interrupted --overwrite was replacing"

    def begin(self, overwrite: bool) -> None:
        """Start writing a run: with ``overwrite`` the old run stays, whole, until
        :meth:`write_checkpoint` first writes ``last.pt``."""
        self.replacing = overwrite and self.holds_run()

    def write_checkpoint(self, write_last: Callable[[], None],
                         write_best: Optional[Callable[[], None]] = None) -> None:
        """Write ``best.pt`` by ``write_best()`` (when the epoch is the best so far), then
        ``last.pt`` by ``write_last()``: a crash between the two leaves the old ``last.pt``,
        whose resume repeats the epoch and writes both again (never a ``last.pt`` whose best
        epoch has no ``best.pt``). On the first call of a replacing run, the old run's files
        are moved aside first and removed after (see :meth:`recover`)."""
        def write() -> None:
            if write_best is not None:
                write_best()
            write_last()

        if not self.replacing:
            write()
            return
        aside = self.path / REPLACED
        aside.mkdir(exist_ok=True)
        for name in self.files():
            os.replace(self.path / name, aside / name)
        try:
            write()
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


# ---------------------------------------------------------------------------------------------
# Reading a run's files back: summary.json and metrics.jsonl, checked to be what a run wrote

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# what every summary.json a finished run writes holds, and the check of each
SUMMARY = "summary.json"  # a finished run's summary, in its folder
SUMMARY_FIELDS = {
    "model": lambda v: isinstance(v, str) and bool(v), "data": lambda v: isinstance(v, str),
    "top1": lambda v: _number(v) and 0 <= v <= 1, "top5": lambda v: _number(v) and 0 <= v <= 1,
    "macs": _count, "params": _count, "epochs": _count,
    "train_images_per_s": lambda v: _number(v) and v >= 0,
    "config": lambda v: isinstance(v, dict)}
# the fields of each kind of record in metrics.jsonl that a figure reads
RECORD_FIELDS = {"step": ("step", "train_loss", "lr"),
                 "epoch": ("epoch", "train_loss", "lr", "test_top1")}


def find_summaries(paths: Sequence[Path | str]) -> List[Path]:
    """The ``summary.json`` files ``paths`` name: a file as it is; a run's folder, its
    summary; a folder of runs (a study's, a sweep's), every summary one or two levels down,
    in name order. A one-line :class:`RunFolderError` for a folder that holds none."""
    found: List[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            found.append(path)  # read_summary says what is wrong with it, if anything
            continue
        inside = [path / SUMMARY] if (path / SUMMARY).is_file() else sorted(
            [*path.glob(f"*/{SUMMARY}"), *path.glob(f"*/*/{SUMMARY}")])
        if not inside:
            raise RunFolderError(f"{path} holds no {SUMMARY}: give a run's folder, a folder of "
                                 f"runs (a study's), or summary.json files")
        found += inside
    return found


def read_summary(path: Path | str, fields: Sequence[str] = tuple(SUMMARY_FIELDS)) -> dict:
    """A finished run's ``summary.json``, checked to hold what a run writes of ``fields``
    (default all: model, data, top-1 and top-5 in [0, 1], multiply-adds, params, epochs,
    images/s, config); a one-line :class:`RunFolderError` naming the first field missing or
    wrong otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise RunFolderError(f"{path} is not a deeproots summary.json "
                             f"({err.strerror or err})") from None
    except ValueError as err:
        raise RunFolderError(f"{path} is not a deeproots summary.json (not JSON: {err})"
                             ) from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} is not a deeproots summary.json (a JSON "
                             f"{type(data).__name__}, not an object)")
    for name in fields:
        ok = SUMMARY_FIELDS[name]
        if name not in data:
            raise RunFolderError(f"{path} is not a deeproots summary.json (field {name!r} "
                                 f"missing)")
        if not ok(data[name]):
            shown = repr(data[name])
            raise RunFolderError(f"{path} is not a deeproots summary.json (field {name!r} is "
                                 f"{shown[:40]})")
    return data


def read_records(metrics: Path | str) -> List[dict]:
    """The records of a run's ``metrics.jsonl`` (an unreadable last line, cut by a crash,
    left out), each checked to hold the fields of its kind (:data:`RECORD_FIELDS`); a
    one-line :class:`RunFolderError` if the file is missing, holds no record, or holds
    something a run does not write."""
    metrics = Path(metrics)
    try:
        lines = metrics.read_text().splitlines()
    except OSError as err:
        raise RunFolderError(f"{metrics}: cannot read the run's records "
                             f"({err.strerror or err})") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break  # a line a crash cut short
            raise RunFolderError(f"{metrics}: line {i + 1} is not a record") from None
        kind = record.get("kind", "epoch") if isinstance(record, dict) else None
        needed = RECORD_FIELDS.get(kind)
        if needed is None or not all(_number(record.get(k)) for k in needed):
            if not isinstance(record, dict):
                what = f"a JSON {type(record).__name__}"
            else:
                lacking = [k for k in needed or ("kind",) if not _number(record.get(k))]
                what = f"a {kind!r} record without {', '.join(lacking)}"
            raise RunFolderError(f"{metrics}: line {i + 1} is {what}; a run writes step "
                                 f"and epoch records")
        records.append(record)
    if not records:
        raise RunFolderError(f"{metrics} holds no records yet (the run writes one every "
                             f"--log-every steps and at each epoch's end)")
    return records
