"""Synchronised BatchNorm for data-parallel training on CPU (gloo) and GPU.

torch's ``nn.SyncBatchNorm`` refuses CPU modules, and the RLA modules hand some BatchNorms' state to
the fused ops instead of calling them. :class:`SyncBatchNorm2d` is an ``nn.BatchNorm2d`` (same
parameters, buffers and state_dict names) that also carries a process group: called directly it
all-reduces its batch statistics itself; the RLA modules pass its group to the fused ops
(``process_group=``), which synchronise the statistics they compute.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext.nn._bn_args import bn_args
from rla_ext.ops._distributed import sync_batch_norm


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of every rank's batch together.

    x (N, C, H, W) -> (N, C, H, W). In training with a group of more than one rank: per-channel
    (count, mean, M2) are all-reduced (differentiably, so input gradients include the other ranks'
    terms), the input is normalised with the global statistics and the running statistics take the
    global unbiased variance. Eval mode or a single rank: exactly ``nn.BatchNorm2d``. Every rank must
    call it the same number of times (a collective per call).

    Args: as ``nn.BatchNorm2d``, plus ``process_group`` (None: the default, world group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: object | None = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def sync_group(self) -> object | None:
        """The group to synchronise over now, or None when the statistics stay local (eval mode,
        torch.distributed not initialised, or a single rank)."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        group = self.sync_group()
        if group is None:
            return super().forward(x)
        a = bn_args(self)
        if not a.training:  # cannot happen while self.training; kept for the bookkeeping's sake
            return F.batch_norm(x, a.running_mean, a.running_var, a.weight, a.bias, False, a.momentum, a.eps)
        return sync_batch_norm(x, a.running_mean, a.running_var, a.weight, a.bias, a.momentum, a.eps, group)


def process_group_of(bn: nn.Module) -> object | None:
    """What the RLA modules pass as the fused ops' ``process_group`` for BatchNorm `bn`."""
    return bn.sync_group() if isinstance(bn, SyncBatchNorm2d) else None


def convert_sync_batchnorm(module: nn.Module, process_group: object | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in `module` (recursively, in place for children) with a
    :class:`SyncBatchNorm2d` sharing its parameters, buffers and mode; returns the converted module.

    This includes the BatchNorms whose statistics the fused ops compute (an RLA bottleneck's ``bn1``,
    the RLA update's ``stage_bns``): those modules pass the group to the ops. state_dict keys and
    values are unchanged. ``process_group`` None means the default (world) group at call time.
    """
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        out = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    elif isinstance(module, SyncBatchNorm2d):
        module.process_group = process_group
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "process_group_of"]
