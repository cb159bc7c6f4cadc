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
from deeproots.kernels import grouped_conv as K  # noqa: E402
from deeproots.kernels import modules as M  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # of max |reference|


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


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{c}-{o}-k{k}-s{s}-g{g}"
                                               for c, o, k, s, _, g in SHAPES])
def test_every_grouped_shape_of_the_registered_models(shape):
    cin, cout, k, stride, padding, groups = shape
    x = torch.randn(1, cin, 6, 6).contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(cout, cin // groups, k, k), None, stride, padding, 1, groups)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 192, 5, 1, 2, 8), (192, 192, 3, 1, 1, 32),
                                   (64, 64, 3, 1, 1, 64), (16, 48, 5, 1, 2, 4),
                                   (128, 128, 3, 2, 1, 16)])
def test_half_precision(shape, dtype):
    cin, cout, k, stride, padding, groups = shape
    x = torch.randn(2, cin, 7, 7).contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(cout, cin // groups, k, k), torch.randn(cout), stride, padding, 1,
           groups, dtype)


@pytest.mark.parametrize("case", [
    dict(c=12, o=24, k=3, s=2, p=0, d=1, g=3, h=9, w=7),     # odd sizes, stride 2, no pad
    dict(c=16, o=16, k=3, s=1, p=2, d=2, g=4, h=8, w=8),     # dilation
    dict(c=8, o=16, k=3, s=1, p=1, d=1, g=8, h=5, w=6),      # depthwise, multiplier 2
    dict(c=8, o=8, k=5, s=2, p=2, d=1, g=4, h=11, w=11),     # 2 channels a group
    dict(c=40, o=48, k=1, s=1, p=0, d=1, g=2, h=4, w=4),     # grouped 1x1
    dict(c=6, o=6, k=3, s=1, p=1, d=1, g=1, h=4, w=4),       # ungrouped, few channels
])
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


def test_small_tiles_cover_every_edge(monkeypatch):
    """Blocks much smaller than the problem: several pixel, channel and reduction tiles,
    each with a ragged edge."""
    monkeypatch.setattr(K, "INTERPRET_GEMM", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    monkeypatch.setattr(K, "INTERPRET_DEPTHWISE", {"BLOCK_P": 16, "BLOCK_C": 16})
    x = torch.randn(2, 80, 5, 7).contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(72, 40, 3, 3), torch.randn(72), 1, 1, 1, 2)  # 40 -> 36 per group
    _check(x, torch.randn(80, 1, 3, 3), None, 1, 1, 1, 80)


def test_gradients_match_conv2d():
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(32, 4, 3, 3).requires_grad_()
    b = torch.randn(32).requires_grad_()
    y = K.GroupedConv2dFunction.apply(x, w, b, 1, 1, 1, 4)
    g = torch.randn_like(y)
    y.backward(g)
    got = (x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None
    F.conv2d(x, w, b, 1, 1, 1, 4).backward(g)
    for a, r in zip(got, (x.grad, w.grad, b.grad)):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)


def test_bad_input(monkeypatch):
    x, w = torch.randn(1, 8, 4, 4), torch.randn(8, 2, 3, 3)
    with pytest.raises(ValueError, match="takes bfloat16, float16 or float32.*torch.float64"):
        K.grouped_conv2d(x.double(), w.double(), groups=4)
    with pytest.raises(ValueError, match="groups 3 must divide the 8 input and 8 output"):
        K.grouped_conv2d(x, torch.randn(8, 2, 3, 3), groups=3)
    with pytest.raises(ValueError, match=r"takes a 4-d input \(N, C, H, W\)"):
        K.grouped_conv2d(x[0], w, groups=4)
    with pytest.raises(ValueError, match="stride must be a whole number >= 1"):
        K.grouped_conv2d(x, w, stride=0, groups=4)
    with pytest.raises(ValueError, match="leaves no output on a 4x4 input"):
        K.grouped_conv2d(x, torch.randn(8, 2, 7, 7), groups=4)
    monkeypatch.setattr(K, "INTERPRET", False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="runs on CUDA GPUs; got an input on cpu"):
            K.grouped_conv2d(x, w, groups=4)


def test_the_triton_path_matches_the_model_and_says_what_it_left():
    from deeproots.deploy import build_path

    model = trained_like("nin-root-8")
    x = torch.randn(2, 3, 8, 8)
    fast = build_path(model, x, "triton")
    with torch.no_grad():
        ref = model(x)
    assert (fast(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert fast.fallbacks == []
    odd = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, padding_mode="reflect"))
    _, kept = M.replace_convs(odd, M.TritonConv2d)
    assert kept == ["0: the Triton conv cannot run this layer: padding_mode 'reflect' (the "
                    "kernel pads with zeros)"]


def test_every_lowering_computes_the_conv():
    conv = nn.Conv2d(12, 24, 3, padding=1, groups=4)
    x = torch.randn(2, 12, 6, 6)
    ref = conv(x)
    options = M.lowerings(conv, torch.device("cpu"))
    assert set(options) == {"native", "dense", "split"}  # triton only on a GPU
    for name, fn in options.items():
        assert torch.allclose(fn(x), ref, atol=1e-5), name


def test_dispatch_takes_the_fastest_measured_and_remembers(monkeypatch):
    M.dispatch_cache().clear()
    clock = {"native": 3.0, "dense": 1.0, "split": 2.0}
    timed = []

    def fake_timer(fn, x):
        name = next(k for k, f in M.lowerings(conv, x.device).items()
                    if f.__code__ is fn.__code__)
        timed.append(name)
        return clock[name]

    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    monkeypatch.setattr(M.DispatchConv2d, "timer", staticmethod(fake_timer))
    layer = M.DispatchConv2d(conv)
    x = torch.randn(1, 8, 5, 5)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    assert list(layer.chosen.values()) == ["dense"] and sorted(timed) == sorted(clock)
    layer(x)
    assert len(timed) == 3  # measured once per shape


def test_the_dispatch_path_matches_the_model():
    from deeproots.deploy import build_path

    model = trained_like("resnet50-root-64")
    x = torch.randn(1, 3, 64, 64)
    fast = build_path(model, x, "dispatch")
    with torch.no_grad():
        ref = model(x)
    assert (fast(x) - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6
