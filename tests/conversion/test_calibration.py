"""A trained CNN converted into a root network with calibration: the assignment, the
permutations folded into the neighbours, the least-squares refit, batch norms kept or
re-estimated;
checked against hand-made cases and a numpy solve; then the command line, distillation and
learning to be groupable, on small files."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deeproots
from deeproots.conversion.calibrate import assign_groups, calibrate, fold_permutations, refit_grouped, refit_pointwise, root_sites
from deeproots.models.layers import block_diagonal_weight, conv_layers, regroup
from deeproots.cli import main
from deeproots.training.objectives import GroupLasso, distillation_loss
from deeproots.training.checkpoint import load_checkpoint
from deeproots.training.loop import train
from helpers import run_cli, train_cfg, trained_like, write_fashion_mnist, write_image_folder


def test_permutations_folded_into_the_neighbours_leave_the_model_unchanged():
    """NiN's conv2a and conv3a: their input permutations go into conv1c / conv2c (and the
    batch norms between), their output permutations into conv2b / conv3b; the dense model
    computes what it computed (before any block is cut)."""
    model = trained_like("nin", in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    sites = root_sites(model, ["conv2a", "conv3a"])
    assert (sites["conv2a"].producer, sites["conv2a"].consumer) == ("conv1c", "conv2b")
    assert sites["conv2a"].before == ["conv1c.bn", "conv1c.act", "pool1"]
    g = torch.Generator().manual_seed(0)
    fold_permutations(model, sites["conv2a"], torch.randperm(96, generator=g),
                      torch.randperm(192, generator=g))
    fold_permutations(model, sites["conv3a"], torch.randperm(192, generator=g),
                      torch.randperm(192, generator=g))
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)


def test_a_residual_add_fixes_the_order_it_reads():
    """A basic block's first conv reads the residual stream (also used by the add) and its
    second writes into the add: those sides keep their order, and the report says why."""
    import zoo

    sites = root_sites(zoo.ResNet18ish(), ["layer1.0.conv1", "layer1.0.conv2"])
    first, second = sites["layer1.0.conv1"], sites["layer1.0.conv2"]
    assert first.producer is None and "residual add" in first.fixed_in
    assert first.consumer == "layer1.0.conv2"  # through bn1 and the ReLU
    assert second.consumer is None and "go to add" in second.fixed_out
    bottleneck = root_sites(deeproots.create_model("resnet50").eval(), ["layer1.0.conv2"])
    assert bottleneck["layer1.0.conv2"].producer == "layer1.0.conv1"
    assert bottleneck["layer1.0.conv2"].consumer == "layer1.0.conv3"


def permuted_blocks(g: int, cin: int, cout: int) -> torch.Tensor:
    """A 3x3 conv weight that is block-diagonal in ``g`` groups once its filters and input
    channels are put in some order (here shuffled): a cut that loses nothing exists."""
    block = torch.zeros(cout, cin, 3, 3)
    o, i = cout // g, cin // g
    for k in range(g):
        block[k * o:(k + 1) * o, k * i:(k + 1) * i] = torch.randn(o, i, 3, 3)
    return block[torch.randperm(cout)][:, torch.randperm(cin)]


def test_a_conv_block_diagonal_under_a_permutation_is_converted_with_zero_error():
    torch.manual_seed(0)
    g, cin, cout = 4, 8, 16
    weight = permuted_blocks(g, cin, cout)
    model = nn.Sequential(nn.Conv2d(3, cin, 1), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(cout, 5, 1))
    with torch.no_grad():
        model[2].weight.copy_(weight)
        model[2].bias.zero_()
    x = torch.randn(64, 3, 6, 6)
    new, report = calibrate(model.eval(), {"2": g}, [x], refit="root", ridge=0.0)
    layer = report.layers[0]
    assert layer.weight_kept == pytest.approx(1.0) and layer.output_kept == pytest.approx(1.0)
    assert layer.weight_kept_plain < 0.5 and layer.permuted_in and layer.permuted_out
    assert new[2].groups == g
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=1e-4)


def test_batch_norms_keep_their_trained_statistics_unless_reestimated_is_asked():
    """A grouped conv block-diagonal under a permutation, between batch norms whose running
    statistics are far from the calibration images' (a model whose statistics drifted in
    training): kept (the default), the conversion computes exactly what the model did;
    re-estimated, the batch norm after the grouped conv holds the calibration images' mean
    and variance of its input (computed here by hand from the trained layers) and the
    model's outputs move."""
    torch.manual_seed(0)
    g, cin, cout = 4, 8, 16
    weight = permuted_blocks(g, cin, cout)
    model = nn.Sequential(nn.Conv2d(3, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(),
                          nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                          nn.ReLU(), nn.Conv2d(cout, 5, 1, bias=False), nn.BatchNorm2d(5))
    with torch.no_grad():
        model[3].weight.copy_(weight)
        for bn in (model[1], model[4], model[7]):
            bn.running_mean.copy_(torch.randn(bn.num_features) + 1.0)
            bn.running_var.copy_(torch.rand(bn.num_features) + 2.0)
    model.eval()
    x = torch.randn(64, 3, 6, 6)
    new, report = calibrate(model, {"3": g}, [x], refit="root", ridge=0.0)
    assert report.batchnorm == "keep" and report.batchnorms == 0
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=1e-4)
        for i in (1, 4, 7):  # the trained statistics, in the channel orders the cut chose
            assert torch.equal(torch.sort(new[i].running_var)[0],
                               torch.sort(model[i].running_var)[0])
    again, report = calibrate(model, {"3": g}, [x], refit="root", ridge=0.0,
                              batchnorm="reestimate")
    assert report.batchnorms == 2  # those after the first grouped conv
    with torch.no_grad():
        y = model[:4](x)  # the grouped conv's input from the trained layers, then its output
        assert torch.allclose(torch.sort(again[4].running_mean)[0],
                              torch.sort(y.mean((0, 2, 3)))[0], atol=1e-4)
        assert torch.allclose(torch.sort(again[4].running_var)[0],
                              torch.sort(y.var((0, 2, 3)))[0], rtol=1e-3)
        assert torch.equal(torch.sort(again[1].running_mean)[0],
                           torch.sort(model[1].running_mean)[0])  # before it: kept
        assert not torch.allclose(again(x), model(x), atol=1e-2)


def test_the_assignment_keeps_the_most_weight_and_respects_a_fixed_side():
    rng = np.random.default_rng(0)
    score = rng.random((8, 8))
    rows, cols, kept = assign_groups(score, 2)
    assert sorted(np.bincount(rows)) == [4, 4] and sorted(np.bincount(cols)) == [4, 4]
    plain = score[:4, :4].sum() + score[4:, 4:].sum()
    assert kept * score.sum() >= plain - 1e-9
    rows, cols, _ = assign_groups(score, 2, fix_cols=True)
    assert list(cols) == [0] * 4 + [1] * 4  # the inputs keep their order


def test_the_least_squares_refit_equals_a_numpy_solve():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    new = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    batches = [torch.randn(5, 3, 4, 4) for _ in range(3)]
    refit_pointwise(dense, new, "2", batches, ridge=0.0)
    with torch.no_grad():
        xs = np.concatenate([F.relu(new[0](b)).permute(0, 2, 3, 1).reshape(-1, 6).numpy()
                             for b in batches])
        ys = np.concatenate([dense(b).permute(0, 2, 3, 1).reshape(-1, 4).numpy()
                             for b in batches])
    a = np.concatenate([xs, np.ones((len(xs), 1))], 1)
    solution, *_ = np.linalg.lstsq(a, ys, rcond=None)
    assert np.allclose(new[2].weight.detach().numpy().reshape(4, 6), solution[:6].T, atol=1e-4)
    assert np.allclose(new[2].bias.detach().numpy(), solution[6], atol=1e-4)


def test_the_grouped_refit_equals_a_numpy_solve_per_group():
    """Each group's filters fit, from the group's own input channels (im2col by hand with
    numpy: a 3x3 window, stride 2, padding 1), to the dense conv's outputs of those filters,
    with a constant term; the off-diagonal part the cut dropped is what they take over."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1)).eval()
    new = copy.deepcopy(dense)
    regroup(new[2], 2, reinit=False)  # the cut: its diagonal blocks
    with torch.no_grad():
        new[2].weight.copy_(block_diagonal_weight(dense[2].weight.detach(), 2))
    batches = [torch.randn(8, 2, 9, 9) for _ in range(6)]  # 1,200 pixels for 19 weights
    with torch.no_grad():
        before = sum(float((new(b) - dense(b)).pow(2).sum()) for b in batches)
    unexplained = refit_grouped(dense, new, "2", batches, ridge=0.0)
    with torch.no_grad():
        x = np.concatenate([F.relu(dense[0](b)).numpy() for b in batches])
        y = np.concatenate([dense(b).numpy() for b in batches])
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for g in range(2):
        rows, targets = [], []
        for n in range(len(x)):
            for i in range(5):
                for j in range(5):
                    patch = xp[n, 2 * g:2 * g + 2, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                    rows.append(np.append(patch.reshape(-1), 1.0))
                    targets.append(y[n, 3 * g:3 * g + 3, i, j])
        solution, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
        got = new[2].weight.detach().numpy()[3 * g:3 * g + 3].reshape(3, -1)
        assert np.allclose(got, solution[:-1].T, atol=1e-4)
        assert np.allclose(new[2].bias.detach().numpy()[3 * g:3 * g + 3], solution[-1],
                           atol=1e-4)
    with torch.no_grad():
        after = sum(float((new(b) - dense(b)).pow(2).sum()) for b in batches)
        bias = dense[2].bias.view(1, -1, 1, 1)
        energy = sum(float((dense(b) - bias).pow(2).sum()) for b in batches)
    assert after < before and unexplained == pytest.approx(after / energy, rel=1e-3)


def test_a_conv_without_bias_is_refit_without_one():
    """Never a parameter the model lacks (it must load into its own class): before a batch
    norm the constant is fit and taken off the batch norm's running mean (numpy's least
    squares with a constant column gives both); elsewhere the fit has no constant."""
    torch.manual_seed(0)
    batches = [torch.randn(5, 3, 4, 4) for _ in range(3)]

    def nets(norm):
        tail = [nn.BatchNorm2d(4)] if norm else []
        return [nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1, bias=False),
                              *tail).eval() for _ in range(2)]

    def solve(new, dense, constant):
        with torch.no_grad():
            xs = np.concatenate([F.relu(new[0](b)).permute(0, 2, 3, 1).reshape(-1, 6).numpy()
                                 for b in batches])
            ys = np.concatenate([dense[2](F.relu(dense[0](b))).permute(0, 2, 3, 1)
                                 .reshape(-1, 4).numpy() for b in batches])
        a = np.concatenate([xs, np.ones((len(xs), 1))], 1) if constant else xs
        solution = np.linalg.lstsq(a, ys, rcond=None)[0]
        return solution[:6].T, (solution[6] if constant else None)

    for norm in (True, False):
        dense, new = nets(norm)
        new[0].bias.data += 0.5  # the 1x1's inputs moved: its fit needs a constant
        if norm:
            new[3].running_mean.fill_(0.25)
        refit_pointwise(dense, new, "2", batches, ridge=0.0)
        assert new[2].bias is None and not new.training
        got = new[2].weight.detach().numpy().reshape(4, 6)
        weight, constant = solve(new, dense, constant=norm)
        assert np.allclose(got, weight, atol=1e-4)
        assert not np.allclose(got, solve(new, dense, constant=not norm)[0], atol=1e-3)
        if norm:  # the batch norm reads what the conv with that constant would give it
            assert np.allclose(new[3].running_mean.numpy(), 0.25 - constant, atol=1e-4)
            assert np.abs(constant).max() > 1e-2


def test_distillation_loss_by_hand():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = torch.softmax(t / 2, 1)
    q = torch.log_softmax(s / 2, 1)
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(
        4 * float((p * (p.log() - q)).sum()), rel=1e-6)


def test_the_group_lasso_penalises_only_the_weights_outside_the_blocks():
    conv = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1) + 0.1)
    model = nn.Sequential(conv)
    lasso = GroupLasso(model, {"0": 2}, weight=1.0)
    mask = lasso.masks["0"]
    assert int(mask.sum()) == 8  # half of the 16 kernels lie outside 2 blocks of 2 x 2
    norms = conv.weight.detach().abs().view(4, 4)
    assert lasso().item() == pytest.approx(float((norms * mask).sum()), rel=1e-5)
    assert 0.5 < lasso.kept()["0"] < 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    write_fashion_mnist(root / "data", n_train=64, n_test=32, size=8)
    train(train_cfg(root / "data", root / "dense", model="nin", epochs=2))
    return root


def test_rootify_a_checkpoint_then_fine_tune_it_with_distillation(trained, capsys):
    data, ckpt = str(trained / "data"), str(trained / "dense" / "best.pt")
    out = trained / "converted.pt"
    assert main(["rootify", ckpt, "--schedule", "root-8", "--data", "fashion-mnist",
                 "--data-dir", data, "--calibration-images", "48", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["top1_before"] <= 1 and 0 <= result["top1_after"] <= 1
    assert list(result["stages"]) == ["block-diagonal", "+ permutation", "+ refit"]
    assert main(["rootify", ckpt, "--schedule", "root-8", "--data-dir", data,
                 "--calibration-images", "48", "--batchnorm", "reestimate", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)  # the batch norms re-estimated: a stage more
    assert list(again["stages"]) == ["block-diagonal", "+ permutation", "+ batch norm",
                                     "+ refit"]
    state = load_checkpoint(out)
    assert state["model_cfg"]["groups"] == {"conv2a": 8, "conv3a": 4}  # nin-root-8's
    assert main(["eval", str(out), "--data-dir", data, "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(result["top1_after"])
    run = trained / "finetune"
    assert main(["train", "--init", str(out), "--distill", ckpt, "--data", "fashion-mnist",
                 "--data-dir", data, "--batch-size", "16", "--out", str(run), "--device",
                 "cpu", "--no-progress", "--allocator", "system"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["init"] == str(out) and summary["config"]["distill"] == ckpt
    assert summary["config"]["epochs"] == 1  # a fine-tune: by AdamW at 3e-4
    assert (summary["config"]["opt"], summary["config"]["lr"]) == ("adamw", 3e-4)
    assert 0 <= summary["top1"] <= 1
    weights = load_checkpoint(run / "last.pt")
    assert weights["model_cfg"]["groups"] == {"conv2a": 8, "conv3a": 4}
    # the same cost as the registered root variant
    model = deeproots.create_model("nin-root-8", in_channels=1)
    assert summary["macs"] == deeproots.profile(model, (1, 8, 8)).macs


def test_learn_groups_trains_a_groupable_model_and_converts_it(trained):
    run = trained / "learned"
    summary = train(train_cfg(trained / "data", run, model="nin", epochs=2,
                              learn_groups="root-8", group_lasso=1e-2))
    learned = summary.learned_groups
    assert set(learned["weight_kept"]) == {"conv2a", "conv3a"}
    assert learned["top1_after"] is not None and (run / "converted.pt").exists()
    assert load_checkpoint(run / "converted.pt")["model_cfg"]["groups"] == {"conv2a": 8,
                                                                          "conv3a": 4}


@pytest.mark.parametrize("argv, phrase", [
    (["rootify", "{dense}", "--schedule", "root-1", "--data-dir", "{data}",
      "--calibration-images", "32"],
     "schedule root-1 groups no conv of NiN"),
    (["rootify", "{dense}", "--schedule", "root-8", "--data", "cifar10", "--data-dir",
      "{data}", "--calibration-images", "32", "--no-download"],
     "takes 1-channel images and cifar10 has 3-channel ones"),  # before its files are sought
    (["rootify", "{dense}", "--schedule", "root-8", "--data-dir", "{data}",
      "--calibration-images", "100000"], "100000 calibration images asked for"),
    (["rootify", "nin", "--schedule", "root-8", "--out", "{tmp}/x.pt"],
     "--out calibrates a trained model: give a checkpoint"),
    (["rootify", "nin", "--schedule", "root-8", "--batchnorm", "reestimate"],
     "--batchnorm calibrates a trained model: give a checkpoint"),
    (["rootify", "nin", "--schedule", "root-8", "--batchnorm", "keep"],  # the default, said
     "--batchnorm calibrates a trained model: give a checkpoint"),
    (["rootify", "{dense}", "--sensitivity", "--batchnorm", "reestimate", "--data-dir",
      "{data}"], "--batchnorm reestimate sets how a conversion treats the batch norms"),
    (["train", "--init", "{tmp}/none.pt", "--data-dir", "{data}", "--out", "{tmp}/r"],
     "init {tmp}/none.pt: no such checkpoint file"),
    (["train", "nin-root-8", "--distill", "{other}", "--data-dir", "{data}", "--out",
      "{tmp}/r2", "--batch-size", "16", "--device", "cpu"],
     "the teacher has 5 classes but fashion-mnist has 10"),
    (["train", "nin", "--learn-groups", "root-8", "--rootify", "root-8"],
     "learn_groups trains a dense model to be groupable"),
    (["train", "nin-root-8", "--distill-weight", "1.5", "--out", "{tmp}/r3"],
     "distill_weight must be a finite number from 0 to 1; got 1.5"),
    (["train", "nin-root-8", "--distill-temperature", "0", "--out", "{tmp}/r4"],
     "distill_temperature must be a finite number from 0.1 to 100; got 0.0"),
    (["train", "nin", "--group-lasso", "-1", "--out", "{tmp}/r5"],
     "group_lasso must be a finite number from 0 to 1; got -1.0"),
    (["rootify", "{dense}", "--schedule", "root-8", "--calibration-images", "0"],
     "--calibration-images must be a whole number >= 1; got 0"),
    # what a hostile user found: tracebacks, late refusals, unclear or silent answers
    (["rootify", "{nan}", "--schedule", "root-8", "--data-dir", "{data}"],
     "conv1a.conv.weight holds NaN; a model whose weights are not finite"),
    (["rootify", "{inf}", "--schedule", "root-8", "--data-dir", "{data}"],
     "holds infinity"),
    (["rootify", "{negvar}", "--schedule", "root-8", "--data-dir", "{data}"],
     "batch norm conv1a.bn has a negative running variance (-1)"),
    # a folder of RGB images is read in greyscale for a Fashion-MNIST model; its 4 classes
    # are not the model's 10
    (["rootify", "{dense}", "--schedule", "root-8", "--data", "imagefolder:{imgs}"],
     "has 10 classes but imagefolder:{imgs} has 4: calibrate on the data it was trained on"),
    (["rootify", "{dense}", "--schedule", "root-8", "--out", "{tmp}/nosuchdir/sub/F.pt"],
     "--out {tmp}/nosuchdir/sub/F.pt: the folder {tmp}/nosuchdir/sub does not exist"),
    (["rootify", "{tmp}/bst.pt", "--schedule", "root-8", "--out", "{tmp}/x.pt"],
     "checkpoint {tmp}/bst.pt: no such file"),
    (["train", "nin", "--group-lasso", "1e30", "--out", "{tmp}/r6"],
     "group_lasso must be a finite number from 0 to 1; got 1e+30"),
    (["train", "nin", "--distill-temperature", "1e-300", "--distill", "{dense}", "--out",
      "{tmp}/r7"], "distill_temperature must be a finite number from 0.1 to 100; got 1e-300"),
    (["train", "nin", "--group-lasso", "0.01", "--out", "{tmp}/r8"],
     "group_lasso = 0.01 sets the --learn-groups part of training, but learn_groups is not "
     "given"),
    (["train", "nin", "--distill-weight", "0.9", "--out", "{tmp}/r9"],
     "distill_weight = 0.9 sets the --distill part of training"),
    (["train", "nin", "--distill-temperature", "2", "--out", "{tmp}/r10"],
     "distill_temperature = 2.0 sets the --distill part of training"),
    (["train", "nin-root-8", "--learn-groups", "root-16", "--data-dir", "{data}", "--out",
      "{tmp}/r11", "--device", "cpu", "--batch-size", "16"],
     "its spatial convs are grouped already (conv2a, conv3a): --learn-groups trains a dense "
     "model, so give the dense one (e.g. nin)"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys, argv, phrase):
    other = trained / "other.pt"
    if not other.exists():  # a teacher of other classes
        state = load_checkpoint(trained / "dense" / "best.pt")
        model = deeproots.create_model("nin", in_channels=1, num_classes=5)
        state["model"] = model.state_dict()
        state["model_cfg"] = {"name": "nin", "kwargs": {"in_channels": 1, "num_classes": 5}}
        torch.save(state, other)
    values = {"dense": trained / "dense" / "best.pt", "data": trained / "data",
              "tmp": tmp_path, "other": other, **_broken(trained)}
    rc, err = run_cli([a.format(**values) for a in argv], capsys)
    err = err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert phrase.format(**values) in err[0], err[0]
    assert not list(tmp_path.iterdir())


def _broken(trained):
    """Checkpoints no conversion can start from (made once), and a small image folder."""
    files = {k: trained / f"{k}.pt" for k in ("nan", "inf", "negvar")}
    if not files["nan"].exists():
        for kind, path in files.items():
            state = load_checkpoint(trained / "dense" / "best.pt")
            if kind == "negvar":
                state["model"]["conv1a.bn.running_var"][0] = -1.0
            else:
                state["model"]["conv1a.conv.weight"][0, 0, 0, 0] = float(kind)
            torch.save(state, path)
        write_image_folder(trained / "imgs", classes=4, per_class=5, size=8)
    return {**files, "imgs": trained / "imgs"}


def test_a_finetune_goes_to_a_folder_of_its_own():
    """Without --out, a run from --init (or --learn-groups) never lands in the folder of the
    run it came from (runs/nin-fashion-mnist-seed0)."""
    from pathlib import Path

    from deeproots.config import TrainConfig
    from deeproots.training.run import default_out

    assert default_out(TrainConfig(model="nin")) == Path("runs/nin-fashion-mnist-seed0")
    assert default_out(TrainConfig(init="/x/nin root8.pt")) == Path(
        "runs/nin-root8-finetune-fashion-mnist-seed0")
    assert default_out(TrainConfig(model="nin", learn_groups="root-8", seed=2)) == Path(
        "runs/nin-groupable-root-8-fashion-mnist-seed2")


def test_a_refit_whose_inputs_are_all_zero_gives_them_no_weight():
    """Dead channels (a ReLU that never fires on the calibration images: an undertrained
    ResNet-50 has whole groups of them) made the normal equations singular. By hand: y =
    2 x1 + 3 with x2 always 0 gives weights (2, 0) and constant 3; all inputs zero gives
    weights 0 and the mean of y as the constant."""
    from deeproots.conversion.calibrate.refit import ridge_solve

    x1 = torch.linspace(-1, 1, 50, dtype=torch.float64)
    a = torch.stack([x1, torch.zeros_like(x1), torch.ones_like(x1)], 1)
    y = (2 * x1 + 3)[:, None]
    solution, _ = ridge_solve(a.T @ a, a.T @ y, 1e-9, intercept=True)
    assert solution[:, 0].tolist() == pytest.approx([2, 0, 3], abs=1e-6)
    dead = torch.cat([torch.zeros(50, 2, dtype=torch.float64), a[:, 2:]], 1)
    solution, _ = ridge_solve(dead.T @ dead, dead.T @ y, 1e-4, intercept=True)
    assert solution[:, 0].tolist() == pytest.approx([0, 0, 3], abs=1e-9)


def test_a_layer_given_fewer_pixels_than_its_weights_need_is_not_refit():
    """A 1x1 conv of 16 inputs fits 17 weights a filter: 10 images at 1x1 px (10 pixels, as
    the last stage of a ResNet-50 at 28x28 px) are too few, and the layer is left exactly as
    it was; at 8x8 px (640 pixels, more than 8 x 17) it is refit, to the dense weights."""
    from deeproots.conversion.calibrate.refit import MIN_PIXELS_PER_WEIGHT

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(16, 4, 1)).eval()
    new = copy.deepcopy(dense)
    with torch.no_grad():
        new[0].weight.add_(0.5)
    before = new[0].weight.clone()
    assert 10 < MIN_PIXELS_PER_WEIGHT * 17 <= 640
    assert refit_pointwise(dense, new, "0", [torch.randn(10, 16, 1, 1)]) is None
    assert torch.equal(new[0].weight, before)
    unexplained = refit_pointwise(dense, new, "0", [torch.randn(10, 16, 8, 8)], ridge=0.0)
    assert unexplained == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(new[0].weight, dense[0].weight, atol=1e-4, rtol=0)


def test_a_refit_from_fewer_pixels_than_its_weights_is_named_with_the_images_it_needs():
    """3 calibration images of 28x28 px (accepted without a word; on the one-epoch nin,
    root-8 converted to 0.60 top-1 from 0.89, its report showing 0.00% unexplained). By
    hand: nin's conv3a writes 7x7 px, 147 pixels from 3 images, and at root-8's 4 groups a
    filter fits 192 / 4 x 3 x 3 + 1 = 433 weights; conv3b, the 1x1 after it, 192 + 1 = 193.
    conv2a (14x14 px: 588 pixels, 96 / 8 x 5 x 5 + 1 = 301 weights) and conv2b (193) have
    enough. 8 pixels a weight: 8 x 433 / 49 -> 71 images. With 71, nothing is named."""
    from deeproots.conversion.rule import rootify

    torch.manual_seed(0)
    model = deeproots.create_model("nin", in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    _, report = rootify(model, "root-8", example_input=x[:1], calibration=x)
    assert report.calibration.underdetermined == {"conv3a": (147, 433, 71),
                                                  "conv3b": (147, 193, 32)}
    assert report.calibration.table().splitlines()[-1] == (
        "refit from fewer calibration pixels than the weights a filter fits (the fit "
        "memorises these images; its unexplained share is measured on them): conv3a 147 "
        "pixels for 433 weights, conv3b 147 pixels for 193 weights. --calibration-images 71 "
        "or more gives each of them 8 pixels a weight")
    x = torch.randn(71, 1, 28, 28)
    _, report = rootify(model, "root-8", example_input=x[:1], calibration=x)
    assert report.calibration.underdetermined == {}


def test_conversions_sharing_the_dense_passes_compute_what_each_alone_computes():
    """A budgeted conversion checks layers converted alone, then converts its candidates,
    all of one model on one set of images: given as DensePasses, what the trained model
    computes (each conv's input energy, the layers before the first grouped conv, the refit
    targets) is computed once, and each conversion is the one it was without them (the
    same weights, the same outputs). Counted by a hook on the trained copy's first conv:
    three passes over the images in each check, one batch in the conversion after them."""
    from deeproots.conversion.calibrate import DensePasses, calibration_batches

    model = trained_like("nin", in_channels=1)
    before = copy.deepcopy(model.state_dict())
    images = torch.randn(96, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    passes = DensePasses(model, images)
    ran = []
    first = conv_layers(passes.dense)["conv1a"]
    first.register_forward_hook(lambda m, a, out: ran.append(len(a[0])))
    for changes in ({"conv3a": 2}, {"conv2a": 4}):  # the checks
        shared, _ = calibrate(model, changes, passes, refit="root")
        alone, _ = calibrate(model, changes, calibration_batches(images), refit="root")
        for k, v in alone.state_dict().items():
            assert torch.allclose(shared.state_dict()[k], v, rtol=1e-5, atol=1e-6), k
    ran.clear()
    shared, report = deeproots.rootify(model, {"conv2a": 4, "conv3a": 2},
                                       example_input=images[:1], calibration=passes)
    # the trained copy's first layer ran on one batch (the sampled inputs the report's output
    # energy is measured on), not on every batch for each pass as a conversion alone does
    assert ran == [len(passes.batches()[0])]
    alone, report_alone = deeproots.rootify(model, {"conv2a": 4, "conv3a": 2},
                                            example_input=images[:1], calibration=images)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(shared(x), alone(x), rtol=1e-4, atol=1e-5)
    assert report.calibration.refits == pytest.approx(report_alone.calibration.refits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="made for another model"):
        calibrate(trained_like("nin", in_channels=1), {"conv3a": 2}, passes)
    with torch.no_grad():  # a step of training, in place: the passes are stale
        conv_layers(model)["conv1a"].weight.mul_(1.5)
    with pytest.raises(ValueError, match="weights changed since its DensePasses were made"):
        deeproots.rootify(model, "root-4", example_input=images[:1], calibration=passes)


def test_a_calibrated_conversion_counts_its_costs_at_the_calibration_images_size():
    """Calibrated on 16x16 images, the report counts the model at 1x16x16 (the profile of
    the converted model at that size), not at the model's default 32x32; and a model of
    your own with no default size needs no example_input when calibration images are
    given."""
    model = trained_like("nin", in_channels=1)
    images = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    new, report = deeproots.rootify(model, "root-4", calibration=images)
    assert report.input_size == (1, 16, 16)
    assert report.macs_after == deeproots.profile(new, (1, 16, 16)).macs
    mine = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()
    new, report = deeproots.rootify(mine, "root-2", calibration=images)
    assert report.groups["3"] == 2 and new[3].groups == 2
    assert report.macs_after == deeproots.profile(new, (1, 16, 16)).macs


def test_a_conv_subclass_grouped_but_not_refit_is_named_and_keeps_its_diagonal_blocks():
    """tests/zoo.py's SubclassNet: a conv that rescales its output by a gain after its
    F.conv2d call is grouped (what it computes is its block-diagonal form) but not refit
    (no fit of its weight alone gives its output): the report names it, its table says so,
    and its weight is the dense one's diagonal blocks (no permutation either: torch.fx
    cannot trace the model, whose SAME padding is arithmetic on shapes). The SAME-padded
    conv is refit: its weight is no longer its diagonal blocks."""
    import zoo

    torch.manual_seed(0)
    model = zoo.SubclassNet().eval()
    new, report = deeproots.rootify(model, "root-8", calibration=torch.randn(16, 3, 32, 32))
    assert report.calibration.not_refit == ["gained"]
    assert "not refit within their groups" in report.calibration.table()
    assert type(new.gained) is zoo.GainConv2d and new.gained.groups == 8
    assert torch.equal(new.gained.weight, block_diagonal_weight(model.gained.weight, 8))
    assert type(new.same) is zoo.SamePadConv2d and new.same.groups == 8
    assert not torch.equal(new.same.weight, block_diagonal_weight(model.same.weight, 8))


def test_the_patches_a_conv_reads_wherever_it_pads():
    """conv_patches against F.unfold of the input padded by hand: a conv that pads in its
    own forward (SAME, stride 2 on 8 px: (2 - 1) * 2 + 3 - 8 = 1 pixel, at the end), one with
    padding="same", one that pads by reflection; None for one that rescales its output."""
    import zoo
    from deeproots.conversion.calibrate import conv_patches

    x = torch.randn(2, 4, 8, 8)
    same = zoo.SamePadConv2d(4, 8, 3, stride=2)
    assert torch.equal(conv_patches(same, x), F.unfold(F.pad(x, [0, 1, 0, 1]), 3, stride=2))
    with torch.no_grad():  # the patches are what it convolves
        assert torch.allclose(same(x).flatten(2),
                              same.weight.flatten(1) @ conv_patches(same, x), atol=1e-5)
    assert torch.equal(conv_patches(nn.Conv2d(4, 8, 3, padding="same"), x),
                       F.unfold(x, 3, padding=1))
    assert torch.equal(conv_patches(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), x),
                       F.unfold(F.pad(x, [1, 1, 1, 1], mode="reflect"), 3))
    assert conv_patches(zoo.GainConv2d(4, 8), x) is None


def test_the_patches_of_a_conv_that_calls_torch_conv2d_itself_while_another_thread_convolves():
    """A conv whose forward pads and calls ``torch.conv2d`` directly (no ``F.conv2d``), run
    while another thread convolves in the middle of its forward: its patches are still the
    input padded by hand, unfolded (the other thread's conv is not taken for its own)."""
    import threading

    from deeproots.conversion.calibrate import conv_patches

    started, other_done = threading.Event(), threading.Event()

    class Direct(nn.Conv2d):
        def forward(self, x):
            x = F.pad(x, [0, 1, 0, 1])
            started.set()
            assert other_done.wait(10)
            return torch.conv2d(x, self.weight, self.bias, self.stride)

    def other():
        assert started.wait(10)
        F.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3))
        other_done.set()

    conv, x = Direct(4, 8, 3, stride=2), torch.randn(2, 4, 8, 8)
    thread = threading.Thread(target=other)
    thread.start()
    try:
        got = conv_patches(conv, x)
    finally:
        other_done.set()
        thread.join()
    assert got is not None and torch.equal(got, F.unfold(F.pad(x, [0, 1, 0, 1]), 3, stride=2))


def test_a_same_padded_conv_is_refit_as_the_plain_conv_it_equals():
    """At stride 1 a SAME-padded 3x3 conv is a conv with padding 1: refit within 4 groups to
    the same dense outputs from the same inputs, both get the same weight."""
    import zoo

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(16, 5, 1)).eval()
    padded = copy.deepcopy(plain)
    padded[2] = zoo.SamePadConv2d(8, 16, 3)
    padded[2].weight.data.copy_(plain[2].weight)
    x = [torch.randn(8, 3, 10, 10)]
    fits = []
    for dense in (plain, padded):
        new = copy.deepcopy(dense)
        regroup(new[2], 4, reinit=False)
        new[2].weight.data.copy_(block_diagonal_weight(dense[2].weight, 4))
        assert refit_grouped(dense, new, "2", x) is not None
        fits.append(new[2].weight)
    assert torch.allclose(fits[0], fits[1], atol=1e-5)


def _with_statistics(model):
    """Its batch norms given statistics and weights of their own (not the identity)."""
    for bn in (model.bn1, model.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    return model


@pytest.mark.parametrize("norm, act", [("BatchNormAct2d", None), ("FrozenBatchNorm2d", None),
                                       ("FrozenBatchNorm2d", nn.ReLU())],
                         ids=["BatchNormAct2d", "FrozenBatchNorm2d", "FrozenBatchNormAct2d"])
def test_permutations_fold_through_a_norm_that_computes_in_its_own_forward(norm, act):
    """timm's BatchNormAct2d (a batch norm subclass that applies its activation itself),
    torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d (no batch norm subclass:
    four buffers and an affine map in its own forward), tests/zoo.py's stand-ins: each kept
    whole in the trace (torch.fx traced into them before: the orders were kept), so conv2's
    input comes from conv1 through bn1 and its output goes to the 1x1 conv3 through bn2;
    random permutations folded on both sides leave what the model computes unchanged (its
    norms given statistics of their own first)."""
    import zoo

    torch.manual_seed(0)
    model = _with_statistics(zoo.NormActNet(act, norm=getattr(zoo, norm)).eval())
    before = model.conv1.weight.clone()
    site = root_sites(model, ["conv2"])["conv2"]
    assert (site.producer, site.before, site.consumer, site.after) == (
        "conv1", ["bn1"], "conv3", ["bn2"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        fold_permutations(model, site, torch.randperm(32), torch.randperm(32))
        assert torch.allclose(model(x), want, atol=1e-5)
        assert not torch.equal(model.conv1.weight, before)


def test_the_orders_are_kept_through_a_norm_whose_channels_are_not_independent():
    """A BatchNormAct2d with a PReLU as its activation (a weight per channel, which the fold
    would not permute), and a layer with a frozen batch norm's four buffers that adds each
    channel's neighbour: traced into, and both orders of conv2 kept."""
    import zoo

    prelu = root_sites(zoo.NormActNet(nn.PReLU(32)).eval(), ["conv2"])["conv2"]
    assert prelu.producer is None and prelu.consumer is None
    assert "batch_norm" in prelu.fixed_in + prelu.fixed_out
    mixing = root_sites(zoo.NormActNet(norm=zoo.MixingNorm2d).eval(), ["conv2"])["conv2"]
    assert mixing.producer is None and mixing.consumer is None


def test_a_refit_conv_without_bias_puts_its_constant_in_the_frozen_batch_norm_after_it():
    """A 1x1 conv without a bias refit to a dense conv's output that has one: the fit takes
    the constant off the running mean of the frozen batch norm that reads it, as off a batch
    norm's, so the model computes the dense model's output (without the frozen batch norm
    taken for one there was no constant term, and it did not)."""
    import zoo
    from deeproots.conversion.calibrate import refit_pointwise

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 1), zoo.FrozenBatchNorm2d(8)).eval()
    with torch.no_grad():
        dense[0].bias.copy_(torch.linspace(-1, 1, 8))
    new = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), zoo.FrozenBatchNorm2d(8)).eval()
    x = [torch.randn(64, 3, 6, 6)]
    assert refit_pointwise(dense, new, "0", x, ridge=0.0, min_pixels_per_weight=0) < 1e-5
    with torch.no_grad():
        assert torch.allclose(new(x[0]), dense(x[0]), atol=1e-4)


@pytest.mark.parametrize("norm", ["BatchNormAct2d", "FrozenBatchNorm2d"])
def test_the_norm_after_a_conv_is_found_on_passes_that_start_past_the_first_layers(norm):
    """A calibration pass that starts at the first conv being grouped (a Prefixed batch, a
    torch.fx trace) finds the norm that reads a conv's output, where the norm computes in its
    own forward (timm's BatchNormAct2d, torchvision's FrozenBatchNorm2d): the trace keeps it
    one layer, so a bias-less conv's fit keeps its constant there (the trace went into it
    before, and the fit had none)."""
    import zoo
    from deeproots.conversion.calibrate.passes import norm_after, prefixed

    model = zoo.NormActNet(norm=getattr(zoo, norm)).eval()
    x = torch.randn(2, 3, 16, 16)
    batch = prefixed([model], "conv1", [x])[0]
    assert norm_after(model, model.conv1, batch) is model.bn1
    assert norm_after(model, model.conv2, batch) is model.bn2
    assert norm_after(model, model.conv3, batch) is None  # the head follows it
