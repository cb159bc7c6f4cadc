"""Running root networks fast: batch norm folded into the convolutions, channels-last
memory, and the fastest of several inference engines measured on this machine.

    fast = deeproots.optimize_for_inference(model, example_input)
    fast(x)            # logits, as model.eval()(x) within the stated tolerance
    fast.path          # which engine won, e.g. "openvino"
    fast.timings       # ms per image of every candidate, measured side by side

Paths: ``eager`` (the model as built), ``fold`` (BN folded + channels-last), ``script``
(fold, then TorchScript trace + freeze), ``compile`` (fold, then torch.compile with weight
freezing), ``onnxruntime`` and ``openvino`` (fold, exported), ``triton`` (fold, grouped
convs in deeproots' Triton kernel; CUDA), ``dispatch`` (fold, each grouped conv by the
fastest of its lowerings, measured per shape: see :mod:`deeproots.kernels.modules`),
``fused`` (fold, each conv -> ReLU -> 1x1 conv block, a root block or its ungrouped
counterpart, in one Triton kernel where that measures faster, the other grouped convs in
the Triton conv; CUDA: see :mod:`deeproots.kernels.fusion`),
``cudagraph`` (the dispatch path captured once per input shape as a CUDA graph and replayed:
one launch per batch instead of one per layer). ``bfloat16`` runs the torch paths and
OpenVINO in bf16, an opt-in with its accuracy cost (see docs/speed.md).
"""
from __future__ import annotations

import copy
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..checks import check_positive
from . import paths as path_table
from .paths import PATHS, PATHS_TABLE, InferencePath, installed
from ..errors import DeeprootsError, first_line
from ..layout import channels_last
from ..numerics import disagreement
from ..runtime import openvino_refusal
from .export import aoti_package, aoti_refusal, exported_program, one_or_all, onnx_bytes
from .fold import check_module, fold_batchnorm
from .timing import contention_note, interleaved

__all__ = ["PATHS", "fold_batchnorm", "check_path", "build_path", "optimize_for_inference",
           "FastModel", "CudaGraphed", "available_paths", "openvino_compile"]




class FastModel:
    """An inference callable: ``fast(x) -> logits`` (a torch tensor on the CPU or the model's
    device); ``path`` names the engine, ``timings`` (ms per image) the candidates measured.
    ``check`` is the model's input check, kept because folding and export trace it away."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], path: str,
                 timings: Optional[Dict[str, float]] = None,
                 check: Optional[Callable[[torch.Tensor], None]] = None,
                 fallbacks: Sequence[str] = (), fused: Sequence[str] = (),
                 notes: Sequence[str] = (),
                 choices: Optional[Callable[[], List[str]]] = None):
        self._fn, self.path, self.timings, self._check = fn, path, timings or {}, check
        self.fallbacks = list(fallbacks)  # layers a kernel path left to PyTorch, and why
        self.fused = list(fused)  # path fused: the first convs of the blocks fused
        self.skipped: Dict[str, str] = {}  # optimize_for_inference: paths left out, and why
        self._notes, self._choices = list(notes), choices

    @property
    def notes(self) -> List[str]:
        """What a table of timings should say beside this path: what it fused or left, and
        (after the first batch) what its measured choices were."""
        return self._notes + (self._choices() if self._choices else [])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._check is not None:
            self._check(x)
        return self._fn(x)

    def __repr__(self) -> str:
        return f"FastModel(path={self.path!r})"


def available_paths(device: Optional[torch.device] = None) -> List[str]:
    """The paths this process can build for a model on ``device`` (default: the CPU, and
    the GPU paths too where there is one), read from :data:`deeproots.speed.paths.PATHS_TABLE`:
    those that run on that device whose package (or C++ compiler) is here; on a CUDA device
    never the CPU engines, and OpenVINO never under a preloaded jemalloc (it aborts)."""
    kinds = ["cpu", "cuda"] if device is None else [torch.device(device).type]
    if not torch.cuda.is_available():
        kinds = [k for k in kinds if k != "cuda"]
    if device is None:
        kinds = ["cpu"] + [k for k in kinds if k != "cpu"]
    return [name for name, p in PATHS_TABLE.items()
            if any(k in p.devices for k in kinds) and _refusal(p) is None
            and (p.triton is False or "cuda" in kinds or name == "dispatch")]


def _refusal(path: InferencePath) -> Optional[str]:
    """Why this process cannot build ``path`` (a package or compiler missing, OpenVINO
    under jemalloc), or None."""
    if path.name == "openvino" and openvino_refusal():
        return openvino_refusal()
    if path.needs == "c++":
        return aoti_refusal()
    if path.needs is not None and not installed(path.needs):
        more = " and a CUDA GPU" if path.triton else ""
        return f"path {path.name!r} needs the {path.needs} package (pip install {path.needs}){more}"
    return None


def check_path(path: str, dtype: torch.dtype = torch.float32) -> None:
    """A one-line error unless this process can run ``path`` in ``dtype``."""
    if path not in PATHS_TABLE:
        raise DeeprootsError(f"unknown path {path!r}; accepted: {', '.join(PATHS)} or auto")
    row = PATHS_TABLE[path]
    reason = _refusal(row)
    if reason:
        raise DeeprootsError(reason if reason.startswith("path") or path == "openvino"
                             else f"path {path!r}: {reason}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise DeeprootsError(f"dtype must be torch.float32 or torch.bfloat16; got {dtype}")
    name = str(dtype).removeprefix("torch.")
    if name not in row.dtypes:
        raise DeeprootsError(f"path {path!r} runs {' or '.join(row.dtypes)} only; got dtype "
                             f"{dtype}")


def openvino_compile(onnx: bytes, dtype: torch.dtype, **config):
    """OpenVINO's CPU model of an ONNX graph, with the settings every deeproots use shares."""
    import openvino as ov  # optional package

    core = ov.Core()
    return core.compile_model(core.read_model(onnx), "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        # OpenVINO's precision hint: bf16 kernels on CPUs with AVX512-BF16 or AMX
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
        "PERFORMANCE_HINT": "LATENCY", **config})


def as_float(out):
    """A model's output in float32: a tensor, or each of a list or tuple of them (a
    backbone's maps)."""
    if isinstance(out, (list, tuple)):
        return type(out)(o.float() for o in out)
    return out.float()


def build_path(model: nn.Module, example: torch.Tensor, path: str,
               dtype: torch.dtype = torch.float32) -> FastModel:
    """One inference path for ``model``; ``example`` is a batch of the size it will run.
    The model passed in is not changed (the path runs on a copy)."""
    check_path(path, dtype)
    check = getattr(model, "check_input", None)
    if path == "eager":
        m = copy.deepcopy(model).eval().to(dtype)
        return FastModel(_no_grad(lambda x: as_float(m(x.to(dtype)))), path, check=check)
    folded = fold_batchnorm(model)
    if PATHS_TABLE[path].triton:
        return _kernel_path(folded, example, path, dtype, check)
    return FastModel(BUILDERS[path](folded, example, dtype), path, check=check)


def _torch_path(folded, dtype):
    """``folded`` in ``dtype`` and channels-last (the layout oneDNN's convolutions run
    fastest in: :mod:`deeproots.layout`), and the input's cast to it."""
    return channels_last(folded.to(dtype=dtype)), lambda x: channels_last(x.to(dtype))


def _fold(folded, example, dtype):
    folded, cl = _torch_path(folded, dtype)
    return _no_grad(lambda x: as_float(folded(cl(x))))


def _script(folded, example, dtype):
    """TorchScript: deprecated by PyTorch, kept while it is there. Freeze alone:
    torch.jit.optimize_for_inference changes NiN's outputs by up to 0.2 (its oneDNN rewrite
    of the ceil-mode pooling), measured in tests."""
    import warnings

    folded, cl = _torch_path(folded, dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # a backbone returns its maps as a list, always as many: the trace holds
        warnings.filterwarnings("ignore", "Encountering a list at the output of the tracer")
        frozen = torch.jit.freeze(torch.jit.trace(folded, cl(example), check_trace=False))
    return _no_grad(lambda x: as_float(frozen(cl(x))))


def _compile(folded, example, dtype):
    import torch._inductor.config as inductor_config  # heavy: only for this path

    folded, cl = _torch_path(folded, dtype)
    compiled = torch.compile(folded, dynamic=False)

    def run_compiled(x):
        # freezing constant-folds the weights into the graph; set for our compiles alone,
        # never for the rest of the process
        with inductor_config.patch(freezing=True):
            return as_float(compiled(cl(x)))

    return _no_grad(run_compiled)


def _onnxruntime(folded, example, dtype):
    import onnxruntime as ort  # optional package

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_bytes(folded, example), options,
                                   providers=["CPUExecutionProvider"])
    return lambda x: one_or_all([torch.from_numpy(o) for o in session.run(
        None, {"input": x.detach().cpu().numpy()})])


def _openvino(folded, example, dtype):
    compiled = openvino_compile(onnx_bytes(folded, example), dtype)
    return lambda x: one_or_all([torch.from_numpy(o.copy()) for o in compiled(
        x.detach().cpu().numpy()).values()])


def _aoti_runner(folded: nn.Module, example: torch.Tensor):
    """``folded`` compiled ahead of time by AOTInductor (its package in a temporary file,
    loaded, then removed): the C++ that ``deeproots export --format aoti`` writes, timed
    from Python."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deeproots-aoti-") as folder:
        package = os.path.join(folder, "model.pt2")
        aoti_package(exported_program(folded, example), package)
        runner = torch._inductor.aoti_load_package(package)
    return _no_grad(lambda x: runner(x.float()))


# each path's builder (folded model, example batch, dtype) -> callable; the kernel paths
# (PATHS_TABLE's triton rows) are built by _kernel_path, eager on the model as built
BUILDERS = {"fold": _fold, "script": _script, "compile": _compile,
            "aoti": lambda folded, example, dtype: _aoti_runner(folded, example),
            "onnxruntime": _onnxruntime, "openvino": _openvino}


def _kernel_path(folded, example, path, dtype, check) -> FastModel:
    """Grouped convs in the Triton kernel (``triton``; ``fused`` first fuses the root blocks),
    or each by its fastest lowering, measured on the first batch of each shape (``dispatch``;
    ``cudagraph`` then captures the whole forward as a CUDA graph). Layers left to PyTorch
    are listed in ``fallbacks``, the blocks fused in ``fused``."""
    from ..kernels import modules  # the kernel layer: only for these paths

    interpreting = os.environ.get("TRITON_INTERPRET") == "1" and path != "cudagraph"
    if path != "dispatch" and example.device.type != "cuda" and not interpreting:
        raise DeeprootsError(f"path {path!r} runs on CUDA GPUs; got an input on "
                             f"{example.device} (paths for this device: "
                             f"{', '.join(available_paths())})")
    folded = channels_last(folded.to(dtype=dtype))
    fused: List[str] = []
    kept: List[str] = []
    if path == "fused":
        from ..kernels.fusion import fuse_root_blocks

        fused, kept = fuse_root_blocks(folded)
    make = modules.TritonConv2d if path in ("triton", "fused") else modules.DispatchConv2d
    net, left = modules.replace_convs(folded, make)
    cl = lambda x: channels_last(x.to(dtype))  # noqa: E731
    run = _no_grad(lambda x: as_float(net(cl(x))))
    if path == "cudagraph":
        run = CudaGraphed(run)
    notes = [f"{len(fused)} blocks fused (conv + ReLU + 1x1 conv; each runs fused "
             f"where that measured faster)"] if path == "fused" else []
    notes += [f"not fused: {why}" for why in kept]
    return FastModel(run, path, check=check, fallbacks=left, fused=fused, notes=notes,
                     choices=lambda: _measured_choices(net))


def _measured_choices(net: nn.Module) -> List[str]:
    """One line per kind of measured choice in ``net`` so far: how many grouped convs the
    dispatch ran by each lowering, which fused blocks ran apart, and each kernel dropped
    because it failed or disagreed on its first use."""
    from ..kernels.fusion import FusedRootConv
    from ..kernels.modules import DispatchConv2d, dispatch_notes

    lowering: Dict[str, int] = {}
    apart, dropped = [], []
    for name, m in net.named_modules():
        if isinstance(m, DispatchConv2d):
            for how in set(m.chosen.values()):
                lowering[how] = lowering.get(how, 0) + 1
        elif isinstance(m, FusedRootConv):
            if m.rejected:
                dropped.append(f"{name.removesuffix('_fused')}: fused kernel dropped "
                               f"({m.rejected})")
            elif "unfused" in m.chosen.values():
                apart.append(name.removesuffix("_fused"))
    lines = ["dispatch ran grouped convs by " + ", ".join(
        f"{how} ({n})" for how, n in sorted(lowering.items()))] if lowering else []
    if apart:
        lines.append(f"ran apart, faster than fused: {', '.join(apart)}")
    return lines + dropped + dispatch_notes(net)


class CudaGraphed:
    """``fn`` replayed from a CUDA graph: on the first batch of each shape, dtype and device,
    ``warmup`` calls on a side stream (the dispatch measures its lowerings, Triton tunes,
    cuDNN picks its algorithms), then one call captured; later batches of that shape are
    copied into the captured input and the graph is replayed, one launch instead of one per
    layer. Returns a copy of the output, so a result survives the next call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 3):
        self.fn, self.warmup = fn, warmup
        self.graphs: Dict[tuple, tuple] = {}  # key -> (graph, static input, static output)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise DeeprootsError(f"a CUDA graph replays on a CUDA GPU; got an input on {x.device}")
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        if key not in self.graphs:
            static_x = x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_x)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = self.fn(static_x)
            self.graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = self.graphs[key]
        static_x.copy_(x)
        graph.replay()
        if isinstance(static_y, (list, tuple)):  # a backbone's maps
            return type(static_y)(y.clone() for y in static_y)
        return static_y.clone()


def _no_grad(fn):
    def run(x):
        with torch.inference_mode():
            return fn(x)
    return run


def _in_auto(path: InferencePath, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``optimize_for_inference(..., "auto")`` measures ``path``: not one that takes
    minutes to build, not one that cannot run ``dtype``, and on CUDA none on deeproots' Triton
    kernels until a GPU run has verified them (``TRITON_VERIFIED_ON_GPU``)."""
    unverified = path.triton and torch.device(device).type == "cuda" and \
        not path_table.TRITON_VERIFIED_ON_GPU
    return path.in_auto and not unverified and str(dtype).removeprefix("torch.") in path.dtypes


def optimize_for_inference(model: nn.Module, example_input: torch.Tensor,
                           paths: Sequence[str] | str = "auto", *,
                           dtype: torch.dtype = torch.float32, repeats: int = 5) -> FastModel:
    """The fastest inference form of ``model`` on this machine for batches like
    ``example_input``. ``paths="auto"`` measures every path this process can build for the
    input's device (:func:`available_paths`: on a CPU fold, script, dispatch, onnxruntime
    and openvino where installed; on a CUDA GPU fold and script, and the Triton paths
    triton, dispatch, fused and cudagraph once a GPU run has verified them,
    :data:`~deeproots.config.TRITON_VERIFIED_ON_GPU`) but eager, compile and aoti (torch.compile and AOTInductor only when named, as
    they take a minute or more to
    build), side by side, and returns the fastest, with every candidate's ms per image in
    ``.timings``.

    Every path is verified before it is timed: built and run once on ``example_input``, its
    output compared with the model's own (:func:`deeproots.numerics.disagreement`). A path
    that fails to build, raises or disagrees is skipped, never fatal: ``.skipped`` (and the
    notes) say which and why. Only when no path is left is it an error."""
    check_module(model, "optimize_for_inference")
    if not isinstance(example_input, torch.Tensor):
        raise DeeprootsError(f"example_input must be a batch of images (a tensor); got "
                             f"{type(example_input).__name__}")
    if isinstance(paths, str) and paths == "auto":  # those that run here, in this dtype
        paths = [p for p in available_paths(example_input.device) if _in_auto(
            PATHS_TABLE[p], example_input.device, dtype)]
    elif isinstance(paths, str):
        paths = [paths]
    for p in paths:
        check_path(p, dtype)  # a path named that cannot run says why, in one line
    if not paths:
        raise DeeprootsError(f"paths must name at least one of {', '.join(PATHS)}, or be "
                             f"'auto'; got none")
    check_positive("repeats", repeats)
    if hasattr(model, "check_input"):
        model.check_input(example_input)
    reference = copy.deepcopy(model).eval()
    with torch.inference_mode():
        want = as_float(reference(example_input))
    built: Dict[str, FastModel] = {}
    skipped: Dict[str, str] = {}
    for p in paths:
        try:
            fast = build_path(model, example_input, p, dtype)
            reason = disagreement(fast(example_input), want, dtype)
        except Exception as err:  # noqa: BLE001  (an engine or kernel that cannot run this)
            reason = f"{type(err).__name__}: {first_line(err, 200)}"
        if reason is None:
            built[p] = fast
        else:
            skipped[p] = reason
    if not built:
        raise DeeprootsError(f"no inference path runs this model: "
                             f"{'; '.join(f'{p}: {why}' for p, why in skipped.items())}")
    notes = [f"path {p} skipped: {why}" for p, why in skipped.items()]
    if len(built) == 1:
        fast = next(iter(built.values()))
    else:
        timings = interleaved({p: (lambda f=f: f(example_input)) for p, f in built.items()},
                              images=len(example_input), repeats=repeats)
        ms = {p: t.ms_per_image for p, t in timings.items()}
        fast = built[min(ms, key=ms.get)]
        fast.timings = ms
        loaded = contention_note(next(iter(timings.values())).others, "the paths")
        if loaded:  # the fastest on a loaded machine may not be on a quiet one
            notes.append(loaded)
    fast.skipped = skipped
    fast._notes += notes
    return fast


