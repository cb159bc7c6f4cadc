"""The one table of the ways deeproots runs a model: the inference paths
(:mod:`deeproots.speed.deploy` builds them, the bench times them, the CLI offers them) and the
ways a grouped conv runs in training (``--grouped-conv``: the step and the dispatch of
:mod:`deeproots.kernels.modules` read them). Torch-free, so that ``--help`` reads it at once.

To add an inference path: a row in :data:`PATHS_TABLE` and its builder in
``deeproots.speed.deploy.BUILDERS``; everything else (the choices, ``--help``, which device
takes it, ``auto``) follows from the row.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..checks import check_choice
from ..errors import DeeprootsError

__all__ = ["InferencePath", "PATHS_TABLE", "PATHS", "LAYER_PATHS", "TRITON_PATHS",
           "GROUPED_CONV", "LOWERINGS", "DEFAULT_LOWERINGS", "TRITON_VERIFIED_ON_GPU",
           "UNVERIFIED", "resolve_grouped_conv", "installed"]

# Whether a GPU run has shown deeproots' Triton lowerings correct and faster. Until one has,
# `auto` on CUDA is the native path (cuDNN, channels-last, bf16 autocast) and the Triton
# kernels, the dispatch and the fused and CUDA-graph paths built on them are one flag away,
# labelled as not yet verified on hardware. No GPU has run them yet (docs/speed.md, "GPU");
# the run that measures them flips this line, with its figures beside it.
TRITON_VERIFIED_ON_GPU = False
UNVERIFIED = "not yet verified on GPU hardware"  # the label in --help and docs/speed.md


@dataclass(frozen=True)
class InferencePath:
    """One inference path: where it runs (``devices``), the package it needs, whether it is
    built on deeproots' Triton kernels, whether ``auto`` offers it (not when it takes
    minutes to build), the dtypes it runs, and what it is, in a few words."""

    name: str
    what: str
    devices: Tuple[str, ...] = ("cpu", "cuda")
    needs: Optional[str] = None  # a package, or "c++" (a compiler)
    triton: bool = False
    in_auto: bool = True
    dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    per_layer: bool = False  # per-layer timing can see inside it


PATHS_TABLE: Dict[str, InferencePath] = {p.name: p for p in (
    InferencePath("eager", "the model as built", in_auto=False, per_layer=True),
    InferencePath("fold", "batch norm folded, channels-last", per_layer=True),
    InferencePath("script", "fold, then TorchScript (deprecated by PyTorch)"),
    InferencePath("compile", "fold, then torch.compile", in_auto=False),
    InferencePath("aoti", "fold, compiled ahead of time by AOTInductor (the C++ of export "
                  "--format aoti)", devices=("cpu",), needs="c++", in_auto=False,
                  dtypes=("float32",)),
    InferencePath("onnxruntime", "fold, exported to ONNX, ONNX Runtime", devices=("cpu",),
                  needs="onnxruntime", dtypes=("float32",)),
    InferencePath("openvino", "fold, exported to ONNX, OpenVINO", devices=("cpu",),
                  needs="openvino", per_layer=True),
    InferencePath("triton", "grouped convs in deeproots' Triton kernel", devices=("cuda",),
                  needs="triton", triton=True),
    InferencePath("dispatch", "each grouped conv by its fastest lowering, measured",
                  triton=True),
    InferencePath("fused", "conv -> ReLU -> 1x1 blocks in one Triton kernel",
                  devices=("cuda",), needs="triton", triton=True),
    InferencePath("cudagraph", "the dispatch path captured as a CUDA graph",
                  devices=("cuda",), triton=True),
)}
PATHS = tuple(PATHS_TABLE)
LAYER_PATHS = tuple(n for n, p in PATHS_TABLE.items() if p.per_layer)
TRITON_PATHS = tuple(n for n, p in PATHS_TABLE.items() if p.triton)

# how grouped convs run in training: auto, PyTorch's own, the Triton kernels, measured dispatch
GROUPED_CONV = ("auto", "native", "triton", "dispatch")
# the lowerings the dispatch chooses among (deeproots.kernels.modules); inductor compiles for
# seconds per shape, so it is a candidate only when asked for
LOWERINGS = ("native", "triton", "dense", "split", "inductor")
DEFAULT_LOWERINGS = ("native", "triton", "dense", "split")


def installed(package: str) -> bool:
    """Whether ``package`` can be imported here (without importing it)."""
    return importlib.util.find_spec(package) is not None


def resolve_grouped_conv(how: str, device_type: str, compile: Optional[str] = None) -> str:
    """What ``--grouped-conv how`` means on a device of ``device_type``, resolved once and
    carried (the training step and the bench take the result): ``auto`` is PyTorch's own
    (cuDNN, oneDNN) until a GPU run has shown the Triton lowerings correct and faster
    (:data:`TRITON_VERIFIED_ON_GPU`), then the measured dispatch on CUDA with Triton
    installed; native under ``compile`` (the compiler then sees whole graphs). ``triton``
    runs on the CPU only under ``TRITON_INTERPRET=1`` (for tests)."""
    check_choice("grouped_conv", how, GROUPED_CONV)
    if how != "auto":
        interpreted = how == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if how in ("triton", "dispatch") and device_type != "cuda" and not interpreted:
            raise DeeprootsError(f"grouped_conv {how!r} runs on CUDA GPUs; got device "
                                 f"{device_type} (accepted there: native or auto)")
        return how
    if device_type != "cuda" or compile or not TRITON_VERIFIED_ON_GPU:
        return "native"
    return "dispatch" if installed("triton") else "native"
