"""Small CNNs of shapes deeproots did not build, written here by hand (torchvision cannot be
installed beside the CPU torch): VGG, ResNet-18, ResNeXt, MobileNet, DenseNet and U-Net
styles, dilated convs, one-channel input. Each takes a 32x32 image (28x28 for the
one-channel one)."""
import torch
from torch import nn


def conv(cin, cout, k=3, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation=dilation,
                     groups=groups, bias=False)


def macs(h, w, cin, cout, k=3, groups=1):
    """Multiply-adds of a conv writing an h x w map, by hand."""
    return h * w * cout * (cin // groups) * k * k


def vgg():
    return nn.Sequential(
        conv(3, 16), nn.ReLU(), conv(16, 16), nn.ReLU(), nn.MaxPool2d(2),
        conv(16, 32), nn.ReLU(), conv(32, 32), nn.ReLU(), nn.MaxPool2d(2),
        conv(32, 64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, stride=stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class ResNeXtish(nn.Module):
    """Already grouped: 3x3 convs in 8 groups (cardinality 8), and one dense 3x3."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 32)
        self.block1 = nn.Sequential(conv(32, 32, 1), conv(32, 32, groups=8), conv(32, 32, 1))
        self.block2 = nn.Sequential(conv(32, 64, 1, 2), conv(64, 64, groups=8), conv(64, 64, 1))
        self.dense = conv(64, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.dense(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def mobilenet():
    return nn.Sequential(
        conv(3, 32, stride=2), nn.ReLU(),          # stem, 16x16
        conv(32, 32, groups=32), conv(32, 64, 1),  # depthwise, pointwise
        conv(64, 64, stride=2, groups=64), conv(64, 128, 1),  # 8x8
        conv(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class DenseBlockNet(nn.Module):
    """Concatenations: each layer reads every earlier layer's maps."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 16)
        self.d1 = conv(16, 8)
        self.d2 = conv(24, 8)
        self.transition = conv(32, 16, 1)
        self.d3 = conv(16, 8)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.d1(x)], 1)
        x = torch.cat([x, self.d2(x)], 1)
        x = nn.functional.avg_pool2d(self.transition(x), 2)
        x = torch.cat([x, self.d3(x)], 1)
        return self.fc(x.mean((2, 3)))


class UNetish(nn.Module):
    """Encoder-decoder: down to 8x8 and up again, with skips concatenated."""

    def __init__(self):
        super().__init__()
        self.enc1a, self.enc1b = conv(3, 16), conv(16, 16)
        self.enc2 = conv(16, 32)
        self.bottom = conv(32, 32)
        self.dec2 = conv(64, 32)
        self.dec1 = conv(48, 16)
        self.head = conv(16, 2, 1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        e1 = self.enc1b(torch.relu(self.enc1a(x)))            # 32x32
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))       # 16x16
        b = self.bottom(nn.functional.max_pool2d(e2, 2))      # 8x8
        d2 = self.dec2(torch.cat([self.up(b), e2], 1))        # 16x16
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))       # 32x32
        return self.head(d1)


def dilated():
    return nn.Sequential(conv(3, 16), conv(16, 32, dilation=2),
                         nn.Conv2d(32, 32, 3, 2, 4, dilation=4, bias=False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def one_channel():
    return nn.Sequential(conv(1, 8), conv(8, 16), nn.MaxPool2d(2), conv(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


# ---------------------------------------------------------------------------------------------
# Stand-ins for what real architectures do (timm, torchvision), each small and by hand


class SamePadConv2d(nn.Conv2d):
    """TensorFlow's "SAME" padding computed in ``forward`` from the input's size (timm's
    Conv2dSame): built with padding 0, it pads (k - 1) // 2 and k // 2 itself."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride, 0, groups=groups, bias=False)

    def forward(self, x):
        h, w = x.shape[-2:]
        ph = max((-(-h // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - h, 0)
        pw = max((-(-w // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - w, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation,
                                    self.groups)


class GainConv2d(nn.Conv2d):
    """A conv with a learnt output gain per channel (an extra parameter), linear in its
    weight: regrouping it keeps what it computes."""

    def __init__(self, cin, cout, k=3):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1))

    def forward(self, x):
        return super().forward(x) * self.gain


class StdGainConv2d(nn.Conv2d):
    """Weight standardisation with a gain (timm's ScaledStdConv2d, NF-ResNet): each filter
    standardised over all its inputs. Not linear in its weight: regrouped, it would
    standardise over other statistics."""

    def __init__(self, cin, cout, k=3):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))

    def forward(self, x):
        w = self.weight
        mean = w.mean((1, 2, 3), keepdim=True)
        std = w.std((1, 2, 3), keepdim=True) + 1e-5
        return nn.functional.conv2d(x, self.gain * (w - mean) / std, None, self.stride,
                                    self.padding, self.dilation, self.groups)


class SubclassNet(nn.Module):
    """A stem, then a SAME-padded conv, a gain conv and a standardised conv at 16x16."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 16, stride=2)
        self.same = SamePadConv2d(16, 16, 3)
        self.gained = GainConv2d(16, 32)
        self.standardised = StdGainConv2d(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.standardised(self.gained(self.same(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class SharedConvNet(nn.Module):
    """One conv called under two attribute names (``again`` is ``block``)."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 8)
        self.block = conv(8, 8)
        self.again = self.block
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.again(torch.relu(self.block(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class FunctionalNet(nn.Module):
    """A conv written as ``F.conv2d(x, self.w)``, a transposed conv, and a linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
        self.up = nn.ConvTranspose2d(8, 4, 2, 2)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(nn.functional.conv2d(x, self.w, padding=1))
        return self.fc(self.up(x).mean((2, 3)))


class TinyAttention(nn.Module):
    """Patches, nn.MultiheadAttention (its inference fast path on a CPU), and
    F.scaled_dot_product_attention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, L, dim)
        t = self.mha(t, t, t, need_weights=False)[0]
        q, k, v = self.qkv(t).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        t = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.fc(t.mean(1))


class DeepStemNet(nn.Module):
    """A deep stem (ResNet-D): three 3x3 convs at the stem's resolution, then blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv(3, 16, stride=2), nn.ReLU(), conv(16, 16), nn.ReLU(),
                                  conv(16, 32))
        self.layer1 = conv(32, 32, stride=2)
        self.layer2 = conv(32, 64, stride=2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer2(torch.relu(self.layer1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class BottleneckResNet(nn.Module):
    """A small bottleneck ResNet (deeproots' own ResNet-50 blocks: 1x1 -> 3x3 -> 1x1 +
    identity, ReLU) for 28x28 images: a 3x3 stem, two stages of two blocks, a classifier."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        from deeproots.models.resnet import Bottleneck

        self.stem = nn.Sequential(conv(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU())
        self.layer1 = nn.Sequential(Bottleneck(64, 32), Bottleneck(128, 32))
        self.layer2 = nn.Sequential(Bottleneck(128, 64, stride=2), Bottleneck(256, 64))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def bottleneck_resnet(num_classes=10, in_channels=1):
    return BottleneckResNet(num_classes, in_channels)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm-and-activation layer: a batch norm subclass that checks its input's rank,
    normalises functionally and applies its activation child, all in its own forward
    (torch.fx traces into it: a getattr and a functional batch norm, no layer)."""

    def __init__(self, channels, act=None):
        super().__init__(channels)
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-D input")  # as timm checks it
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                     self.bias, False, 0.0, self.eps)
        return self.act(x)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d (detection backbones), no batch norm subclass: four
    buffers and an affine map computed in its own forward; with ``act``, timm's
    FrozenBatchNormAct2d (an activation child after it)."""

    def __init__(self, channels, act=None, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (
            self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return self.act(x * scale + self.bias.reshape(1, -1, 1, 1)
                        - self.running_mean.reshape(1, -1, 1, 1) * scale)


class MixingNorm2d(FrozenBatchNorm2d):
    """A frozen batch norm's four buffers, but each channel's neighbour (the next in order)
    added to it: the order of its channels matters, so no permutation passes through it."""

    def forward(self, x):
        return super().forward(x) + x.roll(1, 1)


class NormActNet(nn.Module):
    """A stem, then conv - BatchNormAct2d - conv - BatchNormAct2d - 1x1 conv, as timm's
    CSPDarknet and EfficientNetV2 blocks are built; ``act`` the norms' activation, ``norm``
    their class (tests/zoo.py's BatchNormAct2d, or another taking (channels, act))."""

    def __init__(self, act=None, norm=None):
        super().__init__()
        norm = norm or BatchNormAct2d
        self.stem = conv(3, 16)
        self.conv1 = conv(16, 32)
        self.bn1 = norm(32, act)
        self.conv2 = conv(32, 32)
        self.bn2 = norm(32, None if act is None else type(act)(32))
        self.conv3 = conv(32, 32, k=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(torch.relu(self.stem(x))))))
        return self.fc(self.conv3(x).mean((2, 3)))
