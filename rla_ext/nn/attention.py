"""Channel attention applied to a block's branch output before the residual add (optional).

Submodule names are chosen so that released RLA-Net SE / ECA checkpoints load unchanged:
``se.fc.0`` / ``se.fc.2`` (the two bias-free linear layers) and ``eca.conv`` (the 1-D conv).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 relu(W1 mean_hw(x)))``; x (N, C, H, W) -> same."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        # Index layout (0: squeeze linear, 2: excite linear) matches the released checkpoints.
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class EfficientChannelAttention(nn.Module):
    """ECA: a k-tap 1-D conv across the channel descriptor, then a sigmoid gate; x (N,C,H,W) -> same."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size: expected an odd size, got {kernel_size}")
        self.channels = channels
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        desc = x.mean(dim=(2, 3)).unsqueeze(1)          # (N, 1, C): channels become the 1-D axis
        gate = torch.sigmoid(self.conv(desc)).squeeze(1)
        return x * gate[:, :, None, None]
