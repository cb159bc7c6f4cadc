"""When two computations of the same thing agree: the one rule every verification uses (a
dispatch's lowerings against the native conv, a fused block against its layers apart, an
inference path against the model as built)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["tolerance", "disagreement"]


def tolerance(dtype: torch.dtype, cuda: bool = True) -> float:
    """How far (relative to the largest value of the reference) another computation may be
    from it and still agree: the dtype's rounding, and on a GPU with TF32 allowed (PyTorch's
    default for convolutions) the tensor cores' 10-bit mantissas, with room; a wrong kernel
    is off by far more."""
    if dtype == torch.bfloat16:
        return 5e-2
    if dtype == torch.float16:
        return 1e-2
    return 1e-2 if cuda and torch.backends.cudnn.allow_tf32 else 1e-4


def disagreement(got, want, dtype: torch.dtype) -> Optional[str]:
    """Why ``got`` does not agree with the native ``want`` (shape, non-finite values where
    the native ones are finite, or the largest difference beyond :func:`tolerance`), or
    None. Lists or tuples of tensors (a backbone's maps) agree where each one does."""
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            what = f"{len(got)} outputs" if isinstance(got, (list, tuple)) else \
                type(got).__name__
            return f"{what}, native {len(want)} outputs"
        return next((f"output {i}: {why}" for i, (g, w) in enumerate(zip(got, want))
                     if (why := disagreement(g, w, dtype)) is not None), None)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return f"output of shape {shape}, native {tuple(want.shape)}"
    got, want = got.detach().float(), want.detach().float().to(got.device)
    finite = torch.isfinite(want)
    if not torch.isfinite(got[finite]).all():
        return "NaN or infinity where the native result is finite"
    scale = float(want[finite].abs().max()) if finite.any() else 0.0
    diff = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    allowed = tolerance(dtype, got.device.type == "cuda") * scale + 1e-6
    if diff > allowed:
        return f"max difference {diff:.3g} from the native result (allowed {allowed:.3g})"
    return None
