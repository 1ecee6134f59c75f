"""The ONE place that turns an ``nn.BatchNorm2d`` into the arguments of ``F.batch_norm``-style ops.

``nn.BatchNorm2d.forward`` does a little bookkeeping before it calls ``F.batch_norm``: it bumps
``num_batches_tracked``, resolves ``momentum=None`` into a cumulative average, and decides whether
batch statistics are used and whether running statistics are passed at all. The fused ops take the
already-resolved values, so every module that feeds a BatchNorm's state into a fused op must do
the same bookkeeping, identically; it lives here so it cannot drift between modules.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


class BNArgs(NamedTuple):
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    momentum: float
    eps: float


def bn_args(bn: _BatchNorm) -> BNArgs:
    """Resolve `bn`'s state for one forward call, exactly as ``nn.BatchNorm2d.forward`` does.

    Side effect (as in PyTorch): in training mode with ``track_running_stats``,
    ``bn.num_batches_tracked`` is incremented. Call this once per forward of the layer.

    Returns the affine parameters (or None), the running statistics to pass (None when they must
    not be read or updated), whether batch statistics are used, the resolved averaging factor
    (``1 / num_batches_tracked`` when ``bn.momentum`` is None) and eps.
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a torch.nn BatchNorm module, got {type(bn).__name__}")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    # Modules built with track_running_stats=False have no running buffers and always use batch
    # statistics, in eval too.
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    pass_stats = not bn.training or bn.track_running_stats
    return BNArgs(bn.weight, bn.bias,
                  bn.running_mean if pass_stats else None,
                  bn.running_var if pass_stats else None,
                  bool(use_batch_stats), float(factor), float(bn.eps))
