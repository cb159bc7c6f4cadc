"""Start-up time of the command line against `import torch`, measured side by side in one
run (median of several fresh processes each). Prints seconds and the overhead over torch.

    python benchmarks/startup.py [--repeats 5]
"""
import argparse
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "deeproots --help": [sys.executable, "-m", "deeproots", "--help"],
    "deeproots train --help": [sys.executable, "-m", "deeproots", "train", "--help"],
    "deeproots list": [sys.executable, "-m", "deeproots", "list"],
    "deeproots table nin": [sys.executable, "-m", "deeproots", "table", "nin"],
    "deeproots profile resnet50": [sys.executable, "-m", "deeproots", "profile", "resnet50"],
}
# the targets of the restructuring issue: seconds over `import torch` (help: absolute)
TARGETS = {"deeproots --help": ("abs", 0.5), "deeproots train --help": ("abs", 0.5),
           "deeproots list": ("over", 0.3), "deeproots table nin": ("over", 1.5),
           "deeproots profile resnet50": ("over", 1.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    seconds = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved, so drift hits every command alike
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    torch_s = median["python -c 'import torch'"]
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"median of {args.repeats} fresh processes")
    print(f"{'command':28s} {'seconds':>8s} {'over torch':>11s}  target")
    for name, s in median.items():
        kind, bound = TARGETS.get(name, ("", None))
        value = s if kind == "abs" else s - torch_s
        verdict = "" if bound is None else (
            f"{'<' if kind == 'abs' else 'torch +'} {bound} s: "
            f"{'met' if value <= bound else 'missed'}")
        print(f"{name:28s} {s:8.2f} {s - torch_s:+11.2f}  {verdict}")


if __name__ == "__main__":
    main()
