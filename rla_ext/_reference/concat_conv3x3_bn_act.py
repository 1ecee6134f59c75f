"""Reference for the basic-block entry: the published relu(bn1(conv1(cat(x, h)))) with a 3x3 conv1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def concat_conv3x3_bn_act(x: Tensor, h: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                          running_mean: Tensor | None, running_var: Tensor | None, stride: int, training: bool,
                          momentum: float, eps: float, activation: str,
                          process_group: object | None = None) -> Tensor:
    """x (N,C,H,W), h (N,k,H,W), weight (Co,C+k,3,3) -> (N,Co,ceil(H/stride),ceil(W/stride)).
    Materialises cat(x, h).

    With a `process_group` (training only) the BatchNorm statistics are those of all ranks' batches."""
    z = F.conv2d(torch.cat((x, h), dim=1), weight, stride=stride, padding=1)
    if process_group is not None:
        from rla_ext.ops._distributed import sync_batch_norm
        out = sync_batch_norm(z, running_mean, running_var, bn_weight, bn_bias, momentum, eps, process_group)
    else:
        out = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(out) if activation == "relu" else out
