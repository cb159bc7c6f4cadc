"""The timing helper: order of calls and the statistics it reports (no timed assertions)."""
import pytest
import torch

import deeproots
from deeproots.speed.bench import train_step_fn
from deeproots.speed.timing import Timing, interleaved


def test_models_take_turns_after_warmup():
    calls = []
    result = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         images=4, repeats=3, warmup=1, warmup_s=0)
    assert calls == ["a", "b"] * 4
    assert len(result["a"].seconds) == 3 and result["b"].images == 4


def test_the_warm_up_lasts_half_a_second_on_a_cpu_whatever_the_rounds(monkeypatch):
    """One warm-up round asked, each round 0.1 s on a fake clock: 5 rounds warm up (a batch
    of 2 timed after a single warm-up call once read 40x its steady time)."""
    import deeproots.speed.timing as T

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

        def process_time(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(T, "time", clock)
    calls = []

    def work():
        calls.append(1)
        clock.now += 0.1

    interleaved({"a": work}, images=2, repeats=2, warmup=1)
    assert len(calls) == 5 + 2


def test_timing_statistics_by_hand():
    t = Timing("x", [0.2, 0.4, 0.3], images=10)
    assert t.median_s == 0.3
    assert t.images_per_s == pytest.approx(10 / 0.3)
    assert t.ms_per_image == pytest.approx(30.0)
    assert t.spread == pytest.approx((0.4 - 0.2) / 0.3)
    with pytest.raises(ValueError, match="repeats must be a whole number >= 1; got 0"):
        interleaved({}, images=1, repeats=0)


def test_train_step_updates_weights():
    model = deeproots.create_model("nin-root-8", in_channels=1)
    before = model.conv2a.conv.weight.clone()
    train_step_fn(model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))()
    assert not torch.equal(before, model.conv2a.conv.weight)


from deeproots.speed.bench import _openvino_scope_to_module, format_layer_times, layer_times  # noqa: E402


def _conv2a_macs(batch, size, groups):
    """conv2a of NiN by hand: 5x5, 96 -> 192 channels in ``groups`` groups, on the map
    that pool1 leaves (ceil mode: 16 -> 8)."""
    out = -(-(size - 3) // 2) + 1
    return batch * out * out * 192 * (96 // groups) * 25


@pytest.mark.parametrize("path", ["eager", "fold", "openvino"])
def test_layer_times_name_every_conv_with_its_cost(path):
    if path == "openvino":
        pytest.importorskip("openvino")
        from deeproots.speed.deploy import available_paths

        if "openvino" not in available_paths():
            pytest.skip("OpenVINO cannot run under a preloaded jemalloc")
    torch.set_num_threads(1)
    model = deeproots.create_model("nin-root-8")
    result = layer_times(model, torch.randn(2, 3, 16, 16), path, repeats=2, warmup=1)
    rows = {r["layer"]: r for r in result.layers}
    convs = [f"conv{b}{c}.conv" for b in "123" for c in "abc"]
    assert set(convs) <= set(rows)
    conv2a = rows["conv2a.conv"]
    assert conv2a["macs"] == _conv2a_macs(2, 16, 8)
    assert all(r["ms"] >= 0 for r in result.layers)
    assert sum(r["ms"] for r in result.layers) == pytest.approx(result.total_ms)
    order = [r["layer"] for r in result.layers]
    assert [c for c in order if c in convs] == convs  # in the order the pass runs them
    if path == "openvino":  # the engine's own kernels, batch norm and ReLU fused in
        assert conv2a["kind"].startswith("GroupConvolution")
        assert rows["conv2b.conv"]["kind"].startswith("Convolution")
        assert not any("BatchNorm" in r["kind"] or "Relu" in r["kind"] for r in rows.values())
    else:
        assert rows["conv2a.act"]["kind"] == "ReLU"
        assert ("conv2a.bn" in rows) == (path == "eager")  # fold: batch norm folded away
    summary = result.summary
    assert summary["grouped spatial convs"]["macs"] == \
        conv2a["macs"] + rows["conv3a.conv"]["macs"]
    assert summary["1x1 convs"]["macs"] == sum(rows[c]["macs"] for c in convs if c[5] != "a")
    assert summary["dense spatial convs"]["macs"] == rows["conv1a.conv"]["macs"]
    assert sum(v["ms"] for v in summary.values()) == pytest.approx(result.total_ms)
    text = format_layer_times(result)
    assert "conv2a.conv" in text and f"total {result.total_ms:.2f} ms" in text
    assert result.model == "nin-root-8" and result.batch_size == 2


def test_openvino_node_names_map_to_module_paths():
    f = _openvino_scope_to_module
    assert f("/conv1a/conv/Conv/WithoutBiases") == "conv1a.conv"
    assert f("/layer1/layer1.0/downsample/downsample.0/Conv/WithoutBiases") == \
        "layer1.0.downsample.0"
    assert f("/inception3a/branch2/branch2.1/conv/Conv") == "inception3a.branch2.1.conv"
    assert f("/fc/Gemm") == "fc"


def test_layer_times_errors(capsys):
    from deeproots.cli import main

    model = deeproots.create_model("nin")
    with pytest.raises(ValueError, match="per-layer timing supports paths eager, fold, "
                                         "openvino; got 'script'"):
        layer_times(model, torch.randn(1, 3, 16, 16), "script")
    with pytest.raises(ValueError, match="path 'openvino' runs on the CPU; got an input on meta"):
        layer_times(model, torch.randn(1, 3, 16, 16, device="meta"), "openvino")
    assert main(["bench", "nin", "--layers", "--path", "onnxruntime",
                 "--allocator", "system"]) == 2
    assert "--layers times paths eager, fold, openvino; got 'onnxruntime'" in \
        capsys.readouterr().err


def test_bench_layers_plot(tmp_path, capsys):
    from deeproots.cli import main

    out = tmp_path / "layers.png"
    assert main(["bench", "nin", "nin-root-8", "--layers", "--batch-size", "2", "--input-size",
                 "16", "--repeats", "1", "--warmup", "0", "--plot", str(out),
                 "--allocator", "system"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "nin", "--plot", str(out), "--allocator", "system"]) == 2
    assert "--plot draws per-layer times: add --layers" in capsys.readouterr().err
    # a folder as --plot is refused before the timing, which would otherwise be lost
    assert main(["bench", "nin", "--layers", "--plot", str(tmp_path), "--allocator",
                 "system"]) == 2
    assert f"--plot {tmp_path} is a folder" in capsys.readouterr().err


def test_bench_layers_cli(capsys):
    import json

    from deeproots.cli import main

    # no --batch-size: the default batch of 128
    assert main(["bench", "nin-root-4", "--layers", "--input-size", "16",
                 "--repeats", "1", "--warmup", "0", "--json", "--allocator", "system"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["model"] == "nin-root-4" and result["path"] == "fold"
    assert result["batch_size"] == 128
    rows = {r["layer"]: r for r in result["layers"]}
    assert rows["conv2a.conv"]["macs"] == _conv2a_macs(128, 16, 4)


def test_layer_times_by_a_clock_that_ticks_once_a_call(monkeypatch):
    """A fake clock that moves 1 ms at each reading: every module call then lasts one tick,
    so a ReLU shared by two layers must read 2 ms a pass, each conv 1 ms, and the pass the
    ticks of all readings between its start and end."""
    import types

    from torch import nn

    import deeproots.speed.timing as timing

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))))

    ticks = iter(range(10_000))
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(  # the one timer's clock
        perf_counter=lambda: next(ticks) / 1000))
    model = Shared()
    result = layer_times(model, torch.randn(2, 3, 8, 8), "eager", dtype="bfloat16",
                         repeats=3, warmup=1)
    rows = {r["layer"]: r for r in result.layers}
    assert rows["relu"]["ms"] == pytest.approx(2.0)
    assert rows["conv1"]["ms"] == pytest.approx(1.0) and rows["conv2"]["ms"] == pytest.approx(1.0)
    # readings: start, 4 calls x (pre, post), end = 10, so 9 ticks from start to end
    assert result.total_ms == pytest.approx(9.0)
    assert rows["(other)"]["ms"] == pytest.approx(5.0)
    assert rows["conv1"]["macs"] == 2 * 6 * 6 * 4 * 3 * 9  # by hand: 2 images, 6x6 out
    assert model.conv1.weight.dtype == torch.float32  # timed a bf16 copy, not the model
    assert model.training  # and the caller's model is still in training mode


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU halves the batch instead")
@pytest.mark.parametrize("layers", [False, True])
def test_a_batch_the_cpu_has_no_memory_for_is_refused_before_it_runs(monkeypatch, layers):
    """On a CPU the kernel kills a process that allocates more than there is, with no
    message: nin at 3x32x32 needs 4 x (3072 + 3 x 192x32x32) = 2,371,584 bytes of
    activations an image to time (Profile.activation_bytes), so with 100 MiB free 44 images
    fit and 64 are refused in one line."""
    import deeproots.runtime as R
    from deeproots.speed.bench import bench_layers, bench_models

    monkeypatch.setattr(R, "bytes_free", lambda device: 100 * 2**20)
    bench = bench_layers if layers else bench_models
    with pytest.raises(ValueError, match=r"batch size 64 needs about 145 MiB of activations "
                                         r"to time nin; 100 MiB is free on cpu\. The largest "
                                         r"batch that fits is about 44$"):
        bench(["nin"], batch_size=64, device="cpu")
