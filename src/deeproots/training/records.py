"""What a run records as it goes, besides its checkpoints: a step record every ``log_every``
steps (and at least every 30 s) in ``metrics.jsonl`` and TensorBoard, and the progress bar."""
from __future__ import annotations

from pathlib import Path

from ..errors import DeeprootsError

__all__ = ["LOG_EVERY_S", "record_step", "TensorBoard", "progress"]


LOG_EVERY_S = 30.0  # a step record at least this often, however slow the steps


def record_step(run, epoch: int, global_step: int, lr: float, now: float) -> None:
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


class TensorBoard:
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


def progress(total: int, initial: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm  # only on a terminal

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
