"""BatchNorm bookkeeping shared by every backend: statistics dtype, affine defaults, eval
statistics, the training-batch check and the running-statistics update.

Semantics are those of ``torch.nn.functional.batch_norm``: ``momentum`` is the already-resolved
averaging factor, the running variance takes the UNBIASED batch variance, normalisation uses the
biased one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rla_ext.ops import _validation as v


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in float32 (float64 for float64 inputs), as PyTorch's own BN does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def affine(bn_weight: Tensor | None, bn_bias: Tensor | None, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """gamma, beta in the stat dtype; ones / zeros where the module has no affine parameters.

    The casts are ordinary autograd ops, so gradients reach the user's parameters in their dtype.
    """
    sd = stat_dtype(like.dtype)
    gamma = bn_weight.to(sd) if bn_weight is not None else torch.ones(channels, dtype=sd, device=like.device)
    beta = bn_bias.to(sd) if bn_bias is not None else torch.zeros(channels, dtype=sd, device=like.device)
    return gamma, beta


def check_training_batch(count: int, shape: torch.Size | tuple[int, ...], training: bool,
                         empty_batch: bool = False) -> None:
    """Batch statistics need more than one value per channel (same text as PyTorch). With `empty_batch`,
    no value at all passes, as in PyTorch's F.batch_norm (an empty output, running statistics untouched)."""
    if training and (count == 1 or (count == 0 and not empty_batch)):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}")


def check_eval_stats(running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                     prefix: str = "") -> None:
    names = f"{prefix}running_mean, {prefix}running_var"
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{names}: give both or neither")
    if not training and running_mean is None:
        raise ValueError(f"{names}: required when training=False (eval mode normalises with "
                         "them); pass training=True to normalise with batch statistics instead")


def eval_stats(running_mean: Tensor, running_var: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Fresh copies of the running statistics in the stat dtype of activations of `dtype`."""
    sd = stat_dtype(dtype)
    return (running_mean.detach().to(sd, copy=True).contiguous(),
            running_var.detach().to(sd, copy=True).contiguous())


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                         var: Tensor, count: int, momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch, with the unbiased batch variance."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():  # a context, not the decorator: its wrapper cost ~10 us per call
        # Three in-place ops and no temporaries (the unbiasing factor folds into add_'s alpha): these
        # run on every training call, and on small tensors each op is ~5 us of host time.
        running_mean.lerp_(mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype), momentum)
        running_var.mul_(1.0 - momentum).add_(var if var.dtype == running_var.dtype else var.to(running_var.dtype),
                                              alpha=momentum * count / (count - 1))


def reduce_grad_dtype(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """A kernel's stat-dtype parameter gradient, returned in the dtype autograd expects."""
    if grad is None or like is None:
        return grad
    return grad.to(like.dtype)


def check_arguments(bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
                    running_var: Tensor | None, training: bool, momentum: float | None, eps: float, *,
                    out_shape: tuple[int, int, int, int], like: Tensor, like_name: str, prefix: str = "",
                    empty_batch: bool = False) -> tuple:
    """Every BatchNorm argument of a fused op checked against the op's (N, channels, H, W) output
    (`empty_batch`: see check_training_batch).

    Returns (bn_weight, bn_bias, running_mean, running_var, training, momentum, eps), normalised.
    `prefix` goes before every argument name in errors (an op with two BatchNorms: "entry_").
    """
    n, channels, hh, ww = out_shape
    bn_weight = v.channel_vector(f"{prefix}bn_weight", bn_weight, channels, like, like_name)
    bn_bias = v.channel_vector(f"{prefix}bn_bias", bn_bias, channels, like, like_name)
    running_mean = v.channel_vector(f"{prefix}running_mean", running_mean, channels, like, like_name)
    running_var = v.channel_vector(f"{prefix}running_var", running_var, channels, like, like_name)
    training, momentum, eps = v.check_scalars(training, momentum, eps, prefix)
    check_eval_stats(running_mean, running_var, training, prefix)
    check_training_batch(n * hh * ww, out_shape, training, empty_batch)
    return bn_weight, bn_bias, running_mean, running_var, training, momentum, eps
