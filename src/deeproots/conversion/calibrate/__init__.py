"""A trained CNN converted into a root network that keeps its accuracy, with no gradient step:
the stages of :mod:`.pipeline`, each a module of this package (:mod:`.assignment`,
:mod:`.sites`, :mod:`.batchnorm`, :mod:`.refit`), over the passes of :mod:`.passes`,
reported by :mod:`.report`."""
from .assignment import assign_groups
from .batchnorm import reestimate_batchnorm
from .passes import DensePasses, calibration_batches
from .pipeline import PIPELINE, REFITS, STAGES, Conversion, Stage, calibrate, check_trained
from .refit import conv_patches, refit_grouped, refit_pointwise
from .report import CalibrationReport, LayerCalibration
from .sites import RootSite, fold_permutations, root_sites

__all__ = ["assign_groups", "fold_permutations", "RootSite", "root_sites", "calibrate",
           "CalibrationReport", "LayerCalibration", "refit_pointwise", "refit_grouped",
           "reestimate_batchnorm", "calibration_batches", "STAGES", "PIPELINE", "Stage",
           "Conversion", "REFITS", "check_trained", "DensePasses", "conv_patches"]
