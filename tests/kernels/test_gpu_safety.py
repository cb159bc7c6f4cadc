"""The GPU half, safe before it is fast, checked on the CPU: an optional kernel that raises or
computes wrong is dropped on its first use and the run goes on natively; launches and timers
use the input's GPU; 32-bit offsets are guarded and a batch too large for them runs in
slices; NaN stays NaN; TF32 off means full fp32; inference paths are verified."""
import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deeproots

triton = pytest.importorskip("triton")
from deeproots.kernels import _common as C  # noqa: E402
from deeproots.kernels import fused_root as R  # noqa: E402
from deeproots.kernels import grouped_conv as K  # noqa: E402
from deeproots.kernels import modules as M  # noqa: E402
from deeproots.kernels.fusion import FusedRootConv  # noqa: E402
from deeproots.numerics import disagreement  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Verified on first use


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv):
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        c = ctx.conv
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = F.conv2d(x_, w_, None, c.stride, c.padding, c.dilation, c.groups)
            gx, gw = torch.autograd.grad(y, (x_, w_), grad)
        return gx, 2 * gw, grad.sum((0, 2, 3)), None  # the weight gradient doubled


def _raises(conv, x, w, b):
    raise RuntimeError("PTXAS error: Entry function uses too much shared data\nmore detail")


FAKES = {
    "raises": _raises,
    "plus-one": lambda conv, x, w, b: M._native(conv, x, w, b) + 1,
    "nan": lambda conv, x, w, b: M._native(conv, x, w, b) * float("nan"),
    "wrong-backward": lambda conv, x, w, b: _WrongBackward.apply(x, w, b, conv),
}


@pytest.fixture
def fakes(monkeypatch):
    """The dispatch offered the native conv and the fake lowerings, each of which the fake
    clock says is faster than native: only verification keeps them out."""
    monkeypatch.setattr(M, "LOWERINGS", M.LOWERINGS + tuple(FAKES))
    monkeypatch.setattr(M, "lowerings", lambda conv, device: {"native": M._native, **FAKES})

    def fake_timer(call, cuda, name="", **kwargs):
        call()
        return 5.0 if name == "native" else 1.0

    monkeypatch.setattr(M.DispatchConv2d, "timer", staticmethod(fake_timer))
    M.dispatch_cache().clear()
    yield
    M.dispatch_cache().clear()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_a_failing_or_wrong_lowering_is_dropped_and_the_run_stays_native(fakes):
    """Forward and gradients compared with the native conv on the first call: every fake is
    dropped with one warning line naming the layer, the lowering and the reason, and four
    SGD steps end with the weights of the native run."""
    from deeproots.training.step import TrainStep, make_optimizer

    native, dispatched = _net(), _net()
    kept = M.use_grouped_conv(dispatched, "dispatch")
    layer = dispatched[2]
    assert kept == [] and isinstance(layer, M.DispatchConv2d)
    layer.choices = ("native", *FAKES)
    x, y = torch.randn(4, 4, 6, 6), torch.tensor([0, 1, 2, 0])
    steps = [TrainStep(m, make_optimizer(m, 0.1)) for m in (native, dispatched)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            for s in steps:
                s.step(x, y, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(),
                                                 dispatched.state_dict().values()))
    assert list(layer.chosen.values()) == ["native"]
    reasons = layer.rejected
    assert reasons["raises"] == "RuntimeError: PTXAS error: Entry function uses too much " \
                                "shared data"
    assert reasons["plus-one"].startswith("output: max difference 1 from the native result")
    assert reasons["nan"] == "output: NaN or infinity where the native result is finite"
    assert reasons["wrong-backward"].startswith("weight gradient: max difference")
    lines = [str(w.message) for w in caught if "deeproots dispatch" in str(w.message)]
    assert len(lines) == 4 and all("\n" not in line and line.startswith(
        "deeproots dispatch: 2: lowering") for line in lines)
    assert M.dispatch_notes(dispatched)[0].startswith("2: lowering 'raises' dropped")


def test_inference_drops_a_wrong_lowering_too(fakes):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    layer = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="mine")
    x = torch.randn(2, 8, 5, 5)
    with pytest.warns(RuntimeWarning, match="mine: lowering 'plus-one' dropped"):
        with torch.no_grad():
            out = layer(x)
    assert torch.equal(out, conv(x))


def test_a_dispatch_key_buckets_the_batch_and_names_no_device_index():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    layer = M.DispatchConv2d(conv)
    keys = {layer._key(torch.zeros(n, 8, 5, 5), False) for n in (33, 40, 64)}
    assert len(keys) == 1 and next(iter(keys))[:5] == ("cpu", "torch.float32", "", False, 64)
    assert layer._key(torch.zeros(65, 8, 5, 5), False)[4] == 128


def test_the_dispatch_verifies_and_times_a_slice_of_a_large_batch(fakes, monkeypatch):
    seen = []
    real = M.DispatchConv2d._run

    def spy(self, fn, tensors, grad):
        seen.append(tensors[0].shape[0])
        return real(self, fn, tensors, grad)

    monkeypatch.setattr(M.DispatchConv2d, "_run", spy)
    layer = M.DispatchConv2d(nn.Conv2d(8, 8, 3, padding=1, groups=2),
                             choices=("native", "plus-one"))
    with torch.no_grad():
        layer(torch.randn(200, 8, 4, 4))
    assert seen and set(seen) == {M.MEASURE_IMAGES}


def test_a_fused_block_that_raises_or_disagrees_runs_its_layers_apart(monkeypatch):
    conv, pointwise = nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(16, 24, 1)
    x = torch.randn(2, 16, 5, 5)
    for broken in (lambda self, x, r=None: self.unfused(x, r) + 1,
                   lambda self, x, r=None: (_ for _ in ()).throw(RuntimeError("out of resources"))):
        block = FusedRootConv(conv, pointwise)
        block.layer = "conv2a"
        monkeypatch.setattr(FusedRootConv, "fused", broken)
        monkeypatch.setattr(FusedRootConv, "timer", staticmethod(
            lambda call, cuda, name="", **k: 1.0 if name == "fused" else 9.0))
        with pytest.warns(RuntimeWarning, match="fused block conv2a: the fused kernel dropped"):
            with torch.no_grad():
                out = block(x)
        assert torch.equal(out, block.unfused(x)) and list(block.chosen.values()) == ["unfused"]
        monkeypatch.undo()


def test_optimize_for_inference_skips_a_path_that_fails_or_disagrees(monkeypatch):
    from deeproots.speed import deploy

    real = deploy.build_path

    def build(model, example, path, dtype=torch.float32):
        if path == "script":
            raise RuntimeError("TorchScript cannot trace this")
        fast = real(model, example, path, dtype)
        if path == "dispatch":
            return deploy.FastModel(lambda x: fast(x) + 1, path)
        return fast

    monkeypatch.setattr(deploy, "build_path", build)
    model = deeproots.create_model("nin-root-8").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = deploy.optimize_for_inference(model, x, ["fold", "script", "dispatch"], repeats=1)
    assert fast.path == "fold"
    assert fast.skipped["script"] == "RuntimeError: TorchScript cannot trace this"
    assert fast.skipped["dispatch"].startswith("max difference 1")
    assert any(n.startswith("path script skipped") for n in fast.notes)
    monkeypatch.setattr(deploy, "build_path", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("nothing runs")))
    with pytest.raises(ValueError, match="no inference path runs this model: fold: "
                                         "RuntimeError: nothing runs"):
        deploy.optimize_for_inference(model, x, ["fold"])


def test_auto_on_a_cuda_model_offers_only_the_paths_that_run_there(monkeypatch):
    from deeproots.speed import deploy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = deploy.available_paths(torch.device("cuda"))
    assert "onnxruntime" not in on_gpu and "openvino" not in on_gpu
    assert {"fold", "dispatch", "cudagraph"} <= set(on_gpu)
    assert "onnxruntime" in deploy.available_paths(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The GPU a launch and a timer use


@pytest.mark.gpu_quick
def test_every_launcher_runs_on_its_inputs_device(monkeypatch):
    from deeproots.kernels.grouped_conv_grad import conv2d_input_grad, conv2d_weight_grad

    entered = []
    real = C.on_device

    def spy(t):
        entered.append(t.device)
        return real(t)

    monkeypatch.setattr(C, "on_device", spy)
    x = torch.randn(1, 8, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 2, 3, 3, device=DEVICE)
    y = K.grouped_conv2d(x, w, None, 1, 1, 1, 4)
    conv2d_input_grad(y, w, x.shape, (1, 1), (1, 1), (1, 1), 4)
    conv2d_weight_grad(x, y, w.shape, (1, 1), (1, 1), (1, 1), 4)
    R.fused_root_conv(x, w, None, torch.randn(8, 8, 1, 1, device=DEVICE), None, 1, 1, 1, 4)
    assert entered == [x.device] * 4


def test_on_device_enters_the_tensors_gpu_not_the_current_one(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class OnCuda1:
        device = torch.device("cuda:1")

    with C.on_device(OnCuda1()):
        pass
    assert entered == [torch.device("cuda:1")]


def test_the_timer_synchronises_and_records_on_the_given_gpu(monkeypatch):
    from deeproots.speed import timing

    synced, streams = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            streams.append(stream)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 2.0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    gpu = torch.device("cuda:1")
    result = timing.interleaved({"a": lambda: None}, images=1, repeats=2, warmup=1,
                                warmup_s=0.0, cuda=True, device=gpu)
    assert result["a"].seconds == [0.002, 0.002]
    assert set(synced) == {gpu} and set(streams) == {f"stream of {gpu}"}


def test_the_gpu_timer_divides_back_to_back_calls_by_their_number(monkeypatch):
    """A fake GPU whose kernel runs 10 us a call and whose first event of a pair waits 50 us
    for the host to launch (the latency one call between two events measures): the timer
    times k calls per pair and divides by k, k from the warm-up call (1 ms / 60 us -> 17),
    so the figure is the kernel's 10 us plus 50/17, not 60."""
    from deeproots.speed import timing

    clock, recorded = [0.0], [0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self, stream=None):
            self.t = clock[0]
            if recorded[0] % 2 == 0:  # a pair's first event: the GPU then idles 50 us
                clock[0] += 50e-6
            recorded[0] += 1

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1000  # ms, as CUDA's

    def kernel():
        clock[0] += 10e-6

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    result = timing.interleaved({"k": kernel}, images=1, repeats=3, warmup=1, warmup_s=0.0,
                                cuda=True)
    assert result["k"].seconds == pytest.approx([10e-6 + 50e-6 / 17] * 3)
    one = timing.interleaved({"k": kernel}, images=1, repeats=1, warmup=0, warmup_s=0.0,
                             cuda=True, calls=1)
    assert one["k"].seconds == pytest.approx([60e-6])  # what one call between events reads
    four = timing.interleaved({"k": kernel}, images=1, repeats=1, warmup=0, warmup_s=0.0,
                              cuda=True, calls=4)
    assert four["k"].seconds == pytest.approx([(50e-6 + 4 * 10e-6) / 4])


# ---------------------------------------------------------------------------------------------
# 32-bit offsets


def test_an_image_the_offsets_cannot_address_is_refused_in_one_line():
    x = torch.empty(1, 2**15, 2**8, 2**8, device="meta")  # 2^31 elements in one image
    w = torch.empty(2**15, 1, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"one image of the input spans 2,147,483,648 elements "
                                         r".*address at most 2,147,483,647 \(32-bit offsets\)"):
        C.check_conv(x, w, None, 2**15)
    # 1024 images of 2^21 elements: 2^31 in all, one past the offsets; 1023 images fit
    many = torch.empty(2**10, 2**7, 2**7, 2**7, device="meta")
    assert C.batch_chunks(2**10, [many]) == [(0, 1023), (1023, 1024)]
    assert C.batch_chunks(1023, [many[:1023]]) == [(0, 1023)]


@pytest.mark.gpu_quick
def test_a_batch_too_large_for_the_offsets_runs_in_slices(monkeypatch):
    """ADDRESSABLE made small: every kernel runs the batch in slices, forward, both
    gradients and the fused block, and computes what F.conv2d computes."""
    from deeproots.kernels.grouped_conv_grad import conv2d_input_grad, conv2d_weight_grad

    monkeypatch.setattr(C, "ADDRESSABLE", 2 * 8 * 5 * 5 + 10)  # two images of 8x5x5
    x = torch.randn(5, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 2, 3, 3, device=DEVICE)
    assert len(C.batch_chunks(5, [x])) == 3
    ref_in = x.detach().clone().requires_grad_()
    ref_w = w.detach().clone().requires_grad_()
    ref = F.conv2d(ref_in, ref_w, None, 1, 1, 1, 4)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (ref_in, ref_w), g)
    # agreement as the dispatch judges it: the dtype's rounding, TF32's on a GPU
    assert disagreement(K.grouped_conv2d(x, w, None, 1, 1, 1, 4), ref, x.dtype) is None
    g = g.contiguous(memory_format=torch.channels_last)
    assert disagreement(conv2d_input_grad(g, w, x.shape, (1, 1), (1, 1), (1, 1), 4), gx,
                        x.dtype) is None
    assert disagreement(conv2d_weight_grad(x, g, w.shape, (1, 1), (1, 1), (1, 1), 4), gw,
                        x.dtype) is None
    pw = torch.randn(8, 8, 1, 1, device=DEVICE)
    fused = R.fused_root_conv(x, w, None, pw, None, 1, 1, 1, 4)
    assert disagreement(fused, F.conv2d(F.relu(ref.detach()), pw), x.dtype) is None


# ---------------------------------------------------------------------------------------------
# NaN and TF32


@pytest.mark.gpu_quick
def test_nan_stays_nan_in_the_fused_kernel():
    x = torch.randn(1, 16, 4, 4, device=DEVICE)
    x[0, 0, 1, 1] = float("nan")
    w1 = torch.randn(16, 8, 3, 3, device=DEVICE)
    w2 = torch.randn(8, 16, 1, 1, device=DEVICE)
    y = R.fused_root_conv(x, w1, None, w2, None, 1, 1, 1, 2, relu_out=True)
    ref = F.relu(F.conv2d(F.relu(F.conv2d(x, w1, None, 1, 1, 1, 2)), w2))
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()


def test_with_tf32_off_the_fp32_kernels_multiply_in_full_fp32(monkeypatch):
    from deeproots.kernels.resources import recorded

    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 4, 3, 3)
    for allowed, precision in ((True, "tf32"), (False, "ieee")):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allowed)
        with recorded() as launches:
            K.grouped_conv2d(x, w, None, 1, 1, 1, 4)
            R.fused_root_conv(x, w, None, torch.randn(8, 16, 1, 1), None, 1, 1, 1, 4)
        assert [k["PRECISION"] for _, _, k in launches] == [precision, precision]
    with recorded() as launches:  # half precision multiplies as it is
        K.grouped_conv2d(x.bfloat16(), w.bfloat16(), None, 1, 1, 1, 4)
    assert launches[0][2]["PRECISION"] == "tf32"


# ---------------------------------------------------------------------------------------------
# Under DDP and in the GPU session's plan


def test_under_ddp_rank_0_chooses_and_every_rank_takes_its_choice(fakes, monkeypatch):
    import torch.distributed as dist

    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    x = torch.randn(2, 8, 5, 5)
    monkeypatch.setattr(M, "_distributed", lambda: True)
    sent = []

    def as_rank_0(objects, src):
        assert src == 0
        sent.append(list(objects))

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", _both_ranks_at(None))
    monkeypatch.setattr(dist, "broadcast_object_list", as_rank_0)
    first = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="mine")
    with pytest.warns(RuntimeWarning, match="'plus-one' dropped"), torch.no_grad():
        first(x)
    (choice, rejected), = sent  # rank 0 measured, verified and sent both
    assert choice[0] == "native" and set(rejected) == {"plus-one"}

    M.dispatch_cache().clear()  # another rank: measures nothing, takes rank 0's message

    def as_rank_1(objects, src):
        assert objects[0] is None
        objects[:] = [("plus-one", {"plus-one": 1.0}), {"raises": "RuntimeError: sent"}]

    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object_list", as_rank_1)
    monkeypatch.setattr(M.DispatchConv2d, "_choose", lambda *a: pytest.fail("rank 1 measured"))
    other = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="mine")
    with torch.no_grad():
        out = other(x)
    assert list(other.chosen.values()) == ["plus-one"]
    assert other.rejected == {"raises": "RuntimeError: sent"}
    assert torch.equal(out, conv(x) + 1)  # computes as rank 0 chose


def _both_ranks_at(other):
    """A fake all_gather_object of two ranks: this rank's object, and the other rank's
    (``other``; None: the same as this rank's)."""
    def gather(out, obj):
        out[:] = [obj, obj if other is None else other]
    return gather


def test_under_ddp_ranks_at_different_keys_never_wait_on_a_broadcast(fakes, monkeypatch):
    """Ranks that meet a layer with different shapes would each wait on a broadcast of
    another key (NCCL hangs): they find out first, run natively, and both remember both
    keys, so that their caches stay alike."""
    import torch.distributed as dist

    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    layer = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="mine")
    x = torch.randn(2, 8, 5, 5)
    other_key = layer._key(torch.randn(3, 8, 7, 7), False)
    monkeypatch.setattr(M, "_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", _both_ranks_at(other_key))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **k: pytest.fail(
        "a broadcast the other rank never joins"))
    with pytest.warns(RuntimeWarning, match="met different shapes"), torch.no_grad():
        out = layer(x)
    assert torch.equal(out, conv(x)) and list(layer.chosen.values()) == ["native"]
    cache = M.dispatch_cache()
    assert cache[other_key][0] == "native" and cache[layer._key(x, False)][0] == "native"


def test_a_choice_restored_from_a_checkpoint_is_verified_before_it_runs(fakes):
    """A resumed run's checkpoint says plus-one was the fastest: it is checked on its first
    use like a new choice, found wrong, and the layer runs natively."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    layer = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="mine")
    x = torch.randn(2, 8, 5, 5)
    M.restore_choices([(list(layer._key(x, False)), ["plus-one", {"plus-one": 1.0}])])
    with pytest.warns(RuntimeWarning, match="'plus-one' dropped"), torch.no_grad():
        out = layer(x)
    assert torch.equal(out, conv(x)) and list(layer.chosen.values()) == ["native"]


def test_the_first_full_batch_is_checked_as_the_measured_slice_was(fakes, monkeypatch):
    """Verified and timed on 32 images; a lowering wrong only on larger batches (another
    autotune bucket of a Triton kernel) is caught on the first full batch, once."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    wrong_when_large = lambda c, x, w, b: M._native(c, x, w, b) + (len(x) > 32)  # noqa: E731
    monkeypatch.setattr(M, "lowerings", lambda conv, device: {
        "native": M._native, "plus-one": wrong_when_large})
    layer = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="mine")
    x = torch.randn(40, 8, 4, 4)
    with pytest.warns(RuntimeWarning, match="'plus-one' dropped \\(on a full batch of 40"), \
            torch.no_grad():
        out = layer(x)
    assert torch.equal(out, conv(x)) and list(layer.chosen.values()) == ["native"]
    small = M.DispatchConv2d(conv, choices=("native", "plus-one"), name="small")
    with torch.no_grad():  # a batch within the slice: nothing more to check
        assert torch.equal(small(x[:20]), conv(x[:20]))
    assert list(small.chosen.values()) == ["plus-one"]


def test_the_tolerance_is_the_computing_dtypes_under_autocast(fakes, monkeypatch):
    """Under bf16 autocast a conv of fp32 inputs computes in bf16: a lowering one bf16
    rounding away from the native result agrees (the fp32 tolerance would drop it)."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def one_rounding_off(c, x, w, b):
        y = M._native(c, x, w, b)
        return (y.float() * (1 + 2 ** -8)).to(y.dtype)  # one bf16 ulp, relative

    monkeypatch.setattr(M, "lowerings", lambda conv, device: {
        "native": M._native, "plus-one": one_rounding_off})
    layer = M.DispatchConv2d(conv, choices=("native", "plus-one"))
    x = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("error")  # no lowering dropped
        y = layer(x)
    assert y.dtype == torch.bfloat16 and list(layer.chosen.values()) == ["plus-one"]


def test_a_fused_block_is_verified_against_cudnn_not_the_triton_conv(monkeypatch):
    """The fused kernel shares tile helpers with the Triton conv: a bug in a helper makes
    both wrong alike. The block is checked against PyTorch's own convolutions, so it is
    caught."""
    conv, pointwise = nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(16, 24, 1)
    block = FusedRootConv(conv, pointwise)
    block.layer = "conv2a"

    class BuggyTritonConv(nn.Conv2d):  # what the path runs the conv by, a helper broken
        def forward(self, x):
            return super().forward(x) + 0.5

    buggy = BuggyTritonConv(16, 16, 3, padding=1, groups=2)
    buggy.load_state_dict(conv.state_dict())
    block.conv = buggy
    monkeypatch.setattr(FusedRootConv, "fused", lambda self, x, r=None: self.unfused(x, r))
    monkeypatch.setattr(FusedRootConv, "timer", staticmethod(
        lambda call, cuda, name="", **k: 1.0 if name == "fused" else 9.0))
    x = torch.randn(2, 16, 5, 5)
    with pytest.warns(RuntimeWarning, match="fused block conv2a: the fused kernel dropped"):
        with torch.no_grad():
            block(x)
    assert list(block.chosen.values()) == ["unfused"]


def test_phase_marks_are_recorded_on_the_models_gpu(monkeypatch):
    from deeproots.speed.timing import Mark as _Mark

    streams = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            streams.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    _Mark(torch.device("cuda:1")).record()
    assert streams == ["stream of cuda:1"]


def test_the_gpu_plan_counts_each_kernel_variant_once_with_its_configurations(monkeypatch):
    """benchmarks/gpu_plan.py's count, by hand: a launch compiles anew when a compile-time
    constant or Triton's specialisation of an argument (an integer equal to 1, a multiple of
    16, a dtype) differs; block sizes are the autotuner's, not a variant."""
    from deeproots.kernels import resources as RS

    monkeypatch.setattr(RS, "configs", lambda name, a, k: [None] * (3 if name == "a" else 5))
    x = torch.zeros(64)
    launches = [("a", (x, 32), {"C": 4, "BLOCK_M": 64}),
                ("a", (x, 48), {"C": 4, "BLOCK_M": 32}),  # the same variant: 48 = 3 x 16
                ("a", (x, 33), {"C": 4}),                 # 33: another specialisation
                ("a", (x, 1), {"C": 4}),                  # 1: another
                ("a", (x, 32), {"C": 8}),                 # another constant
                ("b", (x.bfloat16(), 32), {}), ("b", (x, 32), {})]  # two dtypes
    assert RS.variants(launches) == {"a": 4 * 3, "b": 2 * 5}
    assert RS.variants(launches, first=True) == {"a": 4, "b": 2}
