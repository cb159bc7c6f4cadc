"""Why resnet50's deepest stage does not add up (docs/conversion.md, "Measured: searched
schedules against uniform ones"): one conv of a trained model grouped and refit in closed
form, as its price is (``deeproots.conversion.sensitivity``), then its batch norms left as
they were, all re-estimated on the calibration images (as the calibrated conversion does),
or only the one after it; and how far the conv's input moves between eval mode and the
train mode a re-estimation runs in. Then whole conversions (``--schedules``) with the batch
norms kept (the default) and re-estimated (``--batchnorm reestimate``). Top-1 on the first
2,000 test images.

    python benchmarks/batchnorm_drift.py RUN/best.pt --layer layer4.0.conv2 --groups 2 \
        --schedules root-8 root-16
"""
import argparse
import copy
import sys

import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--layer", default="layer4.0.conv2")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--schedules", nargs="*", default=["root-8", "root-16"],
                   help="whole conversions, batch norms kept and re-estimated")
    args = p.parse_args()
    from deeproots.capture import capture
    from deeproots.conversion import sensitivity as S
    from deeproots.conversion.calibrate.assignment import assign_groups
    from deeproots.conversion.calibrate.batchnorm import reestimate_batchnorm
    from deeproots.conversion.calibrate.passes import calibration_batches, norm_after
    from deeproots.conversion.calibrate.sites import root_sites
    from deeproots.conversion.checkpoint import open_source
    from deeproots.conversion.rule import groupable
    from deeproots.layout import channels_last
    from deeproots.models.layers import conv_layers
    from deeproots.training.evaluate import evaluate

    src = open_source(args.checkpoint, eval_images=args.eval_images)
    model, cal = copy.deepcopy(src.trained).eval(), src.cal
    fit = [channels_last(b) for b in calibration_batches(cal.fit)]
    _, layers = groupable(model, fit[0][:1])
    site = next((s for s in layers if s.name == args.layer), None)
    if site is None:
        sys.exit(f"{args.layer} is not a conv the rule groups in {args.checkpoint}")
    convs = conv_layers(model)
    conv = convs[args.layer]
    eq = S._equations(model, convs, [site], fit)[args.layer]
    fixed = root_sites(model, [args.layer])[args.layer]
    norm = norm_after(model, conv, fit[0][:1])
    rows, cols, _ = assign_groups(eq.score(), args.groups, fix_rows=fixed.consumer is None,
                                  fix_cols=fixed.producer is None)
    weight, const, _ = eq.refit(rows, cols, args.groups, True)
    with S._installed(conv, norm, weight, const):
        refit = copy.deepcopy(model)

    def top1(m):
        return evaluate(m.eval(), cal.test_subset).top1

    def reestimated(only=None):
        m = copy.deepcopy(refit)
        norms = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
        keep = [] if only is None else [x for x in norms if x is not only(m)]
        reestimate_batchnorm(m, fit, keep=keep)
        return m

    def after(m):
        return norm_after(m, conv_layers(m)[args.layer], fit[0][:1])

    def conv_input(m, train):
        m.train(train)
        with capture({"c": conv_layers(m)[args.layer]}, "input") as xs, torch.no_grad():
            m(fit[0])
        m.eval()
        return xs["c"]

    x_eval, x_train = conv_input(copy.deepcopy(model), False), conv_input(copy.deepcopy(model),
                                                                         True)
    print(f"{args.checkpoint}, {args.layer} at {args.groups} groups; top-1 on "
          f"{args.eval_images} test images")
    print(f"dense                                        {top1(model):.4f}")
    print(f"refit, batch norms as they were (its price)  {top1(refit):.4f}")
    print(f"refit, every batch norm re-estimated         {top1(reestimated()):.4f}")
    print(f"refit, only the batch norm after it          {top1(reestimated(after)):.4f}")
    move = float((x_train - x_eval).norm() / x_eval.norm())
    print(f"its input, train mode against eval mode: {100 * move:.0f}% apart (relative norm)")
    if args.schedules:
        from deeproots.config import BATCHNORMS
        from deeproots.conversion.rule import rootify
        from deeproots.text import format_table
        rows = []
        for schedule in args.schedules:
            row = [schedule]
            for how in BATCHNORMS:
                new, report = rootify(model, schedule, example_input=cal.fit[:1],
                                      calibration=cal.fit, batchnorm=how)
                row += [f"{top1(new):.4f}", f"{report.calibration.seconds:.0f} s"]
                print(f"... {schedule}, batch norms {how}: {row[-2]}", flush=True)
            rows.append(row)
        print(format_table(("schedule", "kept: top-1", "time", "re-estimated: top-1", "time"),
                           rows, align="lrrrr"))


if __name__ == "__main__":
    main()
