"""The CIFAR-10 ResNets of He et al. 2016 (section 4.2), to read the trained weights in
``shared/data/cifar10`` (``resnet20-12fca82f.th``, ``resnet56-4bfd9763.th``).

Written from the description in that folder's README: a 3x3 conv to 16 channels, three
stages of ``n`` basic blocks (16, 32, 64 channels; stride 2 at the first block of stages 2
and 3), identity shortcuts, and where the shape changes the parameter-free "option A"
shortcut (subsample by 2, zero-pad the new channels equally on both sides), global average
pooling, ``linear`` 64 -> 10.  No conv has a bias; BatchNorm after every conv.

References
----------
He, K., Zhang, X., Ren, S., Sun, J. "Deep Residual Learning for Image Recognition", CVPR 2016.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs: ToTensor() then Normalize with these (the weights' README).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEPTHS = {"resnet20": 3, "resnet56": 9}


class ShortcutA(nn.Module):
    """Option A: take every second pixel and zero-pad the new channels on both sides."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity() if stride == 1 and in_planes == planes else ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(arch: str, weights: str | None = None) -> CifarResNet:
    """``resnet20`` or ``resnet56``, with the trained weights of ``weights`` (a ``.th`` file)."""
    if arch not in DEPTHS:
        raise ValueError(f"arch must be one of {sorted(DEPTHS)}, got {arch!r}")
    model = CifarResNet(DEPTHS[arch])
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model
