"""Fast inference paths and export: each matches the eager model within the stated
tolerance (max |difference| <= 1e-4 x max |logit|, float32)."""
import json

import pytest
import torch
from torch import nn

import deeproots
from deeproots.speed.bench import bench_models
from deeproots.cli import main
from helpers import trained_like
from deeproots.speed import deploy as deploy_module
from deeproots.speed.deploy import available_paths, build_path, optimize_for_inference
from deeproots.speed.export import export, load_exported
from deeproots.speed.fold import fold_batchnorm


def _close(out, ref, tol=1e-4):
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= tol * ref.abs().max().item() + 1e-6


CASES = [("nin-root-8", {}, 32), ("resnet50-root-8", {}, 64),
         ("googlenet-root-4", {"layout": "standard"}, 64)]


@pytest.mark.parametrize("name, kwargs, size", CASES)
def test_folding_removes_batch_norm_and_keeps_outputs(name, kwargs, size):
    model = trained_like(name, **kwargs)
    x = torch.randn(2, 3, size, size)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        _close(folded(x), model(x))


@pytest.mark.parametrize("path", ["fold", "script", "onnxruntime", "openvino"])
@pytest.mark.parametrize("name, kwargs, size", CASES[:2])
def test_paths_match_eager(path, name, kwargs, size):
    pytest.importorskip(path) if path in ("onnxruntime", "openvino") else None
    model = trained_like(name, **kwargs)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    fast = build_path(model, x, path)
    _close(fast(x), ref)
    assert fast.path == path


def test_bfloat16_is_opt_in_and_close():
    model = trained_like("nin-root-8")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    paths = ["fold"] + (["openvino"] if "openvino" in available_paths() else [])
    for path in paths:
        out = build_path(model, x, path, dtype=torch.bfloat16)(x)
        assert out.dtype == torch.float32
        _close(out, ref, tol=0.05)  # bf16 keeps ~3 significant digits
    with pytest.raises(ValueError, match="path 'onnxruntime' runs float32 only"):
        build_path(model, x, "onnxruntime", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        build_path(model, x, "fold", dtype=torch.float16)


def test_optimize_for_inference_picks_the_fastest_measured():
    model = trained_like("nin-root-8")
    x = torch.randn(4, 3, 32, 32)
    fast = optimize_for_inference(model, x, ["fold", "script"], repeats=2)
    assert set(fast.timings) == {"fold", "script"}
    assert fast.timings[fast.path] == min(fast.timings.values())
    with torch.no_grad():
        _close(fast(x), model(x))


def test_the_fastest_path_chosen_on_a_loaded_machine_says_so(monkeypatch):
    """Paths timed while other processes held 40% of the CPUs: the choice stands (it is the
    fastest measured) and its notes say the machine was loaded; at 5%, nothing."""
    import deeproots.speed.deploy as deploy
    from deeproots.speed.timing import Timing

    model, x = trained_like("nin-root-8"), torch.randn(2, 3, 32, 32)
    for others, said in ((0.4, True), (0.05, False)):
        monkeypatch.setattr(deploy, "interleaved", lambda work, images, repeats: {
            p: Timing(p, [0.002 if p == "script" else 0.003], images, others) for p in work})
        fast = optimize_for_inference(model, x, ["fold", "script"], repeats=1)
        assert fast.path == "script"
        assert any("other processes used 40% of the CPUs while the paths were timed" in n
                   for n in fast.notes) is said


# each format against the eager model: (tolerance, what the file's reader is)
EXPORT_TOLERANCE = {"pt2": 1e-5, "onnx": 1e-4, "torchscript": 1e-5, "aoti": 1e-4}


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript"])
def test_every_export_format_computes_what_the_eager_model_does(tmp_path, capsys, fmt):
    """Exported from a batch of one, run on a batch of five: the batch size is dynamic in
    every format, and each file (read back by its own runtime: torch.export.load, ONNX
    Runtime, torch.jit.load) agrees with the eager model within its tolerance."""
    pytest.importorskip("onnxruntime")
    model = trained_like("nin-root-8")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    notes = export(model, x[:1], tmp_path / f"m.{fmt}", fmt)
    got = load_exported(tmp_path / f"m.{fmt}", fmt)(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= EXPORT_TOLERANCE[fmt] * max(1.0, ref.abs().max())
    assert ("deprecated" in " ".join(notes)) == (fmt == "torchscript")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic


def test_a_backbone_runs_fast_and_exports_its_maps(tmp_path):
    """A features_only backbone returns a list of maps: every CPU path optimize_for_inference
    builds here, and every export format read back, give each map as the eager backbone
    does (the ONNX graph's outputs named map0, map1, map2)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = trained_like("nin-root-8", features_only=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    fast = optimize_for_inference(model, x, repeats=1)
    assert fast.skipped == {} and len(fast.timings) >= 3  # fold, script, dispatch at least
    for path in fast.timings:
        maps = build_path(model, x, path)(x)
        assert isinstance(maps, list) and len(maps) == 3, path
        for got, want in zip(maps, ref):
            _close(got, want)
    for fmt in ("pt2", "onnx", "torchscript"):
        export(model, x[:1], tmp_path / f"m.{fmt}", fmt)
        maps = load_exported(tmp_path / f"m.{fmt}", fmt)(x)
        assert len(maps) == 3
        for got, want in zip(maps, ref):
            _close(got, want, EXPORT_TOLERANCE[fmt])
    assert [o.name for o in onnx.load(tmp_path / "m.onnx").graph.output] == [
        "map0", "map1", "map2"]


def test_the_onnx_exporter_is_the_recommended_one_and_the_legacy_one_a_fallback(
        tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxscript")
    import onnx

    from deeproots.speed import export as exporting
    from deeproots.speed.fold import fold_batchnorm

    model = trained_like("nin-root-8")
    assert exporting.onnx_exporter() == "dynamo"
    dynamo = onnx.load_from_string(exporting.onnx_bytes(fold_batchnorm(model),
                                                        torch.randn(1, 3, 32, 32)))
    assert dynamo.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named batch
    # without onnxscript: the legacy exporter, said in one line
    monkeypatch.setattr(exporting, "_installed", lambda name: name != "onnxscript")
    assert main(["export", "nin", "--format", "onnx", "--out", str(tmp_path / "n.onnx")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: onnx: the legacy (TorchScript-based) exporter, as onnxscript is not "
                   "installed; pip install onnxscript for the one PyTorch recommends"]
    assert (tmp_path / "n.onnx").stat().st_size > 3_000_000  # 967k float32 weights
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(model, torch.randn(1, 3, 32, 32), tmp_path / "m.tfl", "tflite")


@pytest.mark.skipif(deploy_module.aoti_refusal() is not None, reason="no C++ compiler")
def test_an_aoti_package_runs_and_benches_beside_fold(tmp_path, capsys):
    """AOTInductor: the exported package (compiled C++) agrees with eager on another batch
    size, and `bench --path aoti` times it beside fold."""
    model = _tiny().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    export(model, x[:1], tmp_path / "m.pt2", "aoti")
    got = load_exported(tmp_path / "m.pt2", "aoti")(x)
    assert (got - ref).abs().max().item() <= EXPORT_TOLERANCE["aoti"] * max(1.0, ref.abs().max())
    fast = build_path(model, x, "aoti")
    _close(fast(x), ref)
    assert "aoti" in available_paths()


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_bench_rows():
    rows = bench_models(["nin", "nin-root-8"], batch_size=4, paths=["fold"],
                        modes=["inference", "train"], repeats=1, warmup=0, input_size=16)
    assert [(r.model, r.mode) for r in rows] == [
        ("nin", "inference"), ("nin-root-8", "inference"), ("nin", "train"),
        ("nin-root-8", "train")]
    # by hand at 16x16: root-8 groups conv2a (8x8 map, 96 -> 192, 5x5) in 8 and conv3a
    # (4x4 map, 192 -> 192, 3x3) in 4; nothing else differs
    conv2a = lambda g: 8 * 8 * 192 * (96 // g) * 25  # noqa: E731
    conv3a = lambda g: 4 * 4 * 192 * (192 // g) * 9  # noqa: E731
    assert rows[0].macs - rows[1].macs == conv2a(1) - conv2a(8) + conv3a(1) - conv3a(4)
    assert all(r.ms_per_image > 0 and r.allocator in ("system", "jemalloc") for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["bench", "nin-rot-8"], "unknown model 'nin-rot-8'"),
    (["bench", "nin", "--device", "cuda"], "no CUDA GPU"),
    (["bench", "nin", "--device", "tpu"], "device must be cpu, cuda or cuda:N; got 'tpu'"),
])
def test_bench_errors(capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_bad_values():
    with pytest.raises(ValueError, match="batch size must be a whole number >= 1; got 0"):
        bench_models(["nin"], batch_size=0)
    with pytest.raises(ValueError, match="unknown path 'tvm'"):
        bench_models(["nin"], paths=["tvm"])
    with pytest.raises(SystemExit):  # argparse: choices
        main(["bench", "nin", "--path", "tvm"])


def test_bench_json(capsys):
    assert main(["bench", "nin", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                 "--input-size", "16", "--json", "--allocator", "system"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["model"] == "nin" and rows[0]["allocator"] == "system"


def test_paths_leave_the_callers_model_and_torch_as_they_were():
    import torch._inductor.config as inductor_config

    model = trained_like("nin-root-8").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    for path in ("eager", "fold", "compile"):
        build_path(model, x, path)
    assert model.training and inductor_config.freezing is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fast_model_still_checks_its_input():
    fast = build_path(trained_like("nin-root-8"), torch.randn(2, 3, 32, 32), "fold")
    with pytest.raises(ValueError, match=r"input 2x2 does not fit nin-root-8"):
        fast(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="built for 3-channel input; got 1"):
        fast(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="paths must name at least one of eager, fold"):
        optimize_for_inference(trained_like("nin"), torch.randn(1, 3, 32, 32), [])


def test_export_of_a_checkpoint(tmp_path, capsys):
    from deeproots.config import TrainConfig
    from deeproots.training.loop import train
    from helpers import write_fashion_mnist

    write_fashion_mnist(tmp_path / "data", n_train=32, n_test=16, size=8)
    train(TrainConfig(model="nin-root-4", data_dir=str(tmp_path / "data"),
                      out=str(tmp_path / "run"), epochs=1, batch_size=16, device="cpu",
                      progress=False, download=False))
    ckpt = str(tmp_path / "run" / "last.pt")
    out = tmp_path / "trained.pt"
    assert main(["export", "x", "--checkpoint", ckpt, "--format", "torchscript",
                 "--out", str(out), "--input-size", "1,8,8"]) == 0
    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        _close(load_exported(out, "torchscript")(x), model(x))  # the trained weights, folded
    capsys.readouterr()
    # without --input-size: the size the run was trained at (1x8x8), not NiN's 3x32x32
    assert main(["export", "x", "--checkpoint", ckpt, "--format", "onnx", "--out",
                 str(tmp_path / "z.onnx")]) == 0
    assert "input (1, 8, 8)" in capsys.readouterr().out
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "z.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        _close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), model(x))
    assert main(["export", "x", "--checkpoint", ckpt, "--format", "onnx", "--out",
                 str(tmp_path / "y.onnx"), "--num-classes", "5"]) == 2
    assert "--num-classes cannot change a trained checkpoint's model" in capsys.readouterr().err
    assert main(["export", "x", "--checkpoint", ckpt, "--format", "onnx", "--out",
                 str(tmp_path / "y.onnx"), "--num-classes", "0"]) == 2  # 0 is a value too
    assert "--num-classes cannot change a trained checkpoint's model" in capsys.readouterr().err


def test_openvino_is_refused_under_jemalloc(monkeypatch, capsys):
    """OpenVINO aborts the whole process under a preloaded jemalloc: refuse it clearly."""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert "openvino" not in available_paths()
    model = deeproots.create_model("nin")
    with pytest.raises(ValueError, match="'openvino' aborts the process under a preloaded"):
        build_path(model, torch.randn(1, 3, 32, 32), "openvino")


def test_optimize_for_inference_says_what_it_takes():
    import deeproots

    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"optimize_for_inference takes an nn.Module; got str "
                                         r"'nin' \(build it first: deeproots.create_model"):
        deeproots.optimize_for_inference("nin", x)
    model = deeproots.create_model("nin-root-8").eval()
    with pytest.raises(ValueError, match=r"path 'onnxruntime' runs float32 only; got dtype "
                                         r"torch.bfloat16"):
        deeproots.optimize_for_inference(model, x, "onnxruntime", dtype=torch.bfloat16)
