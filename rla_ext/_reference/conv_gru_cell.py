"""Reference for the ConvGRU cell op: the released ConvGRUCell_layer, concatenations built."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_gru_cell(x: Tensor, h: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, output_weight: Tensor,
                  output_bias: Tensor | None, reset_norm_weight: Tensor | None, reset_norm_bias: Tensor | None,
                  update_norm_weight: Tensor | None, update_norm_bias: Tensor | None,
                  output_norm_weight: Tensor | None, output_norm_bias: Tensor | None, eps: float) -> Tensor:
    """x (N,C,H,W), h (N,k,H,W) -> h' (N,k,H,W); the math of rla_ext.nn.ConvGRUCell."""
    k = h.shape[1]
    pad = gate_weight.shape[-1] // 2
    r, u = torch.split(F.conv2d(torch.cat((x, h), 1), gate_weight, gate_bias, padding=pad), k, dim=1)
    r = torch.sigmoid(F.group_norm(r, 1, reset_norm_weight, reset_norm_bias, eps))
    u = torch.sigmoid(F.group_norm(u, 1, update_norm_weight, update_norm_bias, eps))
    o = F.conv2d(torch.cat((x, r * h), 1), output_weight, output_bias, padding=pad)
    y = torch.tanh(F.group_norm(o, 1, output_norm_weight, output_norm_bias, eps))
    return u * h + (1 - u) * y
