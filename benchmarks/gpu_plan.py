"""How many Triton kernel variants each step of the GPU session compiles, counted on a CPU
from the real launchers' arguments: every distinct specialisation of a kernel (its
compile-time constants and Triton's argument specialisation) times the configurations its
prune rules let the autotuner try. A step whose count is large spends its limit compiling,
not timing: benchmarks/gpu_session.sh sizes its steps by these counts. The model steps are
recorded at batch 16 (the counts do not depend on the batch: the batch-dependent integers
the launchers pass, pixel counts and their buckets, are multiples of 16 at batch 16 as at
256, and Triton specialises them alike).

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
from deeproots.deploy import fold_batchnorm  # noqa: E402
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


STEPS = {  # the session's steps: run, what it runs, the launches it makes
    "1 tests": ("pytest -m gpu_quick, DEEPROOTS_AUTOTUNE=first", _tests),
    "1 bench": ("nin-root-8 dispatch + fused, batch 256",
                lambda: _net("nin-root-8", "dispatch", 16) + _net("nin-root-8", "fused", 16)),
    "1 train": ("nin-root-8, 50 steps, batch 128", lambda: _net("nin-root-8", "", 16, True)),
    "2 targets": ("per-layer and fused tables, nin-root-8 and resnet50-root-64, batch 256",
                  lambda: sum((_net(m, p, 16) for m in ("nin-root-8", "resnet50-root-64")
                               for p in ("dispatch", "fused")), [])),
    "2 training": ("gpu_training.py eager+dispatch, 2 root models, batch 128, "
                   "DEEPROOTS_AUTOTUNE=first",
                   lambda: sum((_net(m, "", 16, True) for m in ("nin-root-8",
                                                                 "resnet50-root-64")), [])),
}


def main():
    rows, total = [], 0
    for step, (what, launches) in STEPS.items():
        count = variants(launches(), first="first" in what)
        n = sum(count.values())
        total += n
        rows.append((step, what, str(n), ", ".join(f"{k.lstrip('_')} {v}"
                                                   for k, v in sorted(count.items()))))
        print(rows[-1], file=sys.stderr, flush=True)
    print("Triton kernel variants each step of benchmarks/gpu_session.sh compiles (each "
          "specialisation x the configurations it may try)")
    print(format_table(("step", "runs", "variants", "by kernel"), rows, align="llrl"))
    print(f"{total} in all")


if __name__ == "__main__":
    main()
