"""Training throughput (images/s) on the CPU, by `deeproots train`'s own step
(deeproots.training.step.TrainStep), in both memory layouts and with and without torch.compile, the
models of each configuration timed side by side; then where a step's time goes (forward,
backward, optimizer) against where its multiply-adds are.

    python benchmarks/train_throughput.py                          # nin family, batch 128
    python benchmarks/train_throughput.py --family resnet50        # small batch, 3x112x112
    python benchmarks/train_throughput.py --compile --repeats 5
    python benchmarks/train_throughput.py --allocator glibc         # as deeproots --allocator

NiN's batches are real Fashion-MNIST images (1x28x28) when the dataset is found, random ones
otherwise; ResNet's are random 3x112x112 images (their values do not change a step's time).
The models of a configuration take turns (A, B, A, B, ...) after a warm-up, so that they see
the same machine; the speedup is over the first model in the same configuration, the ideal
the ratio of multiply-adds.
"""
import argparse
import copy
import os
import platform
import sys

import torch

import deeproots
from deeproots.speed.bench import step_phases, train_step_fn
from deeproots.runtime import ALLOCATORS, allocator, use_fast_allocator
from deeproots.layout import choose_layout
from deeproots.text import format_table
from deeproots.speed.timing import interleaved

FAMILIES = {  # models, default batch, input (C, H, W)
    "nin": (["nin", "nin-root-8", "nin-root-16"], 128, (1, 28, 28)),
    "resnet50": (["resnet50", "resnet50-root-64"], 16, (3, 112, 112)),
}


def _batch(shape, batch):
    c, h, w = shape
    if (c, h, w) == (1, 28, 28):
        try:
            images, labels = deeproots.training.data.load_fashion_mnist(None, "train", download_ok=False)
            x = deeproots.training.data.DATASETS["fashion-mnist"].spec.normalize(images[:batch])
            return x, labels[:batch], "Fashion-MNIST"
        except deeproots.training.data.DataError:
            pass
    return torch.randn(batch, c, h, w), torch.randint(0, 10, (batch,)), "random"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=FAMILIES, default="nin")
    p.add_argument("--models", nargs="+", help="default: the family's")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels-last"],
                   choices=["contiguous", "channels-last"])
    p.add_argument("--compile", action="store_true", help="also torch.compile the step")
    p.add_argument("--allocator", choices=ALLOCATORS, default="system",
                   help="as deeproots --allocator (default: this process's, as started)")
    args = p.parse_args()
    use_fast_allocator(sys.argv[1:], args.allocator, script=os.path.abspath(__file__))
    names, batch, shape = FAMILIES[args.family]
    names, batch = args.models or names, args.batch_size or batch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y, source = _batch(shape, batch)
    models = {n: deeproots.create_model(n, in_channels=shape[0], num_classes=10) for n in names}
    macs = {n: deeproots.profile(m, shape).macs for n, m in models.items()}
    configs = [(fmt, compile_) for compile_ in ([None, "default"] if args.compile else [None])
               for fmt in args.layouts]
    rows, phase_rows = [], []
    base_ips = None
    for fmt, compile_ in configs:
        layout = choose_layout(torch.device("cpu"), fmt)
        work = {n: train_step_fn(copy.deepcopy(m), x, y, compile=compile_, layout=layout)
                for n, m in models.items()}
        timings = interleaved(work, images=batch, repeats=args.repeats)
        phases = step_phases({n: w.step for n, w in work.items()}, x, y, args.repeats)
        label = f"{fmt}{', compiled' if compile_ else ''}"
        first = timings[names[0]].images_per_s
        base_ips = base_ips or first
        for n in names:
            t = timings[n]
            compile_s = work[n].step.compile_s
            rows.append((n, label, f"{t.images_per_s:.1f}", f"{100 * t.spread:.0f}%",
                         f"{t.images_per_s / first:.2f}x", f"{macs[names[0]] / macs[n]:.2f}x",
                         f"{t.images_per_s / base_ips:.2f}x",
                         f"{compile_s:.0f}" if compile_s else ""))
            ph = phases[n]
            total = sum(ph.values())
            phase_rows.append((n, label, *(f"{ph[k]:.1f} ({100 * ph[k] / total:.0f}%)"
                                           for k in ("forward", "backward", "optimizer"))))
    print(f"training throughput: {source} {'x'.join(map(str, shape))}, batch {batch}, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.machine()} "
          f"({platform.processor() or 'cpu'}), allocator {allocator()}")
    print(format_table(("model", "layout", "img/s", "spread", "speedup", "ideal",
                        f"over {names[0]} {configs[0][0]}", "compile s"), rows,
                       align="llrrrrrr"))
    print()
    print("where a step's time goes (ms per batch, median; share of the step)")
    print(format_table(("model", "layout", "forward", "backward", "optimizer"), phase_rows,
                       align="llrrr"))


if __name__ == "__main__":
    main()
