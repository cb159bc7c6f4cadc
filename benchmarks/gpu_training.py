"""The GPU training targets, in one command: training throughput of orig and root networks
by deeproots train's own step (bf16 autocast, channels-last; eager, with the grouped-conv
dispatch, compiled, with CUDA graphs), the parts of a step (forward, backward, optimizer),
and every grouped conv layer's backward (cuDNN, deeproots' Triton kernels, block-diagonal
dense, split per group) against its roofline bound. Prints the device; the models of a pair
take turns in one process, each step timed with CUDA events after a synchronised warm-up.

    python benchmarks/gpu_training.py                     # H100/H200: the targets' table
    python benchmarks/gpu_training.py --device cpu --quick  # a smoke test on the CPU

Targets (issue: train root networks fast on GPUs): nin >= 60k img/s at batch 128 on
1x28x28 images; nin-root-8 >= 1.2x nin in the same step; resnet50-root-64 >= 1.1x resnet50
at batch 128, 224x224; every grouped layer's backward within 3x of its roofline bound.
"""
import argparse
import copy
import time

import torch
from torch.nn import functional as F

from deeproots.speed.bench import step_phases, train_step_fn
from deeproots.kernels.modules import _dense_weight, _time_ms
from deeproots.models.layers import grouped_convs
from deeproots.models.registry import create_model
from deeproots.speed.roofline import machine
from deeproots.speed.timing import interleaved

# (orig, root, target speedup, batch, input size, classes)
PAIRS = [("nin", "nin-root-8", 1.2, 128, (1, 28, 28), 10),
         ("resnet50", "resnet50-root-64", 1.1, 128, (3, 224, 224), 1000)]
# (label, TrainStep options); each pair is timed in every one
STEPS = [("eager", {}), ("eager+dispatch", {"grouped_conv": "dispatch"}),
         ("compile", {"compile": "default"}), ("cudagraphs", {"compile": "reduce-overhead"})]
NIN_TARGET = 60_000  # img/s


def step_table(pair, device, steps, repeats, detail):
    """img/s of each model of ``pair`` in each step variant, side by side; returns verdicts."""
    orig, root, target, batch, size, classes = pair
    torch.manual_seed(0)
    models = {n: create_model(n, in_channels=size[0], num_classes=classes).to(device)
              for n in (orig, root)}
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    print(f"\n{orig} vs {root}: training step, batch {batch}, {'x'.join(map(str, size))}, "
          f"{'bf16 autocast, channels-last' if device.type == 'cuda' else 'float32'}")
    print(f"{'step':16s} {'model':18s} {'img/s':>9s} {'spread':>7s} {'speedup':>8s} "
          f"{'first step s':>12s}  fwd / bwd / opt ms")
    verdicts = []
    for label, options in steps:
        if device.type != "cuda" and options.get("grouped_conv") == "dispatch":
            continue  # the Triton candidates need a GPU
        try:
            work = {n: train_step_fn(copy.deepcopy(m), x, y, lr=0.01, **options)
                    for n, m in models.items()}
            first = {}
            for n, w in work.items():  # the first step compiles (or measures the dispatch)
                t0 = time.perf_counter()
                w()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first[n] = time.perf_counter() - t0
            t = interleaved(work, batch, repeats, warmup=3, cuda=device.type == "cuda")
        except Exception as err:  # one variant failing must not lose the others' figures
            print(f"{label:16s} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        phases = step_phases({n: w.step for n, w in work.items()}, x, y, repeats) \
            if detail else {}
        for n in (orig, root):
            parts = " / ".join(f"{ms:.2f}" for ms in phases.get(n, {}).values())
            speedup = t[n].images_per_s / t[orig].images_per_s
            print(f"{label:16s} {n:18s} {t[n].images_per_s:9.0f} {100 * t[n].spread:6.0f}% "
                  f"{speedup:7.2f}x {first[n]:12.1f}  {parts}", flush=True)
            if work[n].step.fallbacks:
                print(f"{'':16s} left to PyTorch: {'; '.join(work[n].step.fallbacks)}")
        speedup = t[root].images_per_s / t[orig].images_per_s
        verdicts.append(f"{label:16s} {root:18s} {speedup:5.2f}x over {orig} (target {target}x)"
                        f": {'met' if speedup >= target else 'missed'}")
        if orig == "nin":
            rate = t[orig].images_per_s
            verdicts.append(f"{label:16s} nin {rate:9.0f} img/s (target {NIN_TARGET}): "
                            f"{'met' if rate >= NIN_TARGET else 'missed'}")
    return verdicts


def backward_lowerings(conv):
    """Each way to compute a grouped conv's input and weight gradients: fn(x, w, dy)."""
    args = (conv.stride, conv.padding, conv.dilation)
    g = conv.groups

    def native(x, w, dy):
        return torch.ops.aten.convolution_backward(dy, x, w, None, *args, False, [0, 0], g,
                                                   [True, True, False])[:2]

    def dense(x, w, dy):
        dense_w = _dense_weight(conv, w)
        gx, gw, _ = torch.ops.aten.convolution_backward(dy, x, dense_w, None, *args, False,
                                                        [0, 0], 1, [True, True, False])
        return gx, gw  # (the block-diagonal part is the grouped weight's gradient)

    def split(x, w, dy):
        per, out = conv.in_channels // g, conv.out_channels // g
        grads = [torch.ops.aten.convolution_backward(
            dy[:, i * out:(i + 1) * out], x[:, i * per:(i + 1) * per], w[i * out:(i + 1) * out],
            None, *args, False, [0, 0], 1, [True, True, False])[:2] for i in range(g)]
        return torch.cat([a for a, _ in grads], 1), torch.cat([b for _, b in grads], 0)

    out = {"native": native, "dense": dense, "split": split}
    if conv.weight.is_cuda:
        from deeproots.kernels.grouped_conv_grad import conv2d_input_grad, conv2d_weight_grad

        def triton(x, w, dy):
            s, p, d = ((v, v) if isinstance(v, int) else tuple(v) for v in args)
            return (conv2d_input_grad(dy, w, x.shape, s, p, d, g),
                    conv2d_weight_grad(x, dy, w.shape, s, p, d, g))

        out["triton"] = triton
    return out


def backward_table(name, batch, size, device, hw, repeats):
    """Every distinct grouped layer's backward pass, each lowering against the bound."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = "bfloat16" if device.type == "cuda" else "float32"
    peak, bw, nbytes = hw.peak_flops[key], hw.bandwidth, torch.finfo(dtype).bits // 8
    model = create_model(name, in_channels=size[0]).eval()
    print(f"\n{name}: grouped conv backward (input + weight gradients), batch {batch}, {key}, "
          f"channels-last; us per batch, fraction of the roofline bound")
    lows = ("native", "triton", "dense", "split")
    print(f"{'layer':24s} {'shape':28s} {'bound':>7s}" + "".join(f" {k:>13s}" for k in lows)
          + "  best   within 3x")
    seen, verdicts = set(), []
    for layer, conv, shape in grouped_convs(model, torch.zeros(1, *size)):
        sig = (shape, conv.out_channels, conv.kernel_size, conv.stride, conv.groups)
        if sig in seen:
            continue
        seen.add(sig)
        conv = copy.deepcopy(conv).to(device, dtype)
        x = torch.randn(batch, *shape, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            dy = torch.randn_like(F.conv2d(x, conv.weight, None, conv.stride, conv.padding,
                                           conv.dilation, conv.groups))
        macs = dy.numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * \
            conv.kernel_size[1]
        # unfused: input grad reads dy and w, writes dx; weight grad reads dy and x, writes dw
        moved = (2 * dy.numel() + 2 * x.numel() + 2 * conv.weight.numel()) * nbytes
        bound = max(2 * 2 * macs / peak, moved / bw)
        w = conv.weight.detach()
        ms = {}
        for k, fn in backward_lowerings(conv).items():
            try:
                ms[k] = _time_ms(lambda fn=fn: fn(x, w, dy), device.type == "cuda",
                                 repeats=repeats)
            except Exception as err:  # noqa: BLE001  (report, keep the others)
                print(f"  {layer} {k}: failed ({type(err).__name__}: {str(err)[:120]})")
        cells = "".join(f" {1e3 * ms[k]:7.0f} {1e3 * bound / ms[k]:4.0%}" if k in ms
                        else f" {'-':>13s}" for k in lows)
        best = min(ms, key=ms.get)
        desc = (f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x"
                f"{conv.kernel_size[1]}/{conv.stride[0]} g{conv.groups} {shape[1]}x{shape[2]}")
        ok = ms[best] <= 3e3 * bound
        print(f"{layer:24s} {desc:28s} {1e6 * bound:7.0f}{cells}  {best:6s} "
              f"{'yes' if ok else 'NO'}", flush=True)
        verdicts.append(ok)
    return (f"{name}: {sum(verdicts)} of {len(verdicts)} grouped layers' backward within 3x "
            f"of the roofline bound")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--steps", nargs="+", default=[s for s, _ in STEPS],
                   choices=[s for s, _ in STEPS])
    p.add_argument("--quick", action="store_true",
                   help="NiN only, batch 16, few repeats: a smoke test")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--detail", action="store_true", help="also the parts of a step")
    args = p.parse_args()
    device = torch.device(args.device)
    hw, where = machine(args.device)
    print(where)
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed: no Triton candidates")
    pairs = PAIRS[:1] if args.quick else PAIRS
    if args.quick:
        pairs = [(*pairs[0][:3], 16, *pairs[0][4:])]
    repeats = 3 if args.quick else args.repeats
    steps = [s for s in STEPS if s[0] in args.steps]
    verdicts = []
    for pair in pairs:
        verdicts += step_table(pair, device, steps, repeats, args.detail)
        if not args.skip_layers:
            verdicts.append(backward_table(pair[1], pair[3], pair[4], device, hw, repeats))
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
