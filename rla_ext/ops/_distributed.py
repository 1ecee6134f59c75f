"""Synchronised (cross-process) BatchNorm statistics, shared by the ops and ``rla_ext.nn.SyncBatchNorm2d``.

torch's ``nn.SyncBatchNorm`` refuses CPU modules, so the statistics are all-reduced here through
``torch.distributed`` directly; this works on gloo (CPU) and NCCL (GPU) alike.

Every exchange goes through :func:`all_reduce_sum`, a functional collective (differentiable through
``_AllReduceSum`` where autograd must flow through it), so ``torch.compile(fullgraph=True)`` traces
synchronised BatchNorm, collectives included, without a graph break.

Statistics are combined per channel from each rank's (count, mean, M2 = count * biased var) in
float64: the pooled second moment ``sum(M2 + count * mean^2)`` minus ``M * mean_glob^2`` cancels only
in float64, where the local means already remove the large part of the values, so it stays accurate
(shifting by each rank's own mean is the Welford/Chan idea). Semantics are those of SyncBatchNorm:
normalisation with the global biased variance, running variance with the global unbiased one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rla_ext.ops import _batchnorm as bn

ProcessGroup = object  # torch.distributed.ProcessGroup; kept loose so this imports without distributed support

_DIMS = (0, 2, 3)


def check_process_group(process_group: object) -> object:
    """None (no synchronisation) or a process group of an initialised torch.distributed."""
    if process_group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: given, but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or pass process_group=None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    return process_group


def syncs(process_group: object, training: bool) -> bool:
    """Whether a call synchronises: batch statistics AND a group of more than one rank."""
    return training and process_group is not None and dist.get_world_size(process_group) > 1


def _c(t: Tensor) -> Tensor:
    return t[None, :, None, None]


def all_reduce_sum(t: Tensor, group: object) -> Tensor:
    """The sum of `t` over the ranks of `group`, as a new tensor (`t` is left unchanged); blocks until done.

    Every exchange of the fused ops' synchronised BatchNorm goes through here. It is the out-of-place
    functional collective (``_c10d_functional.all_reduce`` + ``wait_tensor``, what
    ``torch.distributed._functional_collectives`` is built on, without its AsyncCollectiveTensor
    wrapper), so torch.compile puts it in the graph as it stands, in forward and backward alike, and
    no intermediate is mutated in place. Same values as an in-place ``dist.all_reduce`` (the same sum
    by the same backend); works on gloo and NCCL.
    """
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_reduce(t.contiguous(), "sum", group.group_name))


class _AllReduceSum(torch.autograd.Function):
    """:func:`all_reduce_sum` with its gradient, for the differentiable path: every rank's output is the
    sum of every rank's input, so each input's gradient is the sum over ranks of the output gradients
    (as ``torch.distributed.nn.functional.all_reduce``, which torch.compile refuses to trace)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: object) -> Tensor:
        ctx.group = group
        return all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


# ------------------------------------------------------------------ fused-op path (explicit backward)
@torch.no_grad()
def global_stats(mean: Tensor, var: Tensor, count: int, group: object) -> tuple[Tensor, Tensor, Tensor]:
    """Local batch mean / biased var (C,) over `count` values -> global (mean, biased var, count).

    Returns mean and var in the dtype of `mean`, count as a float64 scalar tensor (no host sync).
    """
    m = mean.double()
    packed = torch.cat((m.new_full((1,), float(count)), m * count, (var.double() + m * m) * count))
    packed = all_reduce_sum(packed, group)
    total, s, q = packed[0], packed[1:1 + m.numel()], packed[1 + m.numel():]
    gmean = s / total
    gvar = (q / total - gmean * gmean).clamp_min(0)
    return gmean.to(mean.dtype), gvar.to(mean.dtype), total


@torch.no_grad()
def update_running(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                   total: Tensor, momentum: float) -> None:
    """The running update with the global unbiased variance; `total` is the global count (tensor)."""
    if running_mean is None or running_var is None:
        return
    unbiased = var.double() * (total / (total - 1))
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def normalise(z: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(xhat, gamma * xhat + beta) in the stat dtype; z (N, C, H, W) in any float dtype."""
    rstd = torch.rsqrt(var + eps)
    xhat = (z.to(mean.dtype) - _c(mean)) * _c(rstd)
    return xhat, xhat * _c(gamma) + _c(beta)


@torch.no_grad()
def bn_input_grad(g: Tensor, xhat: Tensor, total: Tensor, group: object) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient at the BN output g -> (g', local dgamma, local dbeta), all in the stat dtype.

    g' = g - dbeta_glob / M - xhat * dgamma_glob / M, so that gamma * rstd * g' is the BN input
    gradient with the global statistics' dependence on every rank's values included. dgamma / dbeta
    are LOCAL sums: DDP (or the caller) reduces parameter gradients itself.
    """
    dbeta = g.sum(_DIMS)
    dgamma = (g * xhat).sum(_DIMS)
    both = all_reduce_sum(torch.stack((dbeta, dgamma)).double(), group)
    both = (both / total).to(g.dtype)
    return g - _c(both[0]) - xhat * _c(both[1]), dgamma, dbeta


# ------------------------------------------------------------------ differentiable path (modules, reference)
def sync_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, momentum: float, eps: float, group: object) -> Tensor:
    """Training-mode batch_norm over the union of every rank's batch. x (N, C, H, W) -> same shape/dtype.

    Autograd flows through the differentiable all-reduce, so every rank's input gradient includes the
    other ranks' dependence on its values (what a single process with the whole batch computes).
    """
    c = x.shape[1]
    count = x.numel() // c
    bn.check_training_batch(count, x.shape, True)
    sd = bn.stat_dtype(x.dtype)
    xs = x.to(sd)
    mean = xs.mean(_DIMS)
    m2 = (xs - _c(mean)).square().sum(_DIMS)
    m = mean.double()
    packed = torch.cat((m.new_full((1,), float(count)), m * count, m2.double() + m * m * count))
    packed = _AllReduceSum.apply(packed, group)
    total, s, q = packed[0], packed[1:1 + c], packed[1 + c:]
    gmean = s / total
    gvar = (q / total - gmean * gmean).clamp_min(0)
    update_running(running_mean, running_var, gmean.detach(), gvar.detach(), total.detach(), momentum)
    gmean, gvar = gmean.to(sd), gvar.to(sd)
    out = (xs - _c(gmean)) * _c(torch.rsqrt(gvar + eps))
    if weight is not None:
        out = out * _c(weight.to(sd))
    if bias is not None:
        out = out + _c(bias.to(sd))
    return out.to(x.dtype)
