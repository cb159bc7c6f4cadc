"""How many Triton kernel variants each step of the GPU session compiles, counted on a CPU
from the real launchers' arguments: every distinct specialisation of a kernel (its
compile-time constants and Triton's argument specialisation) times the configurations its
prune rules let the autotuner try. A step whose count is large spends its limit compiling,
not timing: benchmarks/gpu_session.sh sizes its steps by these counts. The model steps are
recorded at batch 16 (the counts do not depend on the batch: the batch-dependent integers
the launchers pass, pixel counts and their buckets, are multiples of 16 at batch 16 as at
256, and Triton specialises them alike). Both models of each pair are counted: the orig
network's ungrouped conv -> ReLU -> 1x1 blocks are fused too, and are the heaviest to
compile. Each step's time limit follows from its count (:func:`limit_of`).

    python benchmarks/gpu_plan.py            # no GPU needed (about a minute)
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the autotuned kernels, as a GPU has them

import torch  # noqa: E402

from deeproots import create_model  # noqa: E402
from deeproots.speed.fold import fold_batchnorm  # noqa: E402
from deeproots.kernels.fusion import fuse_root_blocks  # noqa: E402
from deeproots.kernels.modules import TritonConv2d, replace_convs  # noqa: E402
from deeproots.kernels.resources import recorded, variants  # noqa: E402
from deeproots.text import format_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tests():
    """The launches of `pytest -m gpu_quick`, recorded under the interpreter."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "launches.jsonl"
        env = {**os.environ, "TRITON_INTERPRET": "1", "DEEPROOTS_RECORD_LAUNCHES": str(log)}
        subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu_quick", "-q", "-p",
                        "no:cacheprovider", "-n", "2"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        rows = [json.loads(line) for line in log.read_text().splitlines()]

    def decode(v):
        return torch.empty(16, dtype=getattr(torch, v["tensor"])) if isinstance(v, dict) else v

    return [(name, tuple(decode(a) for a in args), {k: decode(v) for k, v in kw.items()})
            for name, args, kw in rows]


def _net(name, path, batch, train=False):
    """The launches of one forward (and backward) pass of ``name`` in bf16, channels-last,
    with its grouped convs in the Triton conv (``path`` fused: its root blocks fused)."""
    torch.manual_seed(0)
    model = create_model(name)
    if not train:
        model = fold_batchnorm(model.eval())
        if path == "fused":
            fuse_root_blocks(model, choose=False)
    net, _ = replace_convs(model, TritonConv2d)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, *create_model(name).default_input_size).contiguous(
        memory_format=torch.channels_last)
    with recorded() as launches:
        if train:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net.train()(x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        else:
            with torch.no_grad():
                net.to(torch.bfloat16)(x.to(torch.bfloat16))
    return launches


def _check(name, batch=16):
    """The launches of benchmarks/gpu_check.py for ``name``: each grouped conv forward and
    backward, and each conv -> ReLU -> 1x1 block fused, in bf16 and fp32."""
    from deeproots.kernels.grouped_conv import GroupedConv2dFunction
    from deeproots.models.layers import grouped_convs

    torch.manual_seed(0)
    model = create_model(name).eval()
    x0 = torch.zeros(1, *model.default_input_size)
    gm = fold_batchnorm(model)
    fuse_root_blocks(gm, choose=False)
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        with recorded() as got:
            for _, conv, shape in grouped_convs(model, x0):
                x = torch.randn(batch, *shape, dtype=dtype).contiguous(
                    memory_format=torch.channels_last).requires_grad_()
                w = conv.weight.detach().to(dtype).requires_grad_()
                y = GroupedConv2dFunction.apply(x, w, None, conv.stride, conv.padding,
                                                conv.dilation, conv.groups)
                y.float().sum().backward()
            with torch.no_grad():
                gm.to(dtype)(x0.expand(batch, -1, -1, -1).to(dtype).contiguous(
                    memory_format=torch.channels_last))
            gm.float()
        launches += got
    return launches


PAIR = ("nin", "nin-root-8")  # the pair the session trains and benches
STEPS = {  # the session's steps: what each runs, and the launches it makes
    "tests": ("pytest -m gpu_quick, DEEPROOTS_AUTOTUNE=first", _tests, True),
    "check": ("gpu_check.py: nin-root-8 and resnet50-root-64 against cuDNN, bf16 and fp32, "
              "DEEPROOTS_AUTOTUNE=first",
              lambda: _check("nin-root-8") + _check("resnet50-root-64"), True),
    "train": ("deeproots train nin and nin-root-8, --grouped-conv dispatch (native: none)",
              lambda: sum((_net(m, "", 16, True) for m in PAIR), []), False),
    "bench dispatch": ("bench nin nin-root-8 --path dispatch, bf16",
                       lambda: sum((_net(m, "dispatch", 16) for m in PAIR), []), False),
    "bench fused": ("bench nin nin-root-8 --path fused, bf16 (both models' blocks)",
                    lambda: sum((_net(m, "fused", 16) for m in PAIR), []), False),
    "bench cudagraph": ("bench nin nin-root-8 --path cudagraph (the dispatch path, captured)",
                        lambda: sum((_net(m, "dispatch", 16) for m in PAIR), []), False),
    "targets": ("gpu_targets.py --tables-only --models resnet50-root-64: per-layer and fused "
                "tables", lambda: _net("resnet50-root-64", "dispatch", 16)
                + _net("resnet50-root-64", "fused", 16), False),
}
# Seconds a step is given: a base (the process, the models, the timing itself) and a share
# per kernel variant it compiles. The per-variant figure is this plan's assumption until the
# first GPU session measures it (its summary prints each step's seconds beside its count).
BASE_S = {"tests": 25, "check": 15, "train": 80, "bench dispatch": 15, "bench fused": 15,
          "bench cudagraph": 15, "targets": 15}
SECONDS_PER_VARIANT = 1.25
MACHINE_S = 10  # nvidia-smi and the versions
SESSION_S = 480  # one call: 8 minutes of the 10 a call may take


def limit_of(step: str, variants: int) -> int:
    """The step's time limit in seconds, from its kernel-variant count."""
    return int(BASE_S[step] + SECONDS_PER_VARIANT * variants)


def main():
    rows, total_s = [], 0
    for step, (what, launches, first) in STEPS.items():
        count = variants(launches(), first=first)
        n = sum(count.values())
        limit = limit_of(step, n)
        total_s += limit
        rows.append((step, what, str(n), f"{limit} s", ", ".join(
            f"{k.lstrip('_')} {v}" for k, v in sorted(count.items()))))
        print(rows[-1], file=sys.stderr, flush=True)
    print("Triton kernel variants each step of benchmarks/gpu_session.sh compiles (each "
          "specialisation x the configurations it may try) and the limit that follows "
          f"(a base + {SECONDS_PER_VARIANT:g} s a variant)")
    print(format_table(("step", "runs", "variants", "limit", "by kernel"), rows,
                       align="llrrl"))
    total_s += MACHINE_S
    print(f"{total_s} s of limits in all with the machine step's {MACHINE_S} s; the "
          f"session's call: {SESSION_S} s" + ("" if total_s <= SESSION_S else
                                              " (over: trim the steps)"))
    print("limits for benchmarks/gpu_session.sh: " + " ".join(
        f"{r[0].replace(' ', '_')}={r[3][:-2]}" for r in rows))


if __name__ == "__main__":
    main()
