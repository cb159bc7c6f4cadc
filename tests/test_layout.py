"""deeproots.layout.Placement: a conversion's result held as the user's model held each
tensor (device, dtype, memory format)."""
import torch
from torch import nn

from deeproots.layout import Placement


def test_a_placement_restores_each_tensor_by_name():
    """Each tensor of the model given to restore takes the device, dtype and memory format of
    the tensor of the same name in the placed model (the meta device stands in for a GPU);
    integer buffers keep their dtype; a tensor of a new name is left as it is."""
    placed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    placed[0].to(torch.float16).to(memory_format=torch.channels_last)
    placed[2].to("meta")
    placement = Placement(placed)
    assert placement.moved
    copy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    copy.register_buffer("extra", torch.zeros(2, 2, 2, 2, dtype=torch.float64))
    weight = copy[0].weight
    assert placement.restore(copy) is copy
    assert copy[0].weight is weight and copy[0].weight.dtype == torch.float16
    assert copy[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not copy[0].weight.is_contiguous()
    assert copy[1].weight.dtype == torch.float32 and copy[1].weight.device.type == "cpu"
    assert copy[1].num_batches_tracked.dtype == torch.long
    assert copy[2].weight.device.type == "meta" and copy[2].bias.device.type == "meta"
    assert copy.extra.dtype == torch.float64
    assert not Placement(nn.Conv2d(3, 8, 3)).moved
