"""Convolutional GRU and LSTM cells used as RLA aggregation functions (the paper's comparison of
aggregation cells), with the released RLA-Net parameter names.

Both run in plain PyTorch (any device, any dtype). There is no fused cell op yet: the gate
convolution reads ``cat(x, h)`` built explicitly, as released.

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

GRU_NORM_EPS = 1e-6


class ConvGRUCell(nn.Module):
    """ConvGRU cell. ``forward(x, h)``: x (N, C_in, H, W), h (N, k, H, W) -> h' (N, k, H, W).

    Submodules (released names): gate_conv (C_in + k -> 2k), reset_gate_norm, update_gate_norm,
    output_conv (C_in + k -> k), output_norm.
    """

    def __init__(self, input_channel: int, output_channel: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.output_channel = output_channel
        pad = kernel_size // 2
        cin = input_channel + output_channel
        self.gate_conv = nn.Conv2d(cin, 2 * output_channel, kernel_size, padding=pad)
        self.reset_gate_norm = nn.GroupNorm(1, output_channel, GRU_NORM_EPS, affine=True)
        self.update_gate_norm = nn.GroupNorm(1, output_channel, GRU_NORM_EPS, affine=True)
        self.output_conv = nn.Conv2d(cin, output_channel, kernel_size, padding=pad)
        self.output_norm = nn.GroupNorm(1, output_channel, GRU_NORM_EPS, affine=True)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
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
                 bias: bool = False) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size,
                              padding=(kernel_size[0] // 2, kernel_size[1] // 2), bias=bias)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, o, g = torch.split(self.conv(torch.cat((x, h), 1)), self.hidden_dim, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


__all__ = ["ConvGRUCell", "ConvLSTMCell", "GRU_NORM_EPS"]
