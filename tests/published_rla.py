"""An independent, plain-PyTorch RLA-ResNet written from the published description (SPEC section 1).

Nothing here comes from rla_ext: it is the yardstick the fused models are checked against. It
keeps the released code's quirk literally: the tensor the RLA update reads is bound to the branch
output BEFORE the in-place residual add and ReLU, so (through aliasing) it holds the block's final
output. Module names are the released checkpoint's, so state_dicts move between the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefSE(nn.Module):
    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // r, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(c // r, c, bias=False), nn.Sigmoid())

    def forward(self, x):
        w = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x * w.view(x.shape[0], -1, 1, 1).expand_as(x)


class RefECA(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        v = F.adaptive_avg_pool2d(x, 1)                      # N, C, 1, 1
        v = self.conv(v.squeeze(-1).transpose(1, 2))         # N, 1, C
        return x * torch.sigmoid(v.transpose(1, 2).unsqueeze(-1)).expand_as(x)


class _RefBlock(nn.Module):
    def _tail(self, out, x, h):
        if self.se is not None:
            out = self.se(out)
        if self.eca is not None:
            out = self.eca(out)
        y = out                      # released code: y "is" the branch output ...
        identity = x if self.downsample is None else self.downsample(x)
        if self.pools:
            h = F.avg_pool2d(h, 2, 2)
        out += identity              # ... but these in-place ops make y the final output
        out.relu_()
        return out, y, h


class RefBottleneck(_RefBlock):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample, k, groups=1, base_width=64, se=False, eca=None):
        super().__init__()
        w = int(planes * base_width / 64) * groups
        self.conv1 = nn.Conv2d(cin + k, w, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.pools = downsample is not None and stride != 1
        self.se = RefSE(planes * 4) if se else None
        self.eca = RefECA(planes * 4, eca) if eca else None

    def forward(self, x, h):
        out = F.relu(self.bn1(self.conv1(torch.cat((x, h), 1))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._tail(out, x, h)


class RefBasic(_RefBlock):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample, k, groups=1, base_width=64, se=False, eca=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin + k, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.pools = downsample is not None and stride != 1
        self.se = RefSE(planes) if se else None
        self.eca = RefECA(planes, eca) if eca else None

    def forward(self, x, h):
        out = F.relu(self.bn1(self.conv1(torch.cat((x, h), 1))))
        out = self.bn2(self.conv2(out))
        return self._tail(out, x, h)


class RefRLANet(nn.Module):
    def __init__(self, layers, num_classes=1000, k=32, block=RefBottleneck, groups=1, base_width=64, se=False,
                 eca=None, cifar=False, widths=None):
        super().__init__()
        self.k, self.cifar = k, cifar
        widths = widths or ((16, 32, 64) if cifar else (64, 128, 256, 512))
        cin = widths[0] if cifar else 64
        self.conv1 = nn.Conv2d(3, cin, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, cin, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        eca = eca or [None] * len(layers)
        stages, bns, outs, recs = [], [], [], []
        for s, (planes, n) in enumerate(zip(widths, layers)):
            stride = 1 if s == 0 else 2
            cout = planes * block.expansion
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            blks = []
            for t in range(n):
                blks.append(block(cin, planes, stride if t == 0 else 1, down if t == 0 else None, k, groups,
                                  base_width, se, eca[s]))
                cin = cout
            stages.append(nn.ModuleList(blks))
            bns.append(nn.ModuleList(nn.BatchNorm2d(k) for _ in range(n)))
            outs.append(nn.Conv2d(cout, k, 1, bias=False))
            recs.append(nn.Conv2d(k, k, 3, 1, 1, bias=False))
        self.conv_outs = nn.ModuleList(outs)
        self.recurrent_convs = nn.ModuleList(recs)
        self.stages = nn.ModuleList(stages)
        self.stage_bns = nn.ModuleList(bns)
        self.bn2 = nn.BatchNorm2d(k)
        self.fc = nn.Linear(cin + k, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar:
            x = F.max_pool2d(x, 3, 2, 1)
        h = torch.zeros(x.shape[0], self.k, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
        for blocks, bns, out_conv, rec in zip(self.stages, self.stage_bns, self.conv_outs, self.recurrent_convs):
            for block, bn in zip(blocks, bns):
                x, y, h = block(x, h)
                h = rec(torch.tanh(bn(h + out_conv(y))))
        h = F.relu(self.bn2(h))
        x = torch.cat((x, h), 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (so eval mode and
    parameter gradients are meaningful) and every 1-D conv / linear fresh random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(1 + 0.3 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(3)
    return model
