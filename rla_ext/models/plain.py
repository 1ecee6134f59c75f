"""The no-RLA floor: the same stem and bottleneck stages as RLA-ResNet-50, without any RLA.

Parameters: 25,557,032 (torchvision's ResNet-50); names conv1, bn1, stages.{s}.{t}.*, fc.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext.nn import make_downsample


class PlainBottleneck(nn.Module):
    """Standard ResNet bottleneck (stride on the 3x3). x (N, C_in, H, W) -> (N, 4*planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class PlainResNet(nn.Module):
    """ResNet with the RLA-ResNet stem and stage layout. x (N, 3, H, W) -> (N, num_classes)."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes, stages = 64, []
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if s == 0 else 2
            out_planes = planes * PlainBottleneck.expansion
            down = make_downsample(inplanes, out_planes, stride) if stride != 1 or inplanes != out_planes else None
            blocks = [PlainBottleneck(inplanes, planes, stride, down)]
            inplanes = out_planes
            blocks += [PlainBottleneck(inplanes, planes) for _ in range(1, n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))


def plain_resnet50(num_classes: int = 1000, **_ignored: object) -> PlainResNet:
    """ResNet-50 without RLA (the benchmark floor). (N, 3, 224, 224) -> (N, num_classes).

    Extra keywords (e.g. ``backend``) are accepted and ignored so benchmark code can build every
    model the same way.
    """
    return PlainResNet((3, 4, 6, 3), num_classes)
