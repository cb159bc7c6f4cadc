"""Making a CNN a root network: the paper's rule applied to any CNN, cost budgets and the
before/after report (:mod:`.rule`, :func:`rootify`); a trained CNN converted with
calibration so that it keeps its accuracy (:mod:`.calibrate`, a list of stages); and a
checkpoint converted and evaluated before and after (:mod:`.checkpoint`).

(deeproots 0.1 had the rule in the module ``deeproots.conversion``; its names are here.)"""
from .rule import (INITS, STEMS, ConvSite, LayerChange, RootifyReport, block_diagonal_weight,
                   parse_schedule, rootify, trace_convs)

__all__ = ["rootify", "RootifyReport", "LayerChange", "parse_schedule", "trace_convs",
           "ConvSite", "block_diagonal_weight", "INITS", "STEMS"]
