"""Reading the aggregated RLA state at an intermediate depth (early exit / adaptive computation)."""
from __future__ import annotations

from torch import Tensor, nn


class EarlyExitHead(nn.Module):
    """A classifier on the RLA state at one depth: ``fc(mean_hw(relu(bn(h))))``.

    It mirrors the network's own head restricted to ``h`` (the aggregated summary of every layer
    so far), so accuracy against depth shows how much the state has gathered.
    h (N, k, H, W) -> logits (N, num_classes).
    """

    def __init__(self, rla_channel: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(rla_channel)
        self.fc = nn.Linear(rla_channel, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.bn(h).relu().mean(dim=(2, 3)))
