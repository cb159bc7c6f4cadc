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
