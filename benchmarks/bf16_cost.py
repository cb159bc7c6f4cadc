"""What bf16 inference costs in accuracy and gains in speed on this CPU, for trained checkpoints.

    python benchmarks/bf16_cost.py runs/nin/last.pt runs/nin-root-8/last.pt [--threads 2]
                                   [--path fold|script|openvino]

Each checkpoint's test split is classified by one inference path (default `fold`) in float32
and in bfloat16; speed is timed side by side on a batch of 128 test images.
"""
import argparse

import torch

from deeproots.speed.timing import interleaved
from deeproots.training.data import build_loaders
from deeproots.speed.deploy import build_path
from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--path", default="fold", choices=["fold", "script", "openvino"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"path {args.path}, {args.threads} threads")
    print(f"{'checkpoint':34s} {'top-1 f32':>9s} {'top-1 bf16':>10s} {'agree':>6s} "
          f"{'ms/img f32':>10s} {'bf16':>6s} {'speedup':>7s}")
    for path in args.checkpoints:
        state = load_checkpoint(path)
        model = model_from_checkpoint(state).eval()
        _, test, _ = build_loaders(state["config"]["data"], data_dir=state["config"]["data_dir"],
                                   batch_size=128, download_ok=False)
        x0, _ = next(iter(test.batches()))
        fast = {d: build_path(model, x0, args.path, d)
                for d in (torch.float32, torch.bfloat16)}
        hits = {d: 0 for d in fast}
        agree = n = 0
        for x, y in test.batches():
            preds = {d: f(x).argmax(1) for d, f in fast.items()}
            for d in fast:
                hits[d] += (preds[d] == y).sum().item()
            agree += (preds[torch.float32] == preds[torch.bfloat16]).sum().item()
            n += len(y)
        t = interleaved({str(d): (lambda f=f: f(x0)) for d, f in fast.items()}, len(x0), 7)
        f32, bf16 = t["torch.float32"].ms_per_image, t["torch.bfloat16"].ms_per_image
        print(f"{path:34s} {hits[torch.float32] / n:9.4f} {hits[torch.bfloat16] / n:10.4f} "
              f"{agree / n:6.4f} {f32:10.3f} {bf16:6.3f} {f32 / bf16:6.2f}x")


if __name__ == "__main__":
    main()
