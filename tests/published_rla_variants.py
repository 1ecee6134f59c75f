"""Independent plain-PyTorch statements of the released RLA-Net variants (nothing from rla_ext).

Written from the released models' math, not from our modules, as yardsticks for the fused models:
* RefCellResNet: RLA-ResNet whose stage aggregation is a ConvGRU or ConvLSTM cell fed with
  tanh(bn(conv1x1(x_t))) (x_t the block's final output, through the released aliasing); no BN or
  activation on h before the classifier.
* RefMobileNetV2: the RLA inverted-residual network; one recurrent conv module repeated in a
  ModuleList for every new cell (dense 3x3, or depthwise for the "ds" form); the update reads the
  branch output; ReLU6 head over cat(x, relu6(bn2(h))) and a dropout before the classifier.
Parameter names are the released checkpoints', so state_dicts move between these and rla_ext.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from published_rla import RefBottleneck, RefECA


class RefGRU(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate_conv = nn.Conv2d(2 * k, 2 * k, 3, padding=1)
        self.reset_gate_norm = nn.GroupNorm(1, k, eps=1e-6)
        self.update_gate_norm = nn.GroupNorm(1, k, eps=1e-6)
        self.output_conv = nn.Conv2d(2 * k, k, 3, padding=1)
        self.output_norm = nn.GroupNorm(1, k, eps=1e-6)

    def forward(self, a, h):
        gates = self.gate_conv(torch.cat((a, h), 1))
        reset = torch.sigmoid(self.reset_gate_norm(gates[:, :self.k]))
        update = torch.sigmoid(self.update_gate_norm(gates[:, self.k:]))
        cand = torch.tanh(self.output_norm(self.output_conv(torch.cat((a, reset * h), 1))))
        return update * h + (1 - update) * cand


class RefLSTM(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(2 * k, 4 * k, 3, padding=1, bias=False)

    def forward(self, a, h, c):
        z = self.conv(torch.cat((a, h), 1))
        k = self.k
        i, f, o, g = (z[:, j * k:(j + 1) * k] for j in range(4))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class RefCellResNet(nn.Module):
    def __init__(self, layers, num_classes=1000, k=32, cell="gru", eca=None, widths=(64, 128, 256, 512)):
        super().__init__()
        self.k, self.cell = k, cell
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        eca = eca or [None] * len(layers)
        cin = 64
        stages, bns, outs, cells = [], [], [], []
        for s, (planes, n) in enumerate(zip(widths, layers)):
            stride = 1 if s == 0 else 2
            cout = planes * 4
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            blks = []
            for t in range(n):
                blks.append(RefBottleneck(cin, planes, stride if t == 0 else 1, down if t == 0 else None, k,
                                          eca=eca[s]))
                cin = cout
            stages.append(nn.ModuleList(blks))
            bns.append(nn.ModuleList(nn.BatchNorm2d(k) for _ in range(n)))
            outs.append(nn.Conv2d(cout, k, 1, bias=False))
            cells.append(RefGRU(k) if cell == "gru" else RefLSTM(k))
        self.conv_outs = nn.ModuleList(outs)
        self.recurrent_convs = nn.ModuleList(cells)
        self.stages = nn.ModuleList(stages)
        self.stage_bns = nn.ModuleList(bns)
        self.fc = nn.Linear(cin + k, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        h = torch.zeros(x.shape[0], self.k, x.shape[2], x.shape[3], dtype=x.dtype)
        c = torch.zeros_like(h)
        for blocks, bns, out_conv, cell in zip(self.stages, self.stage_bns, self.conv_outs, self.recurrent_convs):
            for block, bn in zip(blocks, bns):
                pooled = block.pools
                x, y, h = block(x, h)               # y aliases the final output x
                if pooled:
                    c = F.avg_pool2d(c, 2, 2)
                a = torch.tanh(bn(out_conv(y)))
                if self.cell == "gru":
                    h = cell(a, h)
                else:
                    h, c = cell(a, h, c)
        x = torch.cat((x, h), 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _divisible(v, d=8):
    out = max(d, int(v + d / 2) // d * d)
    return out + d if out < 0.9 * v else out


def _cbr6(cin, cout, kernel, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class RefInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t, k, eca):
        super().__init__()
        hid = int(round(cin * t))
        self.stride, self.res = stride, stride == 1 and cin == cout
        self.conv1x1 = _cbr6(cin, hid, 1) if t != 1 else None
        body = [_cbr6(hid + k, hid + k, 3, stride, hid + k), nn.Conv2d(hid + k, cout, 1, bias=False),
                nn.BatchNorm2d(cout)]
        if eca is not None:
            body.append(RefECA(cout, eca))
        self.conv = nn.Sequential(*body)

    def forward(self, x, h):
        e = self.conv1x1(x) if self.conv1x1 is not None else x
        y = self.conv(torch.cat((e, h), 1))
        out = x + y if self.res else y
        if self.stride != 1:
            h = F.avg_pool2d(h, 2, 2)
        return out, y, h


class RefMobileNetV2(nn.Module):
    def __init__(self, setting, num_classes=1000, width_mult=1.0, k=32, eca=False, ds=False):
        super().__init__()
        self.k = k
        cin = _divisible(32 * width_mult)
        self.last = _divisible(1280 * max(1.0, width_mult))
        self.conv1 = _cbr6(3, cin, 3, 2)
        n_cells = 1 + sum(1 for row in setting[1:] if row[3] == 2)
        stages, bns, outs = [], [], []
        for t, c, n, s in setting:
            cout = _divisible(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(RefInvertedResidual(cin, cout, s if i == 0 else 1, t, k,
                                                  (1 if c < 96 else 3) if eca else None))
                cin = cout
            stages.append(nn.ModuleList(blocks))
            bns.append(nn.ModuleList(nn.BatchNorm2d(k) for _ in range(n)))
            outs.append(nn.Conv2d(cout, k, 1, bias=False))
        self.stages = nn.ModuleList(stages)
        self.conv_outs = nn.ModuleList(outs)
        rec = nn.Conv2d(k, k, 3, padding=1, groups=k if ds else 1, bias=False)
        self.rec_name = "recurrent_dsconvs" if ds else "recurrent_convs"
        setattr(self, self.rec_name, nn.ModuleList([rec] * n_cells))   # one module, n_cells entries
        self.stage_bns = nn.ModuleList(bns)
        self.conv2 = _cbr6(cin + k, self.last, 1)
        self.bn2 = nn.BatchNorm2d(k)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        h = torch.zeros(x.shape[0], self.k, x.shape[2], x.shape[3], dtype=x.dtype)
        for blocks, bns, out_conv in zip(self.stages, self.stage_bns, self.conv_outs):
            for block, bn in zip(blocks, bns):
                x, y, h = block(x, h)
                h = getattr(self, self.rec_name)[0](torch.tanh(bn(h + out_conv(y))))
        h = F.relu6(self.bn2(h))
        x = self.conv2(torch.cat((x, h), 1))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize_all_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every BatchNorm and GroupNorm, and
    linear weights of unit-ish scale (so the head does not hide differences upstream)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                c = m.weight.numel()
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(1 + 0.3 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(3)
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    return model
