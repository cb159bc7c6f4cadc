"""Making a CNN a root network: the paper's rule applied to any CNN, cost budgets and the
before/after report (:mod:`.rule`, :func:`rootify`); a trained CNN converted with
calibration so that it keeps its accuracy (:mod:`.calibrate`, a list of stages); a
checkpoint, or a trained model in memory, converted and evaluated before and after
(:mod:`.checkpoint`); each layer's price at each group count (:mod:`.sensitivity`), the
schedule a budget buys (:mod:`.search`) and the frontier of accuracy against measured time
(:mod:`.frontier`).

(deeproots 0.1 had the rule in the module ``deeproots.conversion``; its names are here.)"""
from .rule import (INITS, STEMS, ConvSite, LayerChange, RootifyReport, block_diagonal_weight,
                   parse_schedule, rootify, trace_convs)

from .checkpoint import convert_checkpoint, convert_model, price_checkpoint
from .frontier import frontier
from .search import choose
from .sensitivity import layer_prices

__all__ = ["rootify", "convert_checkpoint", "convert_model", "price_checkpoint", "layer_prices",
           "choose", "frontier", "RootifyReport", "LayerChange", "parse_schedule", "trace_convs",
           "ConvSite", "block_diagonal_weight", "INITS", "STEMS"]
