"""Reference for op B: one RLA hidden-state update, as the published RLA-ResNet computes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rla_ext.ops._validation import pool_state


def rla_update(h: Tensor, y: Tensor, out_weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, rec_weight: Tensor, pool: bool,
               training: bool, momentum: float, eps: float, process_group: object | None = None,
               pool_mode: str = "floor") -> Tensor:
    """h (N,k,Hh,Wh), y (N,C,H,W) -> (N,k,H,W) = rec3x3(tanh(bn(pool?(h) + out1x1(y))))

    pool: 2x2 average pool, stride 2, in `pool_mode`: "floor" (published: (Hh//2, Wh//2)) or "ceil"
    (F.avg_pool2d's ceil_mode: (ceil(Hh/2), ceil(Wh/2)), edge windows average what they cover).
    With a `process_group` (training only) the BatchNorm statistics are those of all ranks' batches."""
    if pool:
        h = pool_state(h, pool_mode)
    w_out = out_weight if out_weight.dim() == 4 else out_weight[:, :, None, None]
    s = h + F.conv2d(y, w_out)
    if process_group is not None:
        from rla_ext.ops._distributed import sync_batch_norm
        a = torch.tanh(sync_batch_norm(s, running_mean, running_var, bn_weight, bn_bias, momentum, eps, process_group))
    else:
        a = torch.tanh(F.batch_norm(s, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    k = rec_weight.shape[0]
    return F.conv2d(a, rec_weight.reshape(k, k, 3, 3), padding=1)
