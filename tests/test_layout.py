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
    converted = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    converted.register_buffer("extra", torch.zeros(2, 2, 2, 2, dtype=torch.float64))
    weight = converted[0].weight
    assert placement.restore(converted) is converted
    assert converted[0].weight is weight and converted[0].weight.dtype == torch.float16
    assert converted[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not converted[0].weight.is_contiguous()
    assert converted[1].weight.dtype == torch.float32 and converted[1].weight.device.type == "cpu"
    assert converted[1].num_batches_tracked.dtype == torch.long
    assert converted[2].weight.device.type == "meta" and converted[2].bias.device.type == "meta"
    assert converted.extra.dtype == torch.float64
    assert not Placement(nn.Conv2d(3, 8, 3)).moved
