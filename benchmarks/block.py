"""A full RLA bottleneck (one non-first block of a stage) built from the two fused ops.

Entry through op A, the plain ResNet 3x3 and 1x1 convs with their BatchNorms, the identity
residual and ReLU, then the RLA update (op B) on the block's final output. Only the two RLA ops
change with the backend; the rest is the same PyTorch code for every provider.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.cases import (COMPILE, Case, ConcatConvBnAct, RlaUpdate, activation, check_provider,
                              compile_module, prepare)
from benchmarks.shapes import RLA_CHANNELS, Stage


class RlaBottleneck(nn.Module):
    """(x, h) -> (block output, next h) for a stride-1 block with C = 4 * width channels."""

    def __init__(self, stage: Stage, k: int, backend: str) -> None:
        super().__init__()
        c, w = stage.channels, stage.width
        if c != 4 * w:
            raise ValueError(f"stage: an identity-shortcut block needs C = 4 * width, got {stage}")
        self.entry = ConcatConvBnAct(c, k, w, backend)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.update = RlaUpdate(c, k, backend)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        z = self.entry(x, h)
        z = F.relu(self.bn2(self.conv2(z)))
        z = self.bn3(self.conv3(z))
        out = F.relu(z + x)
        return out, self.update(h, out)


def make_block_case(stage: Stage, provider: str, *, batch: int, dtype: torch.dtype, device: torch.device | str,
                    channels_last: bool = True, k: int = RLA_CHANNELS, compile_mode: str | None = None,
                    seed: int = 0) -> Case:
    """One RLA bottleneck at `stage`, training mode, for one provider."""
    device = torch.device(device)
    backend = check_provider(provider, device)
    torch.manual_seed(seed)
    n, c, s = batch, stage.channels, stage.size
    module = prepare(RlaBottleneck(stage, k, backend), dtype, device)
    if channels_last:  # cuDNN's preferred weight layout; the fused ops take contiguous weights
        module.conv2.to(memory_format=torch.channels_last)
        module.conv3.to(memory_format=torch.channels_last)
    inputs = (activation((n, c, s, s), dtype, device, channels_last),
              activation((n, k, s, s), dtype, device, channels_last))
    grads = (activation((n, c, s, s), dtype, device, channels_last, requires_grad=False),
             activation((n, k, s, s), dtype, device, channels_last, requires_grad=False))
    fn = compile_module(module, device, compile_mode) if provider == COMPILE else module
    return Case(name="rla_bottleneck", provider=provider, label=stage.label, fn=fn, inputs=inputs,
                params=tuple(module.parameters()), grad_outputs=grads,
                meta={"batch": n, "channels": c, "size": s, "width": stage.width, "k": k})
