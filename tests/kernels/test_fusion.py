"""The fused root kernel (grouped conv + bias + ReLU + 1x1 conv [+ residual] [+ ReLU] in one
Triton kernel) against the same layers in F.conv2d, under TRITON_INTERPRET=1 on a CPU; the
pass that finds root blocks in a traced model, and the fused and CUDA-graph paths."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import trained_like

triton = pytest.importorskip("triton")
from deeproots.kernels import fused_root as R  # noqa: E402
from deeproots.kernels import _common as C  # noqa: E402
from deeproots.kernels.fusion import FusedRootConv, fuse_root_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3,  # TF32 on a GPU
       torch.float16: 3e-3, torch.bfloat16: 3e-2}  # of max |reference|


def _reference(x, w1, b1, w2, b2, stride, padding, dilation, groups, residual, relu_out):
    """The unfused layers in float32, the intermediate rounded to the dtype as stored."""
    dtype = x.dtype
    f = lambda t: t.float() if t is not None else None  # noqa: E731
    h = F.relu(F.conv2d(f(x), f(w1), f(b1), stride, padding, dilation, groups)).to(dtype)
    y = F.conv2d(f(h), f(w2), f(b2))
    y = y + f(residual) if residual is not None else y
    return F.relu(y) if relu_out else y


def _check(cin, c2, c3, k, stride, padding, groups, dtype=torch.float32, dilation=1,
           bias=True, residual=False, relu_out=False, size=5, batch=2, nchw=False):
    x = torch.randn(batch, cin, size, size)
    if not nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(c2, cin // groups, k, k) / (cin // groups * k * k) ** 0.5
    w2 = torch.randn(c3, c2, 1, 1) / c2 ** 0.5
    b1, b2 = (torch.randn(c2), torch.randn(c3)) if bias else (None, None)
    out = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = torch.randn(batch, c3, out, out) if residual else None
    x, w1, w2, b1, b2, r = (t.to(DEVICE, dtype) if t is not None else None
                            for t in (x, w1, w2, b1, b2, r))
    y = R.fused_root_conv(x, w1, b1, w2, b2, stride, padding, dilation, groups, r, relu_out)
    ref = _reference(x, w1, b1, w2, b2, stride, padding, dilation, groups, r, relu_out)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item() + 1e-5, (err, ref.abs().max().item())


CASES = {  # cin, c2, c3, kernel, stride, padding, groups, and options
    # the GEMM way: >= 8 channels per group in and out
    "gemm-16-per-group-residual-relu": (16, 32, 24, 3, 1, 1, 2, dict(residual=True,
                                                                     relu_out=True)),
    "gemm-12-per-group-5x5": (16, 24, 20, 5, 1, 2, 2, {}),
    "gemm-two-output-tiles": (16, 16, 80, 3, 1, 1, 2, dict(relu_out=True)),
    "gemm-stride-2-no-bias": (16, 16, 24, 3, 2, 1, 2, dict(bias=False)),
    "gemm-dilation-2": (16, 16, 16, 3, 1, 2, 2, dict(dilation=2)),
    # the direct way: depthwise and narrow groups
    "depthwise-residual-relu": (16, 16, 40, 3, 1, 1, 16, dict(residual=True, relu_out=True)),
    "depthwise-x2": (8, 16, 24, 3, 1, 1, 8, {}),
    "4-per-group-stride-2-residual": (16, 16, 24, 3, 2, 1, 4, dict(residual=True)),
    "more-steps-than-one": (48, 48, 16, 1, 1, 0, 48, dict(bias=False)),
    "nchw-input": (16, 32, 24, 3, 1, 1, 2, dict(nchw=True, relu_out=True)),
}


@pytest.mark.gpu_quick
@pytest.mark.parametrize("case", list(CASES))
def test_the_fused_kernel_computes_the_layers_it_replaces(case):
    *shape, options = CASES[case]
    _check(*shape, **options)


@pytest.mark.gpu_quick
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["gemm-16-per-group-residual-relu", "depthwise-residual-relu"])
def test_half_precision(case, dtype):
    *shape, options = CASES[case]
    _check(*shape, dtype=dtype, **options)


@pytest.mark.gpu_quick
@pytest.mark.parametrize("block", [
    (96, 192, 160, 5, 1, 2, 8),      # nin-root-8: conv2a -> conv2b
    (192, 192, 192, 3, 1, 1, 4),     # nin-root-8: conv3a -> conv3b
    (64, 64, 256, 3, 1, 1, 64),      # resnet50-root-64: layer1 conv2 -> conv3 (depthwise)
    (128, 128, 512, 3, 1, 1, 32),    # resnet50-root-64: layer2 conv2 -> conv3
], ids=["nin-conv2", "nin-conv3", "resnet-layer1", "resnet-layer2"])
def test_the_root_blocks_of_the_paper_networks(block, monkeypatch):
    monkeypatch.setattr(R, "INTERPRET_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64})
    _check(*block, size=3, batch=1, residual=block[2] != block[1], relu_out=True)


@pytest.mark.gpu_quick
def test_small_tiles_cover_every_edge(monkeypatch):
    monkeypatch.setattr(R, "INTERPRET_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    monkeypatch.setattr(R, "DIRECT_STEP", 16)
    _check(16, 24, 40, 3, 1, 1, 2, size=7, residual=True, relu_out=True)  # GEMM
    _check(24, 24, 40, 3, 2, 1, 12, size=7, relu_out=True)  # direct, 2 per group


@pytest.mark.gpu_quick
def test_bad_input(monkeypatch):
    t = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    x, w1, w2 = t(1, 16, 4, 4), t(16, 8, 3, 3), t(8, 16, 1, 1)
    with pytest.raises(ValueError, match=r"must be 1x1; got weight \(8, 16, 3, 3\)"):
        R.fused_root_conv(x, w1, None, t(8, 16, 3, 3), None, padding=1, groups=2)
    with pytest.raises(ValueError, match="takes 12 channels but the grouped conv gives 16"):
        R.fused_root_conv(x, w1, None, t(8, 12, 1, 1), None, padding=1, groups=2)
    with pytest.raises(ValueError, match=r"residual must have the output's shape "
                                         r"\(1, 8, 4, 4\); got \(1, 8, 2, 2\)"):
        R.fused_root_conv(x, w1, None, w2, None, padding=1, groups=2, residual=t(1, 8, 2, 2))
    with pytest.raises(ValueError, match=f"pointwise must be torch.float32 on {x.device} like "
                                         f"the input; got torch.float64"):
        R.fused_root_conv(x, w1, None, w2.double(), None, padding=1, groups=2)
    with pytest.raises(ValueError, match=r"512 output channels per group \(the kernel holds "
                                         r"at most 256\)"):
        R.fused_root_conv(t(1, 16, 2, 2), t(512, 16, 1, 1), None, t(8, 512, 1, 1), None)
    monkeypatch.setattr(C, "INTERPRET", False)
    x, w1, w2 = x.cpu(), w1.cpu(), w2.cpu()
    with pytest.raises(ValueError, match="runs on CUDA GPUs; got an input on cpu"):
        R.fused_root_conv(x, w1, None, w2, None, padding=1, groups=2)


def _prefer(monkeypatch, winner):
    """A fake clock for the blocks' choice: ``winner`` measures faster (both still run)."""
    def fake_timer(call, cuda, name="", **kwargs):
        call()
        return 1.0 if name == winner else 2.0

    monkeypatch.setattr(FusedRootConv, "timer", staticmethod(fake_timer))


class Bottleneck(nn.Module):
    """A user's own root bottleneck: 1x1 -> grouped 3x3 -> 1x1, + identity, ReLU."""

    def __init__(self, c=16, width=16, groups=2, reflect=False):
        super().__init__()
        self.reduce = nn.Conv2d(c, width, 1)
        self.conv = nn.Conv2d(width, width, 3, padding=1, groups=groups,
                              padding_mode="reflect" if reflect else "zeros")
        self.bn = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, c, 1)

    def forward(self, x):
        y = torch.relu(self.reduce(x))
        y = F.relu(self.bn(self.conv(y)))
        return torch.relu(self.expand(y) + x)


def test_the_fused_path_runs_a_users_residual_block_as_one_kernel(monkeypatch):
    from deeproots.speed.deploy import build_path

    _prefer(monkeypatch, "fused")
    model = nn.Sequential(Bottleneck(), Bottleneck(groups=16)).eval()
    model[0].bn.running_var.uniform_(0.5, 2.0)
    model = model.to(DEVICE)
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    fast = build_path(model, x, "fused")
    with torch.no_grad():
        ref = model(x)
    assert fast.fused == ["0.conv", "1.conv"]
    assert fast.notes == ["2 blocks fused (conv + ReLU + 1x1 conv; each runs fused "
                          "where that measured faster)"]
    assert (fast(x) - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()
    assert len(fast.notes) == 1  # every block ran fused


def test_the_fused_path_says_which_blocks_ran_apart(monkeypatch):
    from deeproots.speed.deploy import build_path

    _prefer(monkeypatch, "unfused")
    model = nn.Sequential(Bottleneck(), Bottleneck(groups=16)).eval().to(DEVICE)
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    fast = build_path(model, x, "fused")
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() <= TOL[torch.float32] * model(x).abs().max()
    assert fast.notes[1:] == ["ran apart, faster than fused: 0.conv, 1.conv"]


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, FusedRootConv)]


@pytest.mark.parametrize("winner", ["fused", "unfused"])
def test_each_block_keeps_the_faster_of_fused_and_apart(winner, monkeypatch):
    from deeproots.speed.fold import fold_batchnorm

    _prefer(monkeypatch, winner)
    model = Bottleneck().eval().to(DEVICE)
    gm = fold_batchnorm(model)
    fuse_root_blocks(gm)
    block, = _blocks(gm)
    calls = []
    for name in ("fused", "unfused"):  # count the calls after the choice
        method = getattr(block, name)
        monkeypatch.setattr(block, name, lambda *a, m=method, n=name: calls.append(n) or m(*a))
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    with torch.no_grad():
        y, ref = gm(x), model(x)
        gm(x)
    assert list(block.chosen.values()) == [winner]
    # verified once (the kernel, against the layers in PyTorch's own convs: no call of
    # either method), measured once each, then the winner
    assert calls == ["fused", "fused", "unfused", winner, winner]
    assert (y - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()


class Offset(Bottleneck):
    """Adds a learned per-channel offset, not a residual map, after its 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(1, 16, 1, 1))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(torch.relu(self.reduce(x)))))
        return torch.relu(self.expand(y) + self.offset)


def test_a_broadcast_add_after_the_block_runs_apart(monkeypatch):
    from deeproots.speed.deploy import build_path

    _prefer(monkeypatch, "fused")
    model = Offset().eval().to(DEVICE)
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    fast = build_path(model, x, "fused")
    with torch.no_grad():
        ref = model(x)
    assert fast.fused == ["conv"]  # fused as a block with a residual input ...
    assert (fast(x) - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()  # ... run apart


def test_a_block_the_kernel_cannot_run_is_left_unfused_and_named():
    from deeproots.speed.fold import fold_batchnorm

    gm = fold_batchnorm(Bottleneck(reflect=True))
    fused, kept = fuse_root_blocks(gm)
    assert fused == [] and kept == ["conv: padding_mode 'reflect' (the kernel pads with "
                                    "zeros)"]


def _big_tiles(monkeypatch):  # fewer programs: the interpreter runs whole models faster
    monkeypatch.setattr(R, "INTERPRET_CONFIG", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128})
    monkeypatch.setattr(R, "DIRECT_STEP", 64)


@pytest.mark.parametrize("name", ["nin-root-8", "nin"])
def test_nin_and_its_root_variant_fuse_the_same_blocks(name, monkeypatch):
    """nin-root-8's two root blocks and conv1a -> conv1b; nin's same three, ungrouped: an
    orig and its root variant timed in the fused path get the same treatment."""
    from deeproots.speed.deploy import build_path

    _prefer(monkeypatch, "fused")
    _big_tiles(monkeypatch)
    model = trained_like(name).to(DEVICE)
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    fast = build_path(model, x, "fused")
    with torch.no_grad():
        ref = model(x)
    assert fast.fused == ["conv1a.conv", "conv2a.conv", "conv3a.conv"]
    assert fast.fallbacks == []
    assert (fast(x) - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()


def test_resnet50_fuses_its_bottlenecks_up_to_256_channels():
    from deeproots.speed.fold import fold_batchnorm

    fused, kept = fuse_root_blocks(fold_batchnorm(trained_like("resnet50")))
    assert len(fused) == 13  # the 3 + 4 + 6 bottlenecks of 64 to 256 channels
    assert kept == [f"layer4.{i}.conv2: 512 output channels per group (the kernel holds at "
                    f"most 256)" for i in range(3)]


def test_resnet_root_fuses_every_bottleneck_with_its_residual():
    """The rewiring, checked without running the kernel: with a gradient wanted, each fused
    block runs its layers one after another, so the fused graph must equal the model."""
    from deeproots.speed.fold import fold_batchnorm

    model = trained_like("resnet50-root-64")
    gm = fold_batchnorm(model)
    fused, kept = fuse_root_blocks(gm)
    assert len(fused) == 16 and kept == []  # 3 + 4 + 6 + 3 bottlenecks
    blocks = [m for m in gm.modules() if isinstance(m, FusedRootConv)]
    assert all(b.residual and b.relu_out for b in blocks)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    y = gm(x)
    with torch.no_grad():
        ref = model(x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    y.sum().backward()  # the unfused run is differentiable
    assert x.grad is not None and blocks[0].conv.weight.grad is not None


def test_googlenet_root_has_no_block_to_fuse():
    from deeproots.speed.fold import fold_batchnorm

    gm = fold_batchnorm(trained_like("googlenet-root-16"))
    assert fuse_root_blocks(gm) == ([], [])  # its grouped convs feed a concatenation


def test_a_fused_block_checks_its_residual_input():
    block = FusedRootConv(nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(16, 8, 1),
                          residual=True)
    with pytest.raises(ValueError, match="takes residual input; got none"):
        block(torch.randn(1, 16, 4, 4))


def test_the_gpu_paths_say_they_need_a_gpu(monkeypatch):
    from deeproots.speed.deploy import build_path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    model = trained_like("nin-root-8")
    with pytest.raises(ValueError, match="path 'cudagraph' runs on CUDA GPUs; got an input on "
                                         "cpu"):
        build_path(model, torch.randn(1, 3, 8, 8), "cudagraph")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="path 'fused' runs on CUDA GPUs; got an input on cpu"):
        build_path(model, torch.randn(1, 3, 8, 8), "fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_cuda_graph_path_replays_the_model():
    from deeproots.speed.deploy import build_path

    model = trained_like("nin-root-8").cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    fast = build_path(model, x, "cudagraph")
    with torch.no_grad():
        ref = model(x)
    first = fast(x)
    assert (first - ref).abs().max() <= 1e-3 * ref.abs().max()
    x2 = torch.randn(4, 3, 32, 32, device="cuda")
    second = fast(x2)  # replayed with new data; the first result is kept
    with torch.no_grad():
        assert (second - model(x2)).abs().max() <= 1e-3 * ref.abs().max()
    assert (first - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert fast(torch.randn(2, 3, 32, 32, device="cuda")).shape == (2, 10)  # a new shape
