"""Inference speed of root networks against issue #4's targets, measured side by side.

    python benchmarks/speed_targets.py [--paths fold openvino ...] [--threads 2] [--repeats 10]
                                       [--dtype float32|bfloat16]
    python benchmarks/speed_targets.py --device cuda [--dtype bfloat16] [--paths fold compile]

On the CPU (the default), for each path, NiN (orig and the 4 root variants, batch 128,
3x32x32) and ResNet-50 (orig and root-64, batch 16, 3x224x224) are timed in one process,
models taking turns. Run it through `deeproots bench`'s allocator by setting LD_PRELOAD
yourself, or compare with `deeproots bench ... --allocator system`. With `--device cuda`:
NiN, ResNet-50 (orig, root-64) and GoogLeNet (orig, root-16) at batch 256, channels-last,
against the GPU targets (bf16).
"""
import argparse

from deeproots.speed.bench import bench_models, format_bench
from deeproots.speed.deploy import available_paths

TARGETS = {("nin", "nin-root-8"): 1.9, ("nin", "nin-root-16"): 2.1,
           ("resnet50", "resnet50-root-64"): 1.7}
# GPU: bf16 inference at batch 256 (the paper's GPU speedups: 1.14x and 1.22x)
GPU_TARGETS = {("resnet50", "resnet50-root-64"): 1.5, ("googlenet", "googlenet-root-16"): 1.5}
NIN = ["nin", "nin-root-2", "nin-root-4", "nin-root-8", "nin-root-16"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", nargs="+",
                   default=[x for x in available_paths() if x not in ("eager", "compile")])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the targets are float32; bfloat16 shows what the opt-in gains")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: NiN, ResNet-50 and GoogLeNet at batch 256, the GPU targets")
    args = p.parse_args()
    if args.dtype == "bfloat16":
        args.paths = [x for x in args.paths if x != "onnxruntime"]  # runs float32 only
    targets = TARGETS
    groups = [(NIN, 128), (["resnet50", "resnet50-root-64"], 16)]
    if args.device == "cuda":
        args.paths = [x for x in args.paths if x not in ("onnxruntime", "openvino")] or ["fold"]
        targets = GPU_TARGETS
        groups = [(NIN, 256), (["resnet50", "resnet50-root-64"], 256),
                  (["googlenet", "googlenet-root-16"], 256)]
    best_gflops = 0.0
    verdicts = []
    for names, batch in groups:
        rows = bench_models(names, batch_size=batch, threads=args.threads, paths=args.paths,
                            repeats=args.repeats, warmup=3, dtype=args.dtype,
                            device=args.device)
        print(format_bench(rows), "\n", flush=True)
        for path in args.paths:
            by = {r.model: r for r in rows if r.path == path}
            for (a, b), target in targets.items():
                if a in by and b in by:
                    speedup = by[a].ms_per_image / by[b].ms_per_image
                    verdicts.append(f"{path:12s} {b:18s} {speedup:5.2f}x over {a} "
                                    f"(target {target}x): {'met' if speedup >= target else 'missed'}")
            if "nin" in by:
                best_gflops = max(best_gflops, by["nin"].gflops)
    print("\n".join(verdicts))
    if args.device == "cpu":
        print(f"best nin GFLOP/s: {best_gflops:.0f} (target 200): "
              f"{'met' if best_gflops >= 200 else 'missed'}")
    elif args.dtype != "bfloat16":
        print("(the GPU targets are for --dtype bfloat16)")


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # e.g. --device cuda on a machine without a GPU
        raise SystemExit(f"error: {err}")
