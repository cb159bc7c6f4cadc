"""Covariance, whitening, correlation and block scores against hand computations and numpy;
the figures; the analysis end to end on a small trained model."""
import json

import numpy as np
import pytest
import torch

import deeproots
from deeproots.inspection import covariance as A
from deeproots.cli import main
from deeproots.config import TrainConfig
from deeproots.training.loop import train
from helpers import write_fashion_mnist


def _stats(a, b, chunks=3):
    s = A.PairStats.empty(a.shape[1], b.shape[1])
    for ca, cb in zip(np.array_split(a, chunks), np.array_split(b, chunks)):
        s.update(torch.from_numpy(ca), torch.from_numpy(cb))
    return s


def test_streaming_covariance_equals_the_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3)) + [1, 2, 3]
    b = a[:, :2] @ [[1.0, 0.5], [0.0, 2.0]] + rng.normal(size=(500, 2))
    s = _stats(a, b)
    full = np.cov(np.hstack([a, b]).T)  # numpy's unbiased covariance, N - 1
    np.testing.assert_allclose(s.cov_ab().numpy(), full[:3, 3:], rtol=1e-10)
    np.testing.assert_allclose(s.cov_aa().numpy(), full[:3, :3], rtol=1e-10)
    # equation 2 by hand: X1 X2^T / (N - 1) on mean-subtracted samples
    x1, x2 = (a - a.mean(0)).T, (b - b.mean(0)).T
    np.testing.assert_allclose(s.cov_ab().numpy(), x1 @ x2.T / 499, rtol=1e-10)


def test_zca_whitened_data_has_identity_covariance():
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(6, 6))
    x = rng.normal(size=(4000, 6)) @ mix
    s = _stats(x, x)
    w = A.zca_matrix(s.cov_aa(), eps=0)
    white = (x - x.mean(0)) @ w.numpy().T
    np.testing.assert_allclose(np.cov(white.T), np.eye(6), atol=1e-8)
    np.testing.assert_allclose(w.numpy(), w.numpy().T, atol=1e-10)  # ZCA: symmetric
    np.testing.assert_allclose(A.whitened_cross_covariance(s, eps=0).numpy(), np.eye(6),
                               atol=1e-8)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        A.zca_matrix(s.cov_aa(), eps=-1)


def test_correlation():
    cov = torch.tensor([[4.0, 2.0, 0.0], [2.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    corr = A.correlation(cov)
    assert corr[0, 1].item() == pytest.approx(2 / 6)
    assert corr[0, 0].item() == pytest.approx(1) and corr[2, 2].item() == 0


def test_block_diagonality_score():
    assert A.block_diagonality(torch.full((8, 8), 3.0), 4) == pytest.approx(1.0)
    block = torch.block_diag(*[torch.ones(2, 2)] * 4) + 0.1
    dense = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert A.block_diagonality(block, 4) == pytest.approx(1.1 / 0.1)
    assert A.block_diagonality(block, 4) > 5 > A.block_diagonality(dense, 4)
    # rectangular blocks: 6 x 3 with 3 groups -> 2 x 1 blocks
    assert A.block_mask(6, 3, 3).sum().item() == 6
    with pytest.raises(ValueError, match="5 groups do not divide a 8 x 8"):
        A.block_mask(8, 8, 5)


def test_nearest_upsampling_pairs_the_right_pixels():
    small = torch.arange(4.0).view(1, 1, 2, 2)
    up = A.upsample_to(small, (4, 4))
    assert up[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    odd = A.upsample_to(torch.arange(3.0).view(1, 1, 1, 3), (1, 7))
    assert odd[0, 0, 0].tolist() == [0, 0, 0, 1, 1, 2, 2]  # floor(j * 3 / 7)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analysis_end_to_end_on_a_trained_model(tmp_path, capsys):
    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=64, n_test=32, size=8)
    train(TrainConfig(model="nin-root-8", data_dir=str(data), out=str(tmp_path / "run"),
                      epochs=2, batch_size=16, lr=0.05, device="cpu", progress=False,
                      download=False))
    assert main(["analyze", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "an"),
                 "--device", "cpu", "--no-download", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "conv2c->conv3a" in out
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    pair = result["pairs"]["conv2c->conv3a"]
    # 8x8 images: conv2c at 4x4, conv3a at 2x2 upsampled to 4x4: 32 images x 16 pixels
    assert pair["samples"] == 32 * 16
    assert result["pairs"]["conv1a->conv1b"]["samples"] == 32 * 64
    assert pair["groups"] == 4
    # the score the command reports is the block score (unit-tested above) of the
    # covariance of the same responses, collected here again directly
    from deeproots.training.evaluate import load_for_eval

    model, loader, _, _, _ = load_for_eval(tmp_path / "run" / "last.pt", batch_size=8,
                                           device="cpu", download=False)
    stats = A.collect_pair_stats(model, loader.batches(), [("conv2c", "conv3a")])
    expected = A.block_diagonality(stats[("conv2c", "conv3a")].cov_ab().float(), 4)
    assert pair["score_raw"] == pytest.approx(expected, rel=1e-5)
    for name in ("covariance_all.png", "correlation.png", "filters.png",
                 "cov_conv2c_conv3a.png"):
        assert _is_png(tmp_path / "an" / name)
    report = (tmp_path / "an" / "report.md").read_text()
    assert f"| conv2c->conv3a | 4 | 4 | 512 | {pair['score_raw']:.3f} |" in report


def test_filters_are_arranged_by_the_next_grouped_layer(tmp_path):
    """Figure 14: ResNet-50 root-8's conv1 filters in 8 rows, the groups of layer1's 3x3."""
    assert A.first_layer_filters(deeproots.create_model("resnet50-root-8"))[2] == 8
    assert A.first_layer_filters(deeproots.create_model("resnet50"))[2] == 1
    # NiN's conv1a feeds the ungrouped conv1b (192 -> 160): no grouping to show
    assert A.first_layer_filters(deeproots.create_model("nin-root-8"))[2] == 1


def test_blocks_that_divide_no_ungrouped_pair_are_refused_before_the_pass(tmp_path,
                                                                          monkeypatch):
    """nin's pairs are 192x160, 160x96, 96x192, 192x192 (four) and 192x10, all ungrouped in
    the orig model: 7 blocks divide none of them, so every score would be n/a; 5 divides 160
    but not 192 nor 96. What divides one at least: 2, 3, 4, 6, 8, 12, 16, 24, 32, ..."""
    def no_pass(*args, **kwargs):
        raise AssertionError("the covariance pass ran")

    monkeypatch.setattr(A, "collect_pair_stats", no_pass)
    model = deeproots.create_model("nin")
    for blocks in (7, 5):
        with pytest.raises(ValueError, match=rf"^blocks {blocks} divides the channels of none "
                                             r"of the ungrouped layer pairs \(conv1a->conv1b "
                                             r"192x160, conv1b->conv1c 160x96, conv1c->conv2a "
                                             r"96x192 and 5 more\): none would be scored. "
                                             r"Accepted: 1, 2, 3, 4, 6, 8, 12, 16, 24, "
                                             r"\.\.\.$"):
            A.analyze(model, [], tmp_path / "an", blocks=blocks)
    assert not (tmp_path / "an").exists()
