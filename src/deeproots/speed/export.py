"""Writing a model for deployment, in the formats current PyTorch deploys with: a
``torch.export`` ExportedProgram (``.pt2``), an AOTInductor package (compiled C++ that runs
without Python, on CPUs through the oneDNN/C++ kernels ``torch.compile`` uses), ONNX (the
dynamo exporter PyTorch recommends, where onnxscript is installed; the legacy one as a
fallback, said in one line), and TorchScript while PyTorch keeps it (deprecated since 2.13).
Batch norm is folded first; the batch size is dynamic in every format.

    deeproots.export(model, torch.zeros(1, 3, 32, 32), "nin.pt2", "pt2")
"""
from __future__ import annotations

import io
import os
from typing import Callable, List, Optional

import torch
from torch import nn

from ..config import EXPORT_FORMATS
from ..errors import DeeprootsError
from ..models.layers import example_output
from ..runtime import atomic_write
from ..outputs import check_new_file
from .fold import check_module, fold_batchnorm

__all__ = ["EXPORT_FORMATS", "export", "load_exported", "onnx_bytes", "onnx_exporter",
           "exported_program", "aoti_package", "aoti_refusal", "cxx_compiler"]

# deployment formats: torch.export's ExportedProgram (.pt2), an AOTInductor package (.pt2,
# runs without Python), ONNX (the dynamo exporter where onnxscript is installed), TorchScript
# (deprecated by PyTorch 2.13; kept while PyTorch keeps it)
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
MAX_BATCH = 65536  # the exported graphs' batch dimension is dynamic, from 1 to this


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def _traceable_example(example: torch.Tensor) -> torch.Tensor:
    """``example`` with at least 2 images: torch.export specialises a dimension it sees as 1,
    so a batch of one would fix the graph's batch size."""
    return example if len(example) > 1 else example.expand(2, *example.shape[1:]).contiguous()


def onnx_exporter(wanted: str = "auto") -> str:
    """The ONNX exporter to use: ``dynamo`` (torch.export-based, the one PyTorch recommends;
    it needs the onnxscript package) or ``legacy`` (TorchScript-based, deprecated); ``auto``
    is dynamo where onnxscript is installed."""
    if wanted not in ONNX_EXPORTERS:
        raise DeeprootsError(f"onnx exporter must be one of {', '.join(ONNX_EXPORTERS)}; got "
                             f"{wanted!r}")
    if wanted != "auto":
        if wanted == "dynamo" and not _installed("onnxscript"):
            raise DeeprootsError("the dynamo ONNX exporter needs the onnxscript package: pip "
                                 "install onnxscript (or deeproots[deploy])")
        return wanted
    return "dynamo" if _installed("onnxscript") else "legacy"


def output_names(model: nn.Module, example: torch.Tensor) -> List[str]:
    """The names an exported graph gives ``model``'s outputs: ``logits`` for one tensor (or
    GoogLeNet's tuple, whose first item is the logits), ``map0``, ``map1``, ... for a list
    of them (a backbone's feature maps); a one-line error for anything else. One image of
    ``example`` is run: the structure is the same at every batch size."""
    out = example_output(model, example[:1])
    if isinstance(out, torch.Tensor) or (isinstance(out, tuple) and out and
                                         isinstance(out[0], torch.Tensor)):
        return ["logits"]
    if isinstance(out, list) and out and all(isinstance(o, torch.Tensor) for o in out):
        return [f"map{i}" for i in range(len(out))]
    raise DeeprootsError(f"{getattr(model, 'name', type(model).__name__)} returns a "
                         f"{type(out).__name__} for a batch of shape {tuple(example.shape)}; "
                         f"export takes a model that returns a tensor, or a list of them")


def one_or_all(outputs: list):
    """An exported graph's outputs as the model returned them: one tensor, or a list."""
    return outputs[0] if len(outputs) == 1 else outputs


def onnx_bytes(model: nn.Module, example: torch.Tensor, exporter: str = "auto",
               names: Optional[List[str]] = None) -> bytes:
    """``model`` as an ONNX graph, input ``input`` and outputs ``names`` (default
    :func:`output_names`: ``logits``, or a backbone's ``map0``, ``map1``, ...; batch size
    dynamic), by :func:`onnx_exporter`'s choice. ``legacy`` names the nodes by their module
    paths, which per-layer OpenVINO timing reads."""
    import logging
    import warnings

    names = names or output_names(model, example)
    if onnx_exporter(exporter) == "legacy":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"],
                              output_names=names, dynamic_axes={
                                  "input": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        return buf.getvalue()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on torchvision's operators, not ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (_traceable_example(example),), dynamo=True,
                                        verbose=False, input_names=["input"],
                                        output_names=names, optimize=True,
                                        dynamic_shapes=({0: _batch_dim()},))
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


def exported_program(model: nn.Module, example: torch.Tensor):
    """``model`` (eval mode) captured by ``torch.export`` with a dynamic batch size: the
    graph every current PyTorch deployment starts from (``.pt2``, AOTInductor)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(model.eval(), (_traceable_example(example),),
                                   dynamic_shapes=({0: _batch_dim()},))


def cxx_compiler() -> Optional[str]:
    """The C++ compiler AOTInductor would build with ($CXX, else c++, g++ or clang++ on the
    PATH), or None."""
    import shutil

    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def aoti_refusal() -> Optional[str]:
    """Why an AOTInductor package cannot be built here, or None."""
    if cxx_compiler() is None:
        return ("AOTInductor compiles C++: no compiler found ($CXX, c++, g++ or clang++ on "
                "the PATH); install one (apt-get install g++) or use --format pt2")
    return None


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def export(model: nn.Module, example_input: torch.Tensor, out, fmt: str, *,
           overwrite: bool = False, onnx_exporter_name: str = "auto") -> List[str]:
    """Write ``model`` (batch norm folded, eval mode; batch size dynamic) to ``out``,
    atomically, in ``fmt``: ``pt2`` (a ``torch.export`` ExportedProgram, for
    ``torch.export.load``), ``aoti`` (an AOTInductor package, compiled C++ that runs without
    Python: ``torch._inductor.aoti_load_package``), ``onnx`` (the dynamo exporter where
    onnxscript is installed, else the legacy one) or ``torchscript`` (deprecated). The
    model's input check runs on ``example_input`` first, so a wrong size is one clear error.
    An existing ``out`` is replaced only with ``overwrite``, and a run's own file
    (``last.pt``, ...) never. Returns notes for the user (the ONNX exporter fallen back to,
    TorchScript's deprecation)."""
    check_new_file(out, overwrite=overwrite)
    check_module(model, "export")
    if fmt not in EXPORT_FORMATS:
        raise DeeprootsError(f"unknown export format {fmt!r}; accepted: "
                             f"{', '.join(EXPORT_FORMATS)}")
    if fmt == "aoti" and aoti_refusal():
        raise DeeprootsError(aoti_refusal())
    if fmt == "aoti" and not str(out).endswith(".pt2"):
        raise DeeprootsError(f"--format aoti writes a package that torch loads by a name "
                             f"ending in .pt2; got {out} (give --out NAME.pt2)")
    exporter = onnx_exporter(onnx_exporter_name) if fmt == "onnx" else None
    if hasattr(model, "check_input"):
        model.check_input(example_input)
    names = output_names(model, example_input)  # one line for a model that cannot be exported
    folded = fold_batchnorm(model)
    notes = []
    if fmt == "pt2":
        program = exported_program(folded, example_input)
        atomic_write(out, lambda f: torch.export.save(program, f))
    elif fmt == "aoti":
        program = exported_program(folded, example_input)
        atomic_write(out, lambda tmp: aoti_package(program, tmp), by_path=True)
    elif fmt == "onnx":
        if exporter == "legacy":
            notes.append("onnx: the legacy (TorchScript-based) exporter, as onnxscript is not "
                         "installed; pip install onnxscript for the one PyTorch recommends")
        data = onnx_bytes(folded, example_input, exporter, names)
        atomic_write(out, lambda f: f.write(data))
    else:
        import warnings

        notes.append("torchscript is deprecated by PyTorch (2.13); pt2 (torch.export) and "
                     "aoti are what it recommends")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            # a backbone returns its maps as a list, always as many: the trace holds
            warnings.filterwarnings("ignore", "Encountering a list at the output of the tracer")
            frozen = torch.jit.freeze(torch.jit.trace(folded, example_input, check_trace=False))
            atomic_write(out, lambda f: torch.jit.save(frozen, f))
    return notes


def aoti_package(program, path: str) -> None:
    """``program`` compiled by AOTInductor into the package ``path`` (its build files in a
    temporary folder of their own, removed after)."""
    import tempfile
    import warnings

    from torch._inductor import aoti_compile_and_package  # heavy: only for this format

    import shutil

    with tempfile.TemporaryDirectory(prefix="deeproots-aoti-") as build, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        package = os.path.join(build, "model.pt2")  # AOTInductor's name must end in .pt2
        aoti_compile_and_package(program, package_path=package)
        shutil.move(package, path)


def load_exported(path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running an exported file of ``fmt`` on a CPU batch (for checks and
    timing; ``pt2`` and ``torchscript`` load through torch's own loaders, ``onnx`` through
    ONNX Runtime, ``aoti`` through AOTInductor's runner). Load only files you wrote: a
    TorchScript or AOTInductor file is code."""
    if fmt == "pt2":
        module = torch.export.load(str(path)).module()
        return _no_grad(lambda x: module(x))
    if fmt == "aoti":
        runner = torch._inductor.aoti_load_package(str(path))
        return _no_grad(lambda x: runner(x))
    if fmt == "onnx":
        import onnxruntime as ort  # optional package

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: one_or_all([torch.from_numpy(o)
                                     for o in session.run(None, {"input": x.numpy()})])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path))
    return _no_grad(lambda x: scripted(x))


def _no_grad(fn):
    def run(x):
        with torch.inference_mode():
            return fn(x)
    return run
