"""The training step shared by train and bench: sums kept on the device and read rarely,
torch.compile with its fallback, resume under compile, out-of-memory, and the phase split."""
import json
import os
import signal

import pytest
import torch

import deeproots
from torch import nn

from deeproots.training.step import TrainStep, make_optimizer
from deeproots.training.objectives import loss_of
from deeproots.speed.paths import resolve_grouped_conv
from deeproots.training.loop import Interrupted, train
from helpers import train_cfg, write_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_mnist(folder, n_train=64, n_test=32, size=8)
    return folder


def tiny():
    """A small grouped CNN of the user's own: quick to compile on two cores."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _cfg(data_dir, out, **kw):
    return train_cfg(data_dir, out, **{"model": "tiny", **kw})


def test_the_sums_are_the_batches_own_and_read_once_an_epoch(data_dir, tmp_path, monkeypatch):
    """No per-step host read: one read at the end of each epoch (no progress bar, no
    callbacks); and the device sums equal the loss and hits recomputed by hand."""
    reads = []
    real = TrainStep.read
    monkeypatch.setattr(TrainStep, "read", lambda self: reads.append(1) or real(self))
    train(_cfg(data_dir, tmp_path, epochs=2), model=tiny())
    assert len(reads) == 2  # 2 epochs x 4 steps

    model = tiny()
    step = TrainStep(model, make_optimizer(model, 0.0))  # lr 0: the weights stay put
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    model.eval()  # batch norm statistics fixed, so the hand computation sees the same net
    step.step(x, y, 0.0)
    step.step(x[:4], y[:4], 0.0)
    with torch.no_grad():
        logits, loss6 = loss_of(model(x), y, 0.3)
        _, loss4 = loss_of(model(x[:4]), y[:4], 0.3)
    hits = (logits.argmax(1) == y).sum().item() + (logits[:4].argmax(1) == y[:4]).sum().item()
    r = step.read()
    assert r["seen"] == 10 and r["correct"] == hits and r["bad_step"] == 0
    assert r["loss_sum"] == pytest.approx(6 * loss6.item() + 4 * loss4.item(), rel=1e-6)


def test_adamw_takes_the_first_step_of_its_definition_by_hand():
    """AdamW's first step, by hand (Loshchilov and Hutter): bias-corrected moments are g and
    g squared, so each weight moves by lr x g / (|g| + eps), and a decayed weight also
    shrinks by lr x weight_decay before it; biases and batch norm are not decayed."""
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, 0.01, weight_decay=0.1, opt="adamw")
    assert isinstance(opt, torch.optim.AdamW)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        decay = 0.1 if w.ndim > 1 else 0.0
        expected = w * (1 - 0.01 * decay) - 0.01 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="opt must be one of sgd, adamw; got 'adam'"):
        make_optimizer(model, 0.01, opt="adam")


def test_a_non_finite_loss_is_found_at_the_next_read_with_its_step():
    model = tiny()
    step = TrainStep(model, make_optimizer(model, 0.1))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    step.step(x, y, 0.1)
    step.step(torch.full_like(x, float("inf")), y, 0.1)
    step.step(x, y, 0.1)
    r = step.read()
    assert r["bad_step"] == 2 and r["bad_loss"] != r["bad_loss"]  # NaN, at the second step


def test_phases_split_a_step_into_forward_backward_optimizer():
    model = tiny()
    step = TrainStep(model, make_optimizer(model, 0.1))
    before = model[0].weight.clone()
    parts = step.phases(torch.randn(8, 1, 8, 8), torch.arange(8), 0.1)
    assert list(parts) == ["forward", "backward", "optimizer"]
    assert all(v > 0 for v in parts.values())
    assert not torch.equal(before, model[0].weight) and step.read()["seen"] == 8


def test_grouped_conv_choices_say_what_runs_where(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_grouped_conv("auto", cpu.type) == "native"
    assert resolve_grouped_conv("auto", "cuda", compile="default") == "native"
    with pytest.raises(ValueError, match="grouped_conv 'triton' runs on CUDA GPUs; got device "
                                         "cpu"):
        resolve_grouped_conv("triton", cpu.type)
    with pytest.raises(ValueError, match="grouped_conv must be one of"):
        resolve_grouped_conv("cudnn", cpu.type)


def test_auto_on_cuda_is_the_native_path_until_a_gpu_run_verifies_the_kernels(monkeypatch):
    """A CUDA model built with the defaults has no Triton lowering in it: `auto` resolves
    to native on CUDA (the device check faked: no GPU here), and optimize_for_inference's
    `auto` offers no Triton path; one line, TRITON_VERIFIED_ON_GPU, switches both."""
    from deeproots.speed import paths as P
    from deeproots.speed import deploy
    from deeproots.kernels.modules import DispatchConv2d, TritonConv2d

    cuda = torch.device("cuda")
    assert resolve_grouped_conv("auto", cuda.type) == "native"
    model = deeproots.create_model("nin-root-8")
    step = TrainStep(model, make_optimizer(model, 0.1), grouped_conv="auto")  # on the CPU
    monkeypatch.setattr(step, "device", cuda)
    assert step.grouped_conv == "native" and not any(
        isinstance(m, (TritonConv2d, DispatchConv2d)) for m in model.modules())
    f32 = torch.float32

    def offered_on_cuda():  # what optimize_for_inference(..., "auto") measures on a GPU
        return [name for name, row in P.PATHS_TABLE.items()
                if "cuda" in row.devices and deploy._in_auto(row, cuda, f32)]

    assert offered_on_cuda() == ["fold", "script"]
    on_cpu = [n for n, row in P.PATHS_TABLE.items()
              if deploy._in_auto(row, torch.device("cpu"), f32)]
    assert "dispatch" in on_cpu  # on a CPU the dispatch runs PyTorch's own lowerings
    # the switch, once a GPU run has shown them correct and faster
    monkeypatch.setattr(P, "TRITON_VERIFIED_ON_GPU", True)  # the one line
    assert resolve_grouped_conv("auto", cuda.type) == ("dispatch" if _triton() else "native")
    assert offered_on_cuda() == ["fold", "script", "triton", "dispatch", "fused", "cudagraph"]


def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(data_dir, tmp_path,
                                                                   monkeypatch):
    def broken(fn, mode=None):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nlong traceback follows")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ "
                                            r"compiler found\); training eagerly"):
        summary = train(_cfg(data_dir, tmp_path / "a", epochs=1, compile="default"),
                        model=tiny())
    plain = train(_cfg(data_dir, tmp_path / "b", epochs=1), model=tiny())
    assert summary.compile_error == "RuntimeError: no C++ compiler found"
    assert summary.compile_s is None and summary.top1 == plain.top1  # the same eager run


def test_out_of_memory_names_the_largest_batch_that_fit(data_dir, tmp_path):
    class Small(nn.Module):  # runs out of "memory" above 4 images
        def __init__(self):
            super().__init__()
            self.net = tiny()

        def forward(self, x):
            if len(x) > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return self.net(x)

    with pytest.raises(ValueError, match=r"batch size 16 per process does not fit in the memory "
                                         r"of cpu .*the largest batch that fit, halving: 4\. "
                                         r"Use --batch-size 4$"):
        train(_cfg(data_dir, tmp_path, epochs=1), model=Small())
    assert not (tmp_path / "last.pt").exists()


def test_compiled_training_reports_its_compile_time_and_resumes(data_dir, tmp_path):
    """torch.compile on the CPU: the first step's compile time is reported, and a run
    interrupted mid-epoch and resumed (compiling again) ends with the weights of the
    uninterrupted compiled run (docs/training.md states the tolerance: equal to 1e-6)."""
    a = train(_cfg(data_dir, tmp_path / "a", epochs=2, compile="default"), model=tiny())
    assert a.compile_s is not None and a.compile_s > 0 and a.compile_error is None
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["compile_s"] == a.compile_s and records[1]["compile_s"] is None

    def stop_at_step_6(info):
        if info["global_step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(_cfg(data_dir, tmp_path / "b", epochs=2, compile="default"), model=tiny(),
              callbacks=[stop_at_step_6])
    train(_cfg(data_dir, tmp_path / "b", epochs=2, compile="default", resume=True),
          model=tiny())
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-6, atol=1e-6), k
    eager = train(_cfg(data_dir, tmp_path / "c", epochs=2), model=tiny())
    we = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), we[k].float(), rtol=1e-3, atol=1e-4) for k in wa)
    assert eager.top1 == pytest.approx(a.top1, abs=1 / 32)


def test_training_with_the_triton_kernels_follows_the_native_run(data_dir, tmp_path):
    """train --grouped-conv triton, end to end under Triton's CPU interpreter: the grouped
    conv's forward and backward run in deeproots' kernels, and after 4 SGD steps the weights
    are those of the run with PyTorch's own conv, to float32 rounding."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels under TRITON_INTERPRET=1 (set by conftest without a GPU)")
    short = dict(epochs=1, limit_eval_batches=1)
    kernels = train(_cfg(data_dir, tmp_path / "t", grouped_conv="triton", **short), model=tiny())
    native = train(_cfg(data_dir, tmp_path / "n", grouped_conv="native", **short), model=tiny())
    assert kernels.grouped_conv == "triton" and native.grouped_conv == "native"
    wt = torch.load(tmp_path / "t" / "last.pt", weights_only=True)["model"]
    wn = torch.load(tmp_path / "n" / "last.pt", weights_only=True)["model"]
    assert list(wt) == list(wn)  # the same parameter names: checkpoints are interchangeable
    for k in wn:
        assert torch.allclose(wt[k].float(), wn[k].float(), rtol=1e-4, atol=1e-5), k
