"""The Triton grouped/depthwise conv against F.conv2d (and its gradients), on every distinct
grouped-layer shape of the registered models; under TRITON_INTERPRET=1 on a CPU. Then the
modules that put it, and the measured dispatch, into models."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deeproots
from helpers import trained_like

triton = pytest.importorskip("triton")
from deeproots.kernels import _common as C  # noqa: E402
from deeproots.kernels import grouped_conv as K  # noqa: E402
from deeproots.kernels import modules as M  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3,  # TF32 on a GPU
       torch.float16: 2e-3, torch.bfloat16: 2e-2}  # of max |reference|


def _registered_shapes():
    shapes = set()
    for name in deeproots.list_models():
        with torch.device("meta"):
            model = deeproots.create_model(name)
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                shapes.add((m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                            m.padding[0], m.groups))
    return sorted(shapes)


SHAPES = _registered_shapes()
SHAPE_IDS = [f"{c}-{o}-k{k}-s{s}-g{g}" for c, o, k, s, _, g in SHAPES]


def _check(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, dtype=torch.float32):
    x, w = x.to(DEVICE, dtype), w.to(DEVICE, dtype)
    b = b.to(DEVICE, dtype) if b is not None else None
    y = K.grouped_conv2d(x, w, b, stride, padding, dilation, groups)
    ref = F.conv2d(x.float(), w.float(), b.float() if b is not None else None, stride, padding,
                   dilation, groups)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item() + 1e-5, (err, ref.abs().max().item())


def test_the_registered_models_have_many_grouped_shapes():
    assert len(SHAPES) > 50 and any(g == c for c, _, _, _, _, g in SHAPES)  # depthwise too


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_every_grouped_shape_of_the_registered_models(shape):
    cin, cout, k, stride, padding, groups = shape
    x = torch.randn(1, cin, 6, 6).contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(cout, cin // groups, k, k), None, stride, padding, 1, groups)


@pytest.mark.gpu_quick
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 192, 5, 1, 2, 8), (192, 192, 3, 1, 1, 32),
                                   (64, 64, 3, 1, 1, 64), (16, 48, 5, 1, 2, 4),
                                   (128, 128, 3, 2, 1, 16)])
def test_half_precision(shape, dtype):
    cin, cout, k, stride, padding, groups = shape
    x = torch.randn(2, cin, 7, 7).contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(cout, cin // groups, k, k), torch.randn(cout), stride, padding, 1,
           groups, dtype)


ODD_CASES = [
    dict(c=12, o=24, k=3, s=2, p=0, d=1, g=3, h=9, w=7),     # odd sizes, stride 2, no pad
    dict(c=16, o=16, k=3, s=1, p=2, d=2, g=4, h=8, w=8),     # dilation
    dict(c=8, o=16, k=3, s=1, p=1, d=1, g=8, h=5, w=6),      # depthwise, multiplier 2
    dict(c=8, o=8, k=5, s=2, p=2, d=1, g=4, h=11, w=11),     # 2 channels a group
    dict(c=40, o=48, k=1, s=1, p=0, d=1, g=2, h=4, w=4),     # grouped 1x1
    dict(c=6, o=6, k=3, s=1, p=1, d=1, g=1, h=4, w=4),       # ungrouped, few channels
    dict(c=16, o=8, k=3, s=3, p=1, d=1, g=2, h=10, w=8),     # stride 3: gaps in the input
]


@pytest.mark.gpu_quick
@pytest.mark.parametrize("case", ODD_CASES)
def test_strides_padding_dilation_bias(case):
    x = torch.randn(2, case["c"], case["h"], case["w"]).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(case["o"], case["c"] // case["g"], case["k"], case["k"])
    _check(x, w, torch.randn(case["o"]), case["s"], case["p"], case["d"], case["g"])


def test_contiguous_and_strided_inputs():
    w = torch.randn(32, 4, 3, 3)
    _check(torch.randn(2, 32, 8, 8), w, None, 1, 1, 1, 8)  # NCHW
    base = torch.randn(2, 32, 10, 12).contiguous(memory_format=torch.channels_last)
    _check(base[:, :, 1:9, 2:11], w, None, 1, 1, 1, 8)  # a strided view, not contiguous


@pytest.mark.gpu_quick
def test_small_tiles_cover_every_edge(monkeypatch):
    """Blocks much smaller than the problem: several pixel, channel and reduction tiles,
    each with a ragged edge."""
    monkeypatch.setattr(K, "INTERPRET_GEMM", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    monkeypatch.setattr(K, "INTERPRET_DEPTHWISE", {"BLOCK_P": 16, "BLOCK_C": 16})
    x = torch.randn(2, 80, 5, 7).contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(72, 40, 3, 3), torch.randn(72), 1, 1, 1, 2)  # 40 -> 36 per group
    _check(x, torch.randn(80, 1, 3, 3), None, 1, 1, 1, 80)


def _check_grads(x, w, b=None, stride=1, padding=0, dilation=1, groups=1,
                 dtype=torch.float32):
    """The Triton backward (input, weight and bias gradients) against F.conv2d's, computed in
    float32 from the same rounded tensors; tolerance per dtype, of the largest reference."""
    x = x.to(DEVICE, dtype).requires_grad_()
    w = w.to(DEVICE, dtype).requires_grad_()
    b = b.to(DEVICE, dtype).requires_grad_() if b is not None else None
    y = K.GroupedConv2dFunction.apply(x, w, b, stride, padding, dilation, groups)
    g = torch.randn(y.shape, device=DEVICE).to(dtype)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv2d(ref_in[0], ref_in[1], ref_in[2] if b is not None else None, stride,
                   padding, dilation, groups)
    want = torch.autograd.grad(ref, ref_in, g.float())
    for name, a, r in zip("xwb", got, want):
        assert a.shape == r.shape and a.dtype == dtype, name
        err = (a.float() - r).abs().max().item()
        assert err <= TOL[dtype] * r.abs().max().item() + 1e-5, (name, err)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gradients_of_every_grouped_shape_of_the_registered_models(shape):
    cin, cout, k, stride, padding, groups = shape
    x = torch.randn(1, cin, 5, 5).contiguous(memory_format=torch.channels_last)
    _check_grads(x, torch.randn(cout, cin // groups, k, k), None, stride, padding, 1, groups)


@pytest.mark.gpu_quick
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 192, 5, 1, 2, 8), (64, 64, 3, 1, 1, 64),
                                   (128, 128, 3, 2, 1, 16)])
def test_gradients_in_half_precision(shape, dtype):
    cin, cout, k, stride, padding, groups = shape
    x = torch.randn(2, cin, 6, 6).contiguous(memory_format=torch.channels_last)
    _check_grads(x, torch.randn(cout, cin // groups, k, k), torch.randn(cout), stride,
                 padding, 1, groups, dtype)


@pytest.mark.gpu_quick
@pytest.mark.parametrize("case", ODD_CASES)
def test_gradients_with_strides_padding_dilation_bias(case):
    x = torch.randn(2, case["c"], case["h"], case["w"]).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(case["o"], case["c"] // case["g"], case["k"], case["k"])
    _check_grads(x, w, torch.randn(case["o"]), case["s"], case["p"], case["d"], case["g"])


@pytest.mark.gpu_quick
def test_gradients_of_contiguous_inputs_and_many_small_tiles(monkeypatch):
    """NCHW input; blocks much smaller than the problem, so every kernel has several tiles
    with ragged edges; the weight gradient summed over several slices of the pixels."""
    from deeproots.kernels import grouped_conv_grad as G

    monkeypatch.setattr(G, "INTERPRET_INPUT_GEMM", {"BLOCK_M": 16, "BLOCK_N": 16,
                                                    "BLOCK_K": 16})
    monkeypatch.setattr(G, "INTERPRET_INPUT_DIRECT", {"BLOCK_P": 16, "BLOCK_C": 16})
    monkeypatch.setattr(G, "INTERPRET_WEIGHT_GEMM", {"BLOCK_M": 16, "BLOCK_N": 16,
                                                     "BLOCK_K": 16})
    monkeypatch.setattr(G, "INTERPRET_WEIGHT_DIRECT", {"BLOCK_P": 16, "BLOCK_C": 16})
    monkeypatch.setattr(G, "PIXEL_STEP", 16)
    monkeypatch.setattr(G, "weight_grad_splits", lambda pixels, programs: 3)
    x = torch.randn(2, 80, 5, 7)  # NCHW
    _check_grads(x, torch.randn(72, 40, 3, 3), torch.randn(72), 1, 1, 1, 2)
    _check_grads(x, torch.randn(80, 1, 3, 3), None, 1, 1, 1, 80)


@pytest.mark.gpu_quick
def test_the_weight_gradient_is_the_same_on_every_run():
    """Slices of the pixels are summed in a fixed order, not by atomics: with one
    configuration, the same inputs give the same gradient bit for bit."""
    from deeproots.kernels.grouped_conv_grad import conv2d_weight_grad

    x = torch.randn(4, 32, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 32, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    a = conv2d_weight_grad(x, g, (32, 8, 3, 3), (1, 1), (1, 1), (1, 1), 4)
    assert torch.equal(a, conv2d_weight_grad(x, g, (32, 8, 3, 3), (1, 1), (1, 1), (1, 1), 4))


@pytest.mark.gpu_quick
def test_the_triton_module_trains_under_autocast():
    """Under autocast the Triton module computes in the autocast dtype, as F.conv2d does, and
    the float32 parameters get float32 gradients close to the native layer's."""
    conv = nn.Conv2d(16, 32, 3, padding=1, groups=4).to(DEVICE)
    layer = M.TritonConv2d(conv)
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        ref = conv(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert (y.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    y.float().square().sum().backward()
    got = conv.weight.grad.clone()
    conv.weight.grad = None
    ref.float().square().sum().backward()
    assert got.dtype == torch.float32
    assert (got - conv.weight.grad).abs().max() <= 3e-2 * conv.weight.grad.abs().max()


@pytest.mark.gpu_quick
def test_bad_input(monkeypatch):
    x, w = torch.randn(1, 8, 4, 4, device=DEVICE), torch.randn(8, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="takes bfloat16, float16 or float32.*torch.float64"):
        K.grouped_conv2d(x.double(), w.double(), groups=4)
    with pytest.raises(ValueError, match="groups 3 must divide the 8 input and 8 output"):
        K.grouped_conv2d(x, w, groups=3)
    with pytest.raises(ValueError, match=r"takes a 4-d input \(N, C, H, W\)"):
        K.grouped_conv2d(x[0], w, groups=4)
    with pytest.raises(ValueError, match="stride must be a whole number >= 1"):
        K.grouped_conv2d(x, w, stride=0, groups=4)
    with pytest.raises(ValueError, match="leaves no output on a 4x4 input"):
        K.grouped_conv2d(x, torch.randn(8, 2, 7, 7, device=DEVICE), groups=4)
    monkeypatch.setattr(C, "INTERPRET", False)
    with pytest.raises(ValueError, match="runs on CUDA GPUs; got an input on cpu"):
        K.grouped_conv2d(x.cpu(), w.cpu(), groups=4)


@pytest.mark.gpu_quick
def test_the_triton_path_matches_the_model_and_says_what_it_left():
    from deeproots.speed.deploy import build_path

    model = trained_like("nin-root-8").to(DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    fast = build_path(model, x, "triton")
    with torch.no_grad():
        ref = model(x)
    assert (fast(x) - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()
    assert fast.fallbacks == []
    odd = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, padding_mode="reflect"))
    _, kept = M.replace_convs(odd, M.TritonConv2d)
    assert kept == ["0: the Triton conv cannot run this layer: padding_mode 'reflect' (the "
                    "kernel pads with zeros)"]


def test_every_lowering_computes_the_conv_and_its_gradients():
    conv = nn.Conv2d(12, 24, 3, padding=1, groups=4)
    x = torch.randn(2, 12, 6, 6, requires_grad=True)
    ref = conv(x)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    options = M.lowerings(conv, torch.device("cpu"))
    # triton only on a GPU; inductor: F.conv2d compiled with max-autotune
    assert set(options) == {"native", "dense", "split", "inductor"}
    for name, fn in options.items():
        y = fn(conv, x, conv.weight, conv.bias)
        assert torch.allclose(y, ref, atol=1e-5), name
        got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-4), name


def test_the_dispatch_measures_inductor_only_when_asked(monkeypatch):
    M.dispatch_cache().clear()
    timed = _fake_clock(monkeypatch, {"native": 3.0, "dense": 2.0, "split": 4.0,
                                      "inductor": 1.0})
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        M.DispatchConv2d(conv)(x)
        assert sorted(timed) == ["dense", "native", "split"]  # DEFAULT_LOWERINGS
        timed.clear()
        M.dispatch_cache().clear()
        layer = M.DispatchConv2d(conv, choices=M.LOWERINGS)
        assert (layer(x) - conv(x)).abs().max() <= 1e-5
    assert sorted(timed) == ["dense", "inductor", "native", "split"]
    assert list(layer.chosen.values()) == ["inductor"]
    with pytest.raises(ValueError, match=r"dispatch choices must be among native, triton, "
                                         r"dense, split, inductor; got \['cudnn'\]"):
        M.DispatchConv2d(conv, choices=["cudnn"])


def test_a_layer_with_other_padding_has_only_the_native_lowering():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect")
    assert set(M.lowerings(conv, torch.device("cpu"))) == {"native"}
    layer = M.DispatchConv2d(conv)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(layer(x), conv(x))


def _fake_clock(monkeypatch, clock):
    timed = []

    def fake_timer(call, cuda, name="", **kwargs):
        call()  # the real call runs, forward (and backward when training)
        timed.append(name)
        return clock[name]

    monkeypatch.setattr(M.DispatchConv2d, "timer", staticmethod(fake_timer))
    return timed


def test_dispatch_takes_the_fastest_measured_and_remembers(monkeypatch):
    M.dispatch_cache().clear()
    timed = _fake_clock(monkeypatch, {"native": 3.0, "dense": 1.0, "split": 2.0})
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    layer = M.DispatchConv2d(conv)
    assert layer.weight is conv.weight and list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-5)
        assert list(layer.chosen.values()) == ["dense"] and sorted(timed) == sorted(
            ["native", "dense", "split"])
        layer(x)
    assert len(timed) == 3  # measured once per shape


def test_dispatch_in_training_times_forward_and_backward_on_copies(monkeypatch):
    """The timing passes run backward on copies: the layer's gradients are those of one
    forward and backward, whichever lowering won."""
    M.dispatch_cache().clear()
    timed = _fake_clock(monkeypatch, {"native": 2.0, "dense": 3.0, "split": 1.0})
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    layer = M.DispatchConv2d(conv)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert list(layer.chosen) and next(iter(layer.chosen))[3] is True  # a training key
    assert list(layer.chosen.values()) == ["split"] and len(timed) == 3
    twin = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    twin.load_state_dict(conv.state_dict())
    x2 = x.detach().requires_grad_()
    twin(x2).square().sum().backward()
    assert torch.allclose(conv.weight.grad, twin.weight.grad, atol=1e-4)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    with torch.no_grad():
        layer(x)  # inference is a key of its own
    assert len(timed) == 6


def test_use_grouped_conv_keeps_the_parameters_and_their_names():
    model = trained_like("nin-root-8")
    names = list(model.state_dict())
    kept = M.use_grouped_conv(model, "dispatch")
    assert kept == [] and list(model.state_dict()) == names
    assert isinstance(model.conv2a.conv, M.DispatchConv2d)
    from deeproots.models.layers import conv_layers

    assert conv_layers(model)["conv2a"].groups == 8  # the tools see the same grouped layer
    with pytest.raises(ValueError, match=r"grouped convs run by one of triton, dispatch here "
                                         r"\(of auto, native, triton, dispatch\); got 'cudnn'"):
        M.use_grouped_conv(model, "cudnn")


def test_the_dispatch_path_matches_the_model():
    from deeproots.speed.deploy import build_path

    model = trained_like("resnet50-root-64")
    x = torch.randn(1, 3, 64, 64)
    fast = build_path(model, x, "dispatch")
    assert fast.notes == []  # nothing measured yet
    with torch.no_grad():
        ref = model(x)
    assert (fast(x) - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6
    # each of the 16 grouped convs by one lowering; the line counts them
    counts = [int(part.split("(")[1].rstrip(")"))
              for part in fast.notes[0].removeprefix("dispatch ran grouped convs by ").split(", ")]
    assert len(fast.notes) == 1 and sum(counts) == 16


# run in a fresh process without TRITON_INTERPRET: there the kernels are compiled, not
# interpreted; one launch of each of the eight kernels, at layers of the registered models,
# in bf16 and in fp32 (fp16 moves the bytes bf16 does), and ResNet-50's ungrouped
# 256 -> 256 -> 1024 block that the fused path takes; every configuration each launch may
# try (its prune rules applied)
HOPPER_CHECK = """
import json, torch
from deeproots.kernels import fused_root as R, grouped_conv as G, grouped_conv_grad as GG
from deeproots.kernels.resources import configs, kernel_resources, recorded

def launches():
    with recorded() as out:
        for dtype in (torch.bfloat16, torch.float32):
            cl = lambda *s: torch.randn(*s, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            w = lambda *s: torch.randn(*s, dtype=dtype)
            for x, wt, dy, pad, g in [(cl(2, 96, 8, 8), w(192, 12, 5, 5), cl(2, 192, 8, 8), 2, 8),
                                      (cl(2, 64, 8, 8), w(64, 1, 3, 3), cl(2, 64, 8, 8), 1, 64)]:
                G.grouped_conv2d(x, wt, None, 1, pad, 1, g)
                GG.conv2d_input_grad(dy, wt, x.shape, (1, 1), (pad, pad), (1, 1), g)
                GG.conv2d_weight_grad(x, dy, wt.shape, (1, 1), (pad, pad), (1, 1), g)
                c3 = 160 if g == 8 else 256
                R.fused_root_conv(x, wt, None, w(c3, wt.shape[0], 1, 1), None, 1, pad, 1, g,
                                  cl(2, c3, 8, 8), True)
            R.fused_root_conv(cl(2, 256, 8, 8), w(256, 256, 3, 3), None, w(1024, 256, 1, 1),
                              None, 1, 1, 1, 1, cl(2, 1024, 8, 8), True)
    return out

found = []
for name, a, k in launches():
    dtype = "fp32" if a[0].dtype == torch.float32 else "bf16"
    found.append((name, dtype, [vars(kernel_resources(name, a, k, c))
                                for c in configs(name, a, k)]))
print(json.dumps(found))
"""


def test_every_kernel_compiles_for_hopper_without_spilling():
    """Each kernel with each configuration its launch may try, compiled ahead of time for
    sm_90a (no GPU needed), in bf16 and fp32: no register spilled to local memory, no block
    asking for more than the 227 KB of shared memory a Hopper block may have, the matrix
    multiplies on the tensor cores as wgmma, and vector loads."""
    import json
    import os
    import subprocess
    import sys

    from deeproots.kernels.resources import KERNELS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", HOPPER_CHECK], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert {name for name, _, _ in found} == set(KERNELS)
    assert {dtype for _, dtype, _ in found} == {"bf16", "fp32"}
    for name, dtype, per_config in found:
        assert per_config, (name, dtype)
        for r in per_config:
            assert r["stack_bytes"] == 0 and r["registers"] <= 255, (name, dtype, r)
            assert r["shared_bytes"] <= 227 * 1024, (name, dtype, r)
    firsts = {(name, dtype): per_config[0] for name, dtype, per_config in found}
    for name in ("_conv_gemm", "_input_grad_gemm", "_root_block_gemm", "_root_block_direct"):
        assert firsts[name, "bf16"]["wgmma"] > 0, (name, firsts[name, "bf16"])
    # the input tiles move in 8- or 16-byte vectors, even at NiN's 12 channels per group
    # (json keys are strings)
    for (name, dtype), r in firsts.items():
        if dtype == "bf16":
            assert int(max(r["loads"], key=int)) >= 8, (name, r)
