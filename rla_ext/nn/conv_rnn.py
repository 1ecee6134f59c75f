"""Convolutional GRU and LSTM cells used as RLA aggregation functions (the paper's comparison of
aggregation cells), with the released RLA-Net parameter names.

Each cell has a ``backend`` (None: rla_ext's selection in force). When it resolves to a backend with
fused cell kernels (``cpp``), the step runs :func:`rla_ext.ops.conv_gru_cell` /
:func:`rla_ext.ops.conv_lstm_cell` (no concatenation built, fused GroupNorm and gating); otherwise it
runs the plain PyTorch below (any device, any dtype), which builds ``cat(x, h)`` as released.

GRU (``ConvGRUCell``; released as ``ConvGRUCell_layer``), x, h (N, k, H, W)::

    r, u = split(gate_conv(cat(x, h)))                  # 3x3, padding 1, WITH bias, 2k outputs
    r = sigmoid(GN_r(r));  u = sigmoid(GN_u(u))         # GroupNorm(1 group, k, eps=1e-6, affine)
    y = tanh(GN_o(output_conv(cat(x, r * h))))          # 3x3, padding 1, with bias
    h' = u * h + (1 - u) * y

LSTM (``ConvLSTMCell``; released as ``ConvLSTMCell_layer``), x, h, c (N, k, H, W)::

    i, f, o, g = split(conv(cat(x, h)))                 # 3x3, padding 1, NO bias, 4k outputs
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')

Released quirks kept: the GRU's GroupNorms use eps = 1e-6 (not PyTorch's 1e-5); the GRU convs
carry biases while the LSTM's does not; gate order (r, u) and (i, f, o, g).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rla_ext import _backend
from rla_ext.ops import conv_gru_cell, conv_lstm_cell
from rla_ext.ops.conv_gru_cell import FUSED as _GRU_FUSED
from rla_ext.ops.conv_lstm_cell import FUSED as _LSTM_FUSED


def _fused(backend: str | None, x: Tensor, op: str, fused: tuple[str, ...]) -> str | None:
    """The backend to pass to the fused cell op, or None when the plain PyTorch step should run.

    ``auto`` takes the fused cells wherever its backend resolution offers them: training steps too,
    since their elementwise passes run vectorised (fwd+bwd 1.02-1.10x the plain step for both cells
    at N=2-16, k=32, 7x7-56x56 on 2 cores; before, at 0.90-0.98x, auto kept them for no-grad forwards).
    """
    name = _backend.resolve(backend, x.device, op, (x.shape[2], x.shape[3]))
    return name if name in fused else None


GRU_NORM_EPS = 1e-6


class ConvGRUCell(nn.Module):
    """ConvGRU cell. ``forward(x, h)``: x (N, C_in, H, W), h (N, k, H, W) -> h' (N, k, H, W).

    Submodules (released names): gate_conv (C_in + k -> 2k), reset_gate_norm, update_gate_norm,
    output_conv (C_in + k -> k), output_norm.
    """

    def __init__(self, input_channel: int, output_channel: int, kernel_size: int = 3,
                 backend: str | None = None) -> None:
        super().__init__()
        self.output_channel = output_channel
        self.backend = backend
        pad = kernel_size // 2
        cin = input_channel + output_channel
        self.gate_conv = nn.Conv2d(cin, 2 * output_channel, kernel_size, padding=pad)
        self.reset_gate_norm = nn.GroupNorm(1, output_channel, GRU_NORM_EPS, affine=True)
        self.update_gate_norm = nn.GroupNorm(1, output_channel, GRU_NORM_EPS, affine=True)
        self.output_conv = nn.Conv2d(cin, output_channel, kernel_size, padding=pad)
        self.output_norm = nn.GroupNorm(1, output_channel, GRU_NORM_EPS, affine=True)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        fused = _fused(self.backend, x, "conv_gru_cell", _GRU_FUSED) if self.gate_conv.kernel_size == (3, 3) else None
        if fused is not None:
            return conv_gru_cell(x, h, self.gate_conv.weight, self.gate_conv.bias, self.output_conv.weight,
                                 self.output_conv.bias, self.reset_gate_norm.weight, self.reset_gate_norm.bias,
                                 self.update_gate_norm.weight, self.update_gate_norm.bias, self.output_norm.weight,
                                 self.output_norm.bias, eps=self.output_norm.eps, backend=fused)
        r, u = torch.split(self.gate_conv(torch.cat((x, h), 1)), self.output_channel, dim=1)
        r = torch.sigmoid(self.reset_gate_norm(r))
        u = torch.sigmoid(self.update_gate_norm(u))
        y = torch.tanh(self.output_norm(self.output_conv(torch.cat((x, r * h), 1))))
        return u * h + (1 - u) * y


class ConvLSTMCell(nn.Module):
    """ConvLSTM cell. ``forward(x, (h, c))``: x (N, C_in, H, W), h, c (N, k, H, W) -> (h', c').

    Submodule (released name): conv (C_in + k -> 4k, no bias), gates in the order i, f, o, g.
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: tuple[int, int] = (3, 3),
                 bias: bool = False, backend: str | None = None) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.backend = backend
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size,
                              padding=(kernel_size[0] // 2, kernel_size[1] // 2), bias=bias)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        fused = _fused(self.backend, x, "conv_lstm_cell", _LSTM_FUSED) if self.conv.kernel_size == (3, 3) else None
        if fused is not None:
            return conv_lstm_cell(x, h, c, self.conv.weight, self.conv.bias, backend=fused)
        i, f, o, g = torch.split(self.conv(torch.cat((x, h), 1)), self.hidden_dim, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


__all__ = ["ConvGRUCell", "ConvLSTMCell", "GRU_NORM_EPS"]
