"""When two computations agree (deeproots.numerics): a tensor, and a backbone's list of maps."""
import torch

from deeproots.numerics import disagreement


def test_lists_of_maps_agree_where_every_map_does():
    maps = [torch.ones(2, 3), torch.full((2, 4), 10.0)]
    assert disagreement([m.clone() for m in maps], maps, torch.float32) is None
    # the second map off by 1 where its largest value is 10: allowed 1e-4 x 10 + 1e-6
    off = [maps[0].clone(), maps[1] + torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])]
    assert disagreement(off, maps, torch.float32) == (
        "output 1: max difference 1 from the native result (allowed 0.001)")
    assert disagreement(maps[:1], maps, torch.float32) == "1 outputs, native 2 outputs"
    assert disagreement(maps[0], maps, torch.float32) == "Tensor, native 2 outputs"
    assert disagreement([maps[0], maps[1][:, :2]], maps, torch.float32) == (
        "output 1: output of shape (2, 2), native (2, 4)")
