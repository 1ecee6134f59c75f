"""Reference for the ConvLSTM cell op: the released ConvLSTMCell_layer, concatenation built."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """x (N,C,H,W), h, c (N,k,H,W) -> (h', c'); the math of rla_ext.nn.ConvLSTMCell."""
    k = h.shape[1]
    i, f, o, g = torch.split(F.conv2d(torch.cat((x, h), 1), weight, bias, padding=weight.shape[-1] // 2), k, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c
