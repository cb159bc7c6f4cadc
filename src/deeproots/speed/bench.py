"""Benchmarks: models timed side by side (:func:`bench_models`), a paper table's variants
beside the paper's speedups (:func:`bench_paper`), and where the time of a forward pass goes,
layer by layer (:func:`layer_times`, :func:`bench_layers`). Every timing goes through
:func:`deeproots.speed.timing.interleaved`."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import DeeprootsError
from ..checks import check_choice, check_positive, check_whole
from ..config import COMPILE_MODES, DTYPES, LAYER_PATHS, MEMORY_FORMATS, MODES, PATHS
from .deploy import build_path, check_path, openvino_compile
from .export import onnx_bytes
from .fold import fold_batchnorm
from ..models.layers import example_logits, layer_name
from ..reproduction.tables import PAPER_TABLES, paper_timings
from ..inspection.costs import parse_input_size, profile
from ..models.registry import build_model, check_model_spec
from ..runtime import allocator, check_batch_fits, resolve_device
from ..training.step import TrainStep, make_optimizer
from .paths import resolve_grouped_conv
from ..text import format_table
from ..capture import capture, hooks
from ..layout import channels_last, choose_layout
from .timing import Mark, UNRELIABLE_SPREAD, Timing, contention_note, interleaved

__all__ = ["Timing", "interleaved", "train_step_fn", "step_phases", "BenchRow", "bench_models",
           "bench_paper", "format_bench", "LayerTimes", "layer_times", "bench_layers",
           "format_layer_times", "TORCH_DTYPES", "TrainLayerTimes", "train_layer_times",
           "format_train_layer_times"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
assert tuple(TORCH_DTYPES) == DTYPES


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01,
                  **options) -> Callable[[], None]:
    """One training step of ``model`` on a fixed batch, by ``deeproots train``'s own step
    (:class:`deeproots.training.step.TrainStep`: SGD with momentum and weight decay, bf16 autocast and
    channels-last on CUDA). ``options``: the step's ``compile``, ``grouped_conv`` and
    ``layout``. The returned callable has the step as ``.step``."""
    model.train()
    step = TrainStep(model, make_optimizer(model, lr), **options)

    def run() -> None:
        step.step(x, y, lr)

    run.step = step
    return run


@dataclass
class BenchRow:
    """One model timed on one path and mode: ms per image (median of the repeats), the
    spread of the repeats, the speedup over the first model of the run, the ideal speedup
    from multiply-adds, and the achieved GFLOP/s (2 x multiply-adds / time)."""

    model: str
    mode: str
    path: str
    dtype: str
    device: str
    batch_size: int
    threads: int
    ms_per_image: float
    spread: float
    speedup: float
    ideal_speedup: float
    gflops: float
    macs: int
    allocator: str
    paper: Dict[str, float] = field(default_factory=dict)  # the paper's timings, if any
    fallbacks: List[str] = field(default_factory=list)  # layers a kernel path left alone
    phases_ms: Dict[str, float] = field(default_factory=dict)  # train --detail: ms per batch
    compile_s: Optional[float] = None  # train with compile: the first step, compiling
    notes: List[str] = field(default_factory=list)  # e.g. a batch halved after running out
    others: Optional[float] = None  # other processes' share of the CPUs while it was timed

    def to_dict(self) -> dict:
        """A flat JSON-ready dict (the paper's timings as ``paper_*`` keys)."""
        d = asdict(self)
        d.update(d.pop("paper"))
        return d


def _check_dtype(dtype: str) -> None:
    check_choice("dtype", dtype, DTYPES)


def check_models(specs: Sequence[Union[str, nn.Module]]) -> None:
    """A one-line error for no model, or a name that is not one, before anything is built."""
    if not specs:
        raise DeeprootsError("name at least one model to time (deeproots list shows them)")
    for spec in specs:
        if not isinstance(spec, nn.Module):
            check_model_spec(spec)


def models_to_time(specs: Sequence[Union[str, nn.Module]], device) -> Dict[str, nn.Module]:
    """Each model to time, by its label, in eval mode on ``device``: a registered name or
    ``FILE.py:FUNCTION`` built with seed 0, or a module of the caller's (a trained or
    converted model) copied, so theirs is left as it was; labelled by its ``name``."""
    models: Dict[str, nn.Module] = {}
    for spec in specs:
        if isinstance(spec, nn.Module):
            label = getattr(spec, "name", None) or type(spec).__name__
            model = copy.deepcopy(spec)
        else:
            torch.manual_seed(0)
            label, model = spec, build_model(spec)
        while label in models:  # the same model twice, or two of one name
            label += "'"
        models[label] = model.eval().to(device)
    return models


def bench_models(names: Sequence[Union[str, nn.Module]], *, batch_size: int = 128,
                 device: str = "cpu",
                 threads: Optional[int] = None, dtype: str = "float32",
                 paths: Sequence[str] = ("fold",), modes: Sequence[str] = ("inference",),
                 repeats: int = 10, warmup: int = 3, input_size=None,
                 compile: Optional[str] = None, grouped_conv: str = "native",
                 detail: bool = False,
                 memory_formats: Sequence[str] = ("auto",),
                 on_rows: Optional[Callable[[List[BenchRow]], None]] = None) -> List[BenchRow]:
    """Time models the paper's way (footnote 1: per image, forward pass, large batch).

    For each path and mode, the models take turns in one process. ``modes`` may add
    ``"train"``: one step of ``deeproots train``'s recipe (forward, loss, backward, SGD
    update; bf16 autocast and channels-last on CUDA), compiled with ``compile`` and grouped
    convs run by ``grouped_conv`` as in ``train``, in each of ``memory_formats``
    (``auto``, ``channels-last``, ``contiguous``: train's ``--memory-format``); ``detail``
    adds the forward, backward and optimizer parts of a step (timm's ``--detail``). Train
    GFLOP/s count the backward pass as twice the forward. A batch that runs out of GPU memory
    is halved and tried again, as timm's benchmark does; the rows say so in ``notes``.
    ``on_rows`` is called with the rows of each path and mode as soon as they are measured
    (a long bench shows what it has, and a run stopped part-way keeps it). ``names``: model
    names, ``FILE.py:FUNCTION``, or modules (:func:`models_to_time`)."""
    check_models(names)  # unknown names fail before anything is built
    check_positive("batch size", batch_size)
    _check_dtype(dtype)
    for p in paths:
        if p not in PATHS:
            raise DeeprootsError(f"unknown path {p!r}; accepted: {', '.join(PATHS)}")
    for m in modes:
        if m not in MODES:
            raise DeeprootsError(f"unknown mode {m!r}; accepted: {', '.join(MODES)}")
    if compile is not None:
        check_choice("compile", compile, COMPILE_MODES)
    for fmt in memory_formats:
        check_choice("memory_format", fmt, MEMORY_FORMATS)
    device = str(resolve_device(device, accepted=("cpu", "cuda")))
    if "train" in modes:
        # resolved once here, and each step takes what it resolved to
        grouped_conv = resolve_grouped_conv(grouped_conv, torch.device(device).type, compile)
    if threads is not None:
        torch.set_num_threads(check_positive("threads", threads))
    notes: List[str] = []
    while True:
        try:
            rows = _bench(names, batch_size, device, dtype, paths, modes, repeats, warmup,
                          input_size, dict(compile=compile, grouped_conv=grouped_conv), detail,
                          memory_formats, on_rows, notes)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise DeeprootsError(f"one image runs out of memory on {device}") from None
            notes.append(f"batch {batch_size} ran out of memory on {device}; halved to "
                         f"{batch_size // 2}")
            batch_size //= 2
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        for r in rows:
            r.notes = notes + r.notes
        return rows


def _bench(names, batch_size, device, dtype, paths, modes, repeats, warmup, input_size,
           train_options, detail, memory_formats=("auto",), on_rows=None,
           notes_so_far=()) -> List[BenchRow]:
    models = models_to_time(names, device)
    names = list(models)
    first = models[names[0]]
    size = parse_input_size(input_size, first)
    if hasattr(first, "check_input"):
        first.check_input(torch.empty(1, *size, device="meta"))
    # each model runs one image first: one line for a model that cannot be timed
    classes = {n: example_logits(m, torch.zeros(1, *size, device=device), n).shape[1]
               for n, m in models.items()}[names[0]]
    costs = {n: profile(m, size) for n, m in models.items()}
    cuda = device.startswith("cuda")
    if not cuda:  # a GPU's batch that does not fit is halved instead
        for n, cost in costs.items():
            check_batch_fits(cost.activation_bytes(training="train" in modes), batch_size,
                             device, ("train" if "train" in modes else "time") + f" {n}")
    macs = {n: cost.macs for n, cost in costs.items()}
    x = torch.randn(batch_size, *size, device=device)
    y = None
    if "train" in modes:  # labels in the model's class range
        y = torch.randint(0, classes, (batch_size,), device=device)
    rows = []
    for mode in modes:
        for path, fmt in ([(p, None) for p in paths] if mode == "inference"
                          else [(None, f) for f in memory_formats]):
            if mode == "inference":
                built = {n: build_path(m, x, path, TORCH_DTYPES[dtype])
                         for n, m in models.items()}
                work = {n: (lambda f=f: f(x)) for n, f in built.items()}
                fallbacks = {n: f.fallbacks for n, f in built.items()}
                row_dtype = dtype
            else:  # a copy each: the inference models stay as they are
                layout = choose_layout(torch.device(device), fmt)
                work = {n: train_step_fn(copy.deepcopy(m), x, y, layout=layout,
                                         **train_options) for n, m in models.items()}
                steps = {n: w.step for n, w in work.items()}
                fallbacks = {n: s.fallbacks for n, s in steps.items()}
                first_step = steps[names[0]]
                path = ("compile:" + first_step.compile_mode if first_step.compile_mode
                        else "eager") + ("" if first_step.grouped_conv == "native"
                                         else "+" + first_step.grouped_conv) + \
                    f"/{layout.memory_format}"
                row_dtype = "bfloat16 autocast" if cuda else "float32"
            timings = interleaved(work, batch_size, repeats, warmup, cuda=cuda)
            # after the run: a kernel path's notes include the choices it measured
            notes = {n: built[n].notes if mode == "inference" else [] for n in names}
            phases = step_phases(steps, x, y, repeats) if mode == "train" and detail else {}
            base = timings[names[0]].median_s
            factor = 3 if mode == "train" else 1  # backward costs about twice the forward
            for n in names:
                t = timings[n]
                rows.append(BenchRow(
                    model=n, mode=mode, path=path, dtype=row_dtype, device=device,
                    batch_size=batch_size, threads=torch.get_num_threads(),
                    ms_per_image=t.ms_per_image, spread=t.spread, speedup=base / t.median_s,
                    ideal_speedup=macs[names[0]] / macs[n],
                    gflops=2 * factor * macs[n] * batch_size / t.median_s / 1e9, macs=macs[n],
                    allocator=allocator(), fallbacks=fallbacks[n],
                    notes=[f"{n} ({path}): {note}" for note in notes[n]],
                    phases_ms=phases.get(n, {}),
                    compile_s=steps[n].compile_s if mode == "train" else None,
                    others=t.others))
            if on_rows is not None:
                group = rows[-len(names):]
                on_rows([replace(r, notes=list(notes_so_far) + r.notes) for r in group])
    return rows


def step_phases(steps: Dict[str, TrainStep], x, y, repeats: int
                ) -> Dict[str, Dict[str, float]]:
    """Median ms per batch of each part (forward, backward, optimizer) of each training
    step, over ``repeats``, the steps taking turns."""
    seen: Dict[str, Dict[str, List[float]]] = {n: {} for n in steps}
    for _ in range(repeats):
        for n, step in steps.items():
            for part, seconds in step.phases(x, y, 0.01).items():
                seen[n].setdefault(part, []).append(1000 * seconds)
    return {n: {part: statistics.median(v) for part, v in parts.items()}
            for n, parts in seen.items()}


def bench_paper(table: str, *, batch_size: Optional[int] = None, **kwargs) -> List[BenchRow]:
    """Every variant of one of the paper's timed tables (``nin``, ``resnet50``,
    ``googlenet``) timed side by side, each row carrying the paper's CPU and GPU timings and
    speedups in ``paper``. ``batch_size`` defaults to the table's own (128 for NiN's 32x32
    images, 16 at 224x224)."""
    paper = {r["model"]: r for r in paper_timings(table)}
    batch = batch_size or PAPER_TABLES[table].bench_batch_size
    rows = bench_models(list(paper), batch_size=batch, **kwargs)
    for r in rows:
        r.paper = {k: v for k, v in paper[r.model].items() if k != "model"}
    return rows


def format_bench(rows: List[BenchRow]) -> str:
    """Bench rows as a readable table (with the parts of a training step, when measured)."""
    head = ("model", "mode", "path", "ms/img", "spread", "speedup", "ideal", "GFLOP/s")
    parts = list(next((r.phases_ms for r in rows if r.phases_ms), {}))
    short = {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}
    head += tuple(f"{short.get(p, p)} ms" for p in parts)
    body = [(r.model, r.mode, r.path, f"{r.ms_per_image:.3f}", f"{100 * r.spread:.0f}%",
             f"{r.speedup:.2f}x", f"{r.ideal_speedup:.2f}x", f"{r.gflops:.0f}",
             *(f"{r.phases_ms[p]:.2f}" if p in r.phases_ms else "" for p in parts))
            for r in rows]
    r0 = rows[0]
    dtypes = ", ".join(dict.fromkeys(r.dtype for r in rows))
    title = (f"batch {r0.batch_size}, {dtypes}, {r0.device}, {r0.threads} threads, "
             f"torch {torch.__version__}")
    notes = [f"{r.model} ({r.path}) left to PyTorch: {f}" for r in rows for f in r.fallbacks]
    notes += [f"{r.model} ({r.path}): first step, compiling: {r.compile_s:.1f} s"
              for r in rows if r.compile_s is not None]
    notes += list(dict.fromkeys(n for r in rows for n in r.notes))
    notes += [f"{r.model} ({r.path}): unreliable, the repeats spread {100 * r.spread:.0f}% of "
              f"their median; run with more --repeats on a quieter machine"
              for r in rows if r.spread > UNRELIABLE_SPREAD]
    loaded = max((r.others for r in rows if r.others is not None), default=None)
    note = contention_note(loaded)
    if note:
        notes.append(note)
    return "\n".join([title, format_table(head, body, align="lllrrrrr" + "r" * len(parts)),
                      f"allocator: {r0.allocator}", *notes])


@dataclass
class LayerTimes:
    """Where the time of one forward pass goes. ``layers``: one dict per layer in the order
    the pass runs them (``layer``, ``kind``, ``ms`` per batch, ``share`` of the pass,
    ``macs``, ``gflops``, ``category``); ``summary``: their sums by kind of layer;
    ``total_ms``: the whole pass per batch. The run's settings ride along."""

    total_ms: float
    layers: List[dict]
    summary: Dict[str, dict]
    model: str = ""
    path: str = ""
    batch_size: int = 0
    dtype: str = "float32"
    threads: int = 0
    allocator: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def layer_times(model: nn.Module, example: torch.Tensor, path: str = "fold", *,
                dtype: str = "float32", repeats: int = 5, warmup: int = 2) -> LayerTimes:
    """Where the time of one forward pass goes: per layer, the median ms per batch over
    ``repeats``, its share of the whole pass, the layer's multiply-adds and GFLOP/s.

    ``eager`` and ``fold`` time each leaf module with forward hooks, on the CPU or a GPU
    (synchronised around each module), so batch norm, ReLU and pooling appear on their own
    lines and ``(other)`` is the rest of the pass (Python, reshapes, residual adds);
    ``openvino`` reads the engine's own per-node counters, named by the model's modules, with
    the kernel it chose (e.g. ``brgconv_avx512_1x1_f32``). The model passed in is not changed:
    the timing runs on an eval-mode copy.
    """
    if path not in LAYER_PATHS:
        raise DeeprootsError(f"per-layer timing supports paths {', '.join(LAYER_PATHS)}; "
                             f"got {path!r}")
    _check_dtype(dtype)
    check_positive("repeats", repeats)
    check_whole("warmup", warmup)
    model = copy.deepcopy(model).eval()
    costs = profile(model, tuple(example.shape[1:])).layers
    macs = {c.name: c.macs * len(example) for c in costs}
    category = {c.name: _category(c) for c in costs}
    if path == "openvino":
        if example.device.type != "cpu":
            raise DeeprootsError(f"path 'openvino' runs on the CPU; got an input on "
                                 f"{example.device}")
        check_path(path, TORCH_DTYPES[dtype])  # the same checks as the timed path
        total, times, kinds = _openvino_layer_times(model, example, TORCH_DTYPES[dtype],
                                                    repeats, warmup)
    else:
        total, times, kinds = _hooked_layer_times(
            model if path == "eager" else fold_batchnorm(model), example, path,
            TORCH_DTYPES[dtype], repeats, warmup)
    # medians of separate runs: on a busy machine the parts can add up to more than the
    # median whole, which is then the sum (no "(other)" line)
    total = max(total, sum(times.values()))
    rows = []
    for name, ms in times.items():
        m = macs.get(layer_name(name), 0)
        rows.append({"layer": name, "kind": kinds[name], "ms": ms, "share": ms / total,
                     "macs": m, "gflops": 2 * m / ms / 1e6 if m and ms > 0 else None,
                     "category": category.get(layer_name(name), REST)})
    rest = total - sum(times.values())
    if rest > 0:
        rows.append({"layer": "(other)", "kind": "", "ms": rest, "share": rest / total,
                     "macs": 0, "gflops": None, "category": REST})
    summary = {}
    for r in rows:
        s = summary.setdefault(r["category"], {"ms": 0.0, "macs": 0})
        s["ms"] += r["ms"]
        s["macs"] += r["macs"]
    for s in summary.values():
        s["share"] = s["ms"] / total
        s["gflops"] = 2 * s["macs"] / s["ms"] / 1e6 if s["macs"] and s["ms"] > 0 else None
    return LayerTimes(total, rows, summary, model=getattr(model, "name", type(model).__name__),
                      path=path, batch_size=len(example), dtype=dtype,
                      threads=torch.get_num_threads(), allocator=allocator())


def bench_layers(names: Sequence[Union[str, nn.Module]], *, paths: Sequence[str] = ("fold",),
                 batch_size: int = 128, device: str = "cpu", threads: Optional[int] = None,
                 dtype: str = "float32", repeats: int = 5, warmup: int = 2, input_size=None,
                 on_result: Optional[Callable[[LayerTimes], None]] = None) -> List[LayerTimes]:
    """:func:`layer_times` of each model (:func:`models_to_time`: names built with seed 0, or
    modules) on each path, on a random batch; ``on_result`` is called as each one is ready
    (to print it)."""
    for path in paths:
        if path not in LAYER_PATHS:
            raise DeeprootsError(f"--layers times paths {', '.join(LAYER_PATHS)}; got {path!r}")
    check_models(names)
    check_positive("batch size", batch_size)
    dev = resolve_device(device, accepted=("cpu", "cuda"))
    if threads is not None:
        torch.set_num_threads(check_positive("threads", threads))
    results = []
    for name, model in models_to_time(names, dev).items():
        size = parse_input_size(input_size, model)
        if hasattr(model, "check_input"):
            model.check_input(torch.empty(1, *size, device="meta"))
        check_batch_fits(profile(model, size).activation_bytes(), batch_size, dev,
                         f"time {name}")
        x = torch.randn(batch_size, *size, device=dev)
        for path in paths:
            result = layer_times(model, x, path, dtype=dtype, repeats=repeats, warmup=warmup)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


REST = "rest (pooling, ReLU, adds, reorders, Python)"


def _category(cost) -> str:
    """The kind of layer a time is spent in: 1x1 convs, grouped or dense spatial convs."""
    if cost.type != "Conv2d":
        return "fully connected" if cost.type == "Linear" else cost.type
    if cost.kernel == "1x1":
        return "1x1 convs" if cost.groups == 1 else "grouped 1x1 convs"
    return "grouped spatial convs" if cost.groups > 1 else "dense spatial convs"


def _hooked_layer_times(model, example, path, dtype, repeats, warmup):
    model = model.to(dtype)  # a copy: layer_times never times the caller's model
    x = example.to(dtype)
    if path == "fold":
        model, x = channels_last(model), channels_last(x)
    leaves = [(n, m) for n, m in model.named_modules()
              if n and not list(m.children()) and not isinstance(m, (nn.Identity, nn.Dropout))]
    # seconds per pass of each module (a module called several times in a pass, like a
    # shared ReLU, sums its calls), from marks on the device's queue (the one timer's Mark:
    # CUDA events on a GPU, no synchronisation per layer; the host clock on a CPU)
    samples: Dict[str, List[float]] = {n: [] for n, _ in leaves}
    called = set()
    pass_marks: List[tuple] = []  # (name, start, end) of this pass
    recording = [False]
    device = x.device

    def before(name, module, args):
        if recording[0]:
            pass_marks.append((name, Mark(device), Mark(device)))
            pass_marks[-1][1].record()

    def after(name, module, args, out):
        if recording[0]:
            next(m for m in reversed(pass_marks) if m[0] == name)[2].record()
            called.add(name)

    totals = []
    with hooks(leaves, before=before, after=after), torch.inference_mode():
        for i in range(warmup + repeats):
            recording[0] = i >= warmup
            pass_marks.clear()
            start, end = Mark(device), Mark(device)
            start.record()
            model(x)
            end.record()
            if i >= warmup:
                totals.append(start.seconds_to(end))
                for runs in samples.values():
                    runs.append(0.0)
                for name, a, b in pass_marks:
                    samples[name][-1] += a.seconds_to(b)
    times = {n: 1000 * statistics.median(s) for n, s in samples.items() if n in called}
    kinds = {n: type(m).__name__ for n, m in leaves}
    return 1000 * statistics.median(totals), times, kinds


def _openvino_scope_to_module(node_name: str) -> str:
    """'/layer1/layer1.0/downsample/downsample.0/Conv/WithoutBiases' ->
    'layer1.0.downsample.0': the torch.onnx exporter names a node by its module scopes, each
    a child's attribute name or, inside a container, the container's name dotted with the
    child's ('layer1.0'); the last segments name the operator."""
    parts = [p for p in node_name.split("/") if p]
    while parts and parts[-1][:1].isupper():  # 'Conv', 'WithoutBiases', 'Gemm'
        parts.pop()
    path: List[str] = []
    for p in parts:
        head, _, tail = p.rpartition(".")
        if head and path and path[-1] == head:
            path.append(tail)  # 'layer1' then 'layer1.0'
        else:
            path.append(p)
    return ".".join(path) or node_name


def _openvino_layer_times(model, example, dtype, repeats, warmup):
    # the model as built (not folded): OpenVINO folds batch norm and ReLU into the convs
    # itself, and the exported node names keep the module paths
    compiled = openvino_compile(onnx_bytes(model, example, "legacy"), dtype, PERF_COUNT=True)
    request = compiled.create_infer_request()
    data = example.detach().cpu().numpy()
    samples: Dict[str, List[float]] = {}
    kinds: Dict[str, str] = {}
    totals = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        request.infer({0: data})
        if i < warmup:
            continue
        totals.append(time.perf_counter() - t0)
        seen: Dict[str, float] = {}
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED or info.node_type == "Parameter":
                continue
            name = (_openvino_scope_to_module(info.node_name)
                    if info.node_type in ("Convolution", "GroupConvolution", "FullyConnected",
                                          "MatMul") else info.node_name.lstrip("/"))
            seen[name] = seen.get(name, 0.0) + info.real_time.total_seconds() * 1000
            kinds[name] = f"{info.node_type} {info.exec_type}"
        for name, ms in seen.items():
            samples.setdefault(name, []).append(ms)
    times = {n: statistics.median(s) for n, s in samples.items()}
    return 1000 * statistics.median(totals), times, kinds


@dataclass
class TrainLayerTimes:
    """Where the time of a training step's forward and backward passes goes, layer by layer:
    ``layers``: one dict per leaf module in the order the pass reaches it (``layer``,
    ``kind``, ``category``, ``macs`` of its forward, ``forward_ms`` and ``backward_ms`` per
    batch, ``backward_share`` of the summed backward); ``summary``: their sums by kind of
    layer, with the share of the backward time and of the multiply-adds. Each layer is timed
    on its own, on an input of the shape the pass gives it, in the step's layout."""

    layers: List[dict]
    summary: Dict[str, dict]
    model: str = ""
    memory_format: str = ""
    batch_size: int = 0
    threads: int = 0
    allocator: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _train_category(module: nn.Module, cost) -> str:
    if isinstance(module, nn.Conv2d) and cost is not None:
        return _category(cost)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch norm"
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU)):
        return "activations"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return "pooling"
    return "fully connected" if isinstance(module, nn.Linear) else type(module).__name__


def train_layer_times(model: nn.Module, x: torch.Tensor, memory_format: str = "auto", *,
                      repeats: int = 3, warmup: int = 1) -> TrainLayerTimes:
    """Forward and backward ms per batch of each leaf module of ``model`` in training (the
    step's layout, ``memory_format`` as train's), each timed alone on a random input of the
    shape the training pass of ``x`` gives it (forward, then forward and backward, taking
    turns: backward = their difference), against its multiply-adds. The model passed in is
    not changed. ``deeproots bench MODEL --mode train --layers``."""
    check_positive("repeats", repeats)
    check_whole("warmup", warmup)
    layout = choose_layout(x.device, memory_format)
    net = layout.apply(copy.deepcopy(model).train())
    costs = {c.name: c for c in profile(net, tuple(x.shape[1:])).layers}
    leaves = [(n, m) for n, m in net.named_modules()
              if n and not list(m.children()) and not isinstance(m, (nn.Identity, nn.Dropout))]
    with capture(leaves, "input") as inputs, torch.no_grad():
        net(layout.input(x))
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    first = next(iter(shapes), None)  # the input image needs no gradient
    rows = []
    for name, module in leaves:
        if name not in shapes:
            continue
        mod = copy.deepcopy(module)
        if hasattr(mod, "inplace"):
            mod.inplace = False  # the same backward; an in-place op on a leaf cannot record
        inp = layout.input(torch.randn(shapes[name], device=x.device)).requires_grad_(
            name != first)

        def forward(mod=mod, inp=inp):
            with layout.autocast():
                return mod(inp)

        def both(forward=forward, mod=mod, inp=inp):
            out = forward()
            out.backward(torch.ones_like(out))
            inp.grad = None
            mod.zero_grad(set_to_none=True)

        timing = interleaved({"forward": forward, "both": both}, images=len(x),
                             repeats=repeats, warmup=warmup, warmup_s=0.0,
                             cuda=x.device.type == "cuda")
        fwd = 1000 * timing["forward"].median_s
        bwd = max(0.0, 1000 * timing["both"].median_s - fwd)
        cost = costs.get(layer_name(name))
        rows.append({"layer": name, "kind": type(module).__name__,
                     "category": _train_category(module, cost),
                     "macs": (cost.macs if cost else 0) * len(x), "forward_ms": fwd,
                     "backward_ms": bwd})
    backward = sum(r["backward_ms"] for r in rows) or 1e-9
    macs = sum(r["macs"] for r in rows) or 1
    summary: Dict[str, dict] = {}
    for r in rows:
        r["backward_share"] = r["backward_ms"] / backward
        s = summary.setdefault(r["category"], {"forward_ms": 0.0, "backward_ms": 0.0,
                                               "macs": 0})
        for key in ("forward_ms", "backward_ms", "macs"):
            s[key] += r[key]
    for s in summary.values():
        s["backward_share"], s["macs_share"] = s["backward_ms"] / backward, s["macs"] / macs
    return TrainLayerTimes(rows, summary, model=getattr(model, "name", type(model).__name__),
                           memory_format=layout.memory_format, batch_size=len(x),
                           threads=torch.get_num_threads(), allocator=allocator())


def format_train_layer_times(result: TrainLayerTimes) -> str:
    """A :func:`train_layer_times` result as tables: the layers, then the kinds of layer by
    their share of the backward pass beside their share of the multiply-adds."""
    title = (f"{result.model}, training step ({result.memory_format}), batch "
             f"{result.batch_size}, {result.threads} threads, allocator {result.allocator}")
    body = [(r["layer"], r["kind"], f"{r['macs'] / 1e6:.1f}" if r["macs"] else "",
             f"{r['forward_ms']:.2f}", f"{r['backward_ms']:.2f}",
             f"{100 * r['backward_share']:.1f}%") for r in result.layers]
    table = format_table(("layer", "kind", "MMACs", "forward ms", "backward ms",
                          "of backward"), body, align="llrrrr")
    order = sorted(result.summary.items(), key=lambda kv: -kv[1]["backward_ms"])
    summary = format_table(
        ("by kind of layer", "forward ms", "backward ms", "of backward", "of MACs"),
        [(k, f"{v['forward_ms']:.1f}", f"{v['backward_ms']:.1f}",
          f"{100 * v['backward_share']:.1f}%", f"{100 * v['macs_share']:.1f}%")
         for k, v in order], align="lrrrr")
    return f"{title}\n{table}\n\n{summary}"


def format_layer_times(result: LayerTimes, title: Optional[str] = None) -> str:
    """A :func:`layer_times` result as readable tables: the layers in the order the pass runs
    them, then the sums by kind of layer, slowest first. ``title`` defaults to the run's
    settings."""
    if title is None:
        title = (f"{result.model}, path {result.path}, batch {result.batch_size}, "
                 f"{result.dtype}, {result.threads} threads, allocator {result.allocator}")
    body = [(r["layer"], r["kind"], f"{r['ms']:.2f}", f"{100 * r['share']:.1f}%",
             f"{r['macs'] / 1e6:.1f}" if r["macs"] else "",
             f"{r['gflops']:.0f}" if r["gflops"] else "") for r in result.layers]
    head = ("layer", "kind", "ms/batch", "share", "MMACs", "GFLOP/s")
    table = format_table(head, body, align="llrrrr")
    order = sorted(result.summary.items(), key=lambda kv: -kv[1]["ms"])
    summary = format_table(("by kind of layer", "ms/batch", "share", "MMACs", "GFLOP/s"), [
        (k, f"{v['ms']:.2f}", f"{100 * v['share']:.1f}%",
         f"{v['macs'] / 1e6:.1f}" if v["macs"] else "",
         f"{v['gflops']:.0f}" if v["gflops"] else "") for k, v in order], align="lrrrr")
    return ((title + "\n" if title else "") + table + "\n\n" + summary
            + f"\ntotal {result.total_ms:.2f} ms")
