"""Training throughput (images/s) of NiN variants on CPU, measured side by side in one run,
by `deeproots train`'s own step (deeproots.step.TrainStep).

    python benchmarks/train_throughput.py [--models nin nin-root-8] [--batch-size 128]
                                          [--threads 2] [--repeats 5]

Batches are real Fashion-MNIST images (1x28x28) when the dataset is found, random ones
otherwise; the models take turns (A, B, A, B, ...) so that both see the same machine.
"""
import argparse
import platform

import torch

import deeproots
from deeproots.bench import train_step_fn
from deeproots.timing import interleaved


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["nin", "nin-root-8"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        images, labels = deeproots.data.load_fashion_mnist(None, "train", download_ok=False)
        source = "Fashion-MNIST"
    except deeproots.data.DataError:
        images = torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8)
        labels = torch.randint(0, 10, (args.batch_size,))
        source = "random"
    x = deeproots.data.DATASETS["fashion-mnist"].spec.normalize(images[:args.batch_size])
    y = labels[:args.batch_size]
    models = {name: deeproots.create_model(name, in_channels=1, num_classes=10)
              for name in args.models}
    macs = {name: deeproots.profile(m, (1, 28, 28)).macs for name, m in models.items()}
    timings = interleaved({n: train_step_fn(m, x, y) for n, m in models.items()},
                          images=args.batch_size, repeats=args.repeats)
    first = args.models[0]
    print(f"training throughput, {source} 1x28x28, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}")
    print(f"{'model':14s} {'MMACs/img':>10s} {'img/s':>8s} {'spread':>7s} "
          f"{'speedup':>8s} {'ideal':>6s}")
    for name, t in timings.items():
        speedup = t.images_per_s / timings[first].images_per_s
        ideal = macs[first] / macs[name]
        print(f"{name:14s} {macs[name] / 1e6:10.1f} {t.images_per_s:8.1f} "
              f"{100 * t.spread:6.1f}% {speedup:7.2f}x {ideal:5.2f}x")


if __name__ == "__main__":
    main()
