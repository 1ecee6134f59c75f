"""RLA-DenseNet-BC written straight from the equations in docs/MODELS.md (plain PyTorch, nothing from
rla_ext): the concatenation cat(features, h) is built, every BatchNorm is an nn.BatchNorm2d call."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefDenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size, k):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin + k, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)


class RefTransition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)


class RefRLADenseNet(nn.Module):
    def __init__(self, blocks, growth, init, bn_size=4, num_classes=10, k=8, cifar=True):
        super().__init__()
        self.k, self.cifar = k, cifar
        self.conv0 = nn.Conv2d(3, init, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, init, 7, 2, 3, bias=False)
        if not cifar:
            self.norm0 = nn.BatchNorm2d(init)
        c = init
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        self.conv_outs, self.recurrent_convs, self.stage_bns = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for b, n in enumerate(blocks):
            self.blocks.append(nn.ModuleList(RefDenseLayer(c + t * growth, growth, bn_size, k) for t in range(n)))
            self.conv_outs.append(nn.Conv2d(growth, k, 1, bias=False))
            self.recurrent_convs.append(nn.Conv2d(k, k, 3, padding=1, bias=False))
            self.stage_bns.append(nn.ModuleList(nn.BatchNorm2d(k) for _ in range(n)))
            c += n * growth
            if b < len(blocks) - 1:
                self.transitions.append(RefTransition(c, c // 2))
                c //= 2
        self.norm5 = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(k)
        self.classifier = nn.Linear(c + k, num_classes)

    def forward(self, x):
        x = self.conv0(x)
        if not self.cifar:
            x = F.max_pool2d(F.relu(self.norm0(x)), 3, 2, 1)
        h = torch.zeros(x.shape[0], self.k, *x.shape[2:], dtype=x.dtype)
        for b, layers in enumerate(self.blocks):
            for t, L in enumerate(layers):
                z = F.relu(L.norm2(L.conv1(torch.cat((F.relu(L.norm1(x)), h), 1))))
                new = L.conv2(z)
                h = self.recurrent_convs[b](torch.tanh(self.stage_bns[b][t](h + self.conv_outs[b](new))))
                x = torch.cat((x, new), 1)
            if b < len(self.transitions):
                T = self.transitions[b]
                x = F.avg_pool2d(T.conv(F.relu(T.norm(x))), 2)
                h = F.avg_pool2d(h, 2)
        x = torch.cat((F.relu(self.norm5(x)), F.relu(self.bn2(h))), 1)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
