"""Training a model on real data, and what a run owns: opening it (:mod:`.run`: its folder's
name, start, resume or replace, checked before anything is written), the loop (:mod:`.loop`),
the step (:mod:`.step`) and what it minimises (:mod:`.objectives`), evaluation
(:mod:`.evaluate`), the checkpoint's schema (:mod:`.checkpoint`), the run folder and its
records (:mod:`.folder`, :mod:`.records`), the data (:mod:`.data`), data parallelism
(:mod:`.distributed`) and the paper's accuracy study (:mod:`.study`)."""
from .loop import Interrupted, TrainingDiverged, TrainSummary, train
from .run import open_run

__all__ = ["train", "open_run", "Interrupted", "TrainingDiverged", "TrainSummary"]
