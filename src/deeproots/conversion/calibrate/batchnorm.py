"""Stage 3 of a calibrated conversion: every batch norm's running statistics recomputed on the
calibration images (those before the first grouped conv, trained and unchanged, kept)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .passes import forward, input_of

__all__ = ["reestimate_batchnorm"]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches, until: Optional[nn.Module] = None,
                         keep=()) -> int:
    """Every batch norm's running mean and variance recomputed on the calibration batches
    (a cumulative average, in train mode, nothing else changed); with ``until``, only those
    the forward pass reaches before that layer (the pass stops there; the others keep their
    statistics); those in ``keep`` keep theirs. Returns how many were re-estimated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not any(m is k for k in keep)]
    saved = [(m.momentum, m.training, {k: v.clone() for k, v in m.state_dict().items()})
             for m in norms]
    was = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x in batches:
            if until is None:
                forward(model, x)
            else:
                input_of(model, x, until)
    finally:
        model.train(was)
        for m, (momentum, training, stats) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
            if int(m.num_batches_tracked) == 0:  # not reached: its statistics as they were
                m.load_state_dict(stats)
    return sum(int(m.num_batches_tracked) > 0 for m in norms)
