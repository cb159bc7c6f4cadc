"""How far apart one measurement of a converted model's time is from the next, by three
figures a conversion could compare times by: the median of the repeats (what ``rootify
--latency``, ``--sensitivity`` and ``--frontier`` use), their minimum, or the mean of their
fastest quarter. nin (1x28x28, batch 128) and its root-2, root-4 and root-8 structures,
each timed side by side with the dense model in ``--sessions`` sessions one after another,
each session building its models afresh (as ``deeproots.conversion.sensitivity.model_ms``
does): the range of each figure over the sessions is how much a budget's verdict can move.

    python benchmarks/timing_estimators.py [--sessions 6] [--repeats 10]

Run it with nothing else on the machine (the share of the CPUs other processes held is
printed with each row).
"""
import argparse
import os
import statistics
import sys

HERE = os.path.abspath(__file__)
ESTIMATORS = {"median": statistics.median, "min": min,
              "fastest quarter": lambda s: statistics.mean(sorted(s)[:max(1, len(s) // 4)])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--repeats", type=int, default=10, help="as measure_latency's (10)")
    p.add_argument("--schedules", nargs="+", default=["root-2", "root-4", "root-8"])
    args = p.parse_args()
    from deeproots.runtime import use_fast_allocator

    use_fast_allocator(sys.argv[1:], "auto", script=HERE)  # as the commands run
    import torch

    import deeproots
    from deeproots.conversion.sensitivity import _folded
    from deeproots.speed.timing import interleaved
    from deeproots.text import format_table
    from conversion_search import _machine

    torch.manual_seed(0)
    dense = deeproots.create_model("nin", num_classes=10, in_channels=1).eval()
    x = torch.randn(128, 1, 28, 28)
    rows = []
    for schedule in args.schedules:
        model, _ = deeproots.rootify(dense, schedule, example_input=x[:1],
                                     init="block-diagonal")
        got = {name: [] for name in ESTIMATORS}
        others = []
        for _ in range(args.sessions):
            built = {"dense": _folded(dense, x), "converted": _folded(model, x)}
            t = interleaved({n: (lambda f=f: f(x)) for n, f in built.items()}, len(x),
                            repeats=args.repeats)
            others.append(t["dense"].others or 0.0)
            for name, figure in ESTIMATORS.items():
                got[name].append(figure(t["converted"].seconds) / figure(t["dense"].seconds))
        for name, values in got.items():
            rows.append([schedule, name, " ".join(f"{v:.3f}" for v in values),
                         f"{max(values) - min(values):.3f}", f"{statistics.pstdev(values):.3f}",
                         f"{100 * max(others):.1f}%"])
    print(f"## nin's time converted, as a fraction of the dense model's, in {args.sessions} "
          f"sessions of {args.repeats} repeats ({_machine()})\n")
    print(format_table(["schedule", "figure", "each session", "range", "sd", "others (max)"],
                       rows, align="llllrr"))


if __name__ == "__main__":
    main()
