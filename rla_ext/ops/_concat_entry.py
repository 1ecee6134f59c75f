"""What the block-entry ops share once an op has validated its arguments and picked a fused backend.

``concat_conv_bn_act`` (the bottleneck's 1x1 entry) and ``concat_conv3x3_bn_act`` (the basic block's
3x3 entry) both compute ``act(batch_norm(conv(cat(x, h))))`` with kernels of one interface; they differ
only in the convolution and its extra kernel arguments (the 3x3 entry's stride). The autograd Functions
(local and synchronised statistics) and the fused call's tail live here, once.

Each op module registers the calls of its two custom ops under its name (:func:`register`):

    fwd(x, h, weight, gamma, beta, running_mean, running_var, training, momentum, eps, relu, *extra, backend)
        -> (out, z, mean, var)          z: the pre-BN conv output, saved for backward
    bwd(grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu, training, *extra, backend)
        -> (dx, dh, dweight, dgamma, dbeta)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rla_ext.ops import _batchnorm as bn
from rla_ext.ops import _distributed
from rla_ext.ops import _validation as v
from rla_ext.ops._kernels import cpp_autograd, empty_activation

# op name -> (fwd call, bwd call): the ops' custom ops behind their eager fast paths.
_CALLS: dict[str, tuple[Callable[..., tuple[Tensor, ...]], Callable[..., tuple[Tensor, ...]]]] = {}


def register(op: str, fwd: Callable[..., tuple[Tensor, ...]], bwd: Callable[..., tuple[Tensor, ...]]) -> None:
    _CALLS[op] = (fwd, bwd)


def fake_grads(x: Tensor, h: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
    """The fake kernel of an entry op's bwd: (dx, dh, dweight, dgamma, dbeta) shaped like their inputs,
    the activations' gradients in x's memory format."""
    fmt = v.memory_format_of(x)
    return (empty_activation(x, x.shape[1], x.shape[2], x.shape[3], fmt),
            empty_activation(h, h.shape[1], h.shape[2], h.shape[3], fmt),
            torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(beta))


class EntryFunction(torch.autograd.Function):
    """Autograd for the fused backends: saves the inputs, the pre-BN conv output z and the statistics
    (never cat(x, h))."""

    @staticmethod
    def forward(ctx, x, h, weight, gamma, beta, running_mean, running_var, training, momentum, eps, relu, backend,
                op, extra):
        out, z, mean, var = _CALLS[op][0](x, h, weight, gamma, beta, running_mean, running_var, training, momentum,
                                          eps, relu, *extra, backend)
        ctx.save_for_backward(x, h, weight, gamma, beta, z, mean, var)
        ctx.config = (eps, relu, training, backend, op, extra)
        ctx.mark_non_differentiable(z, mean, var)
        # Backward ignores the gradients of z, mean and var: without this autograd would fill a zero
        # tensor of z's size for them on every backward call.
        ctx.set_materialize_grads(False)
        return out, z, mean, var

    @staticmethod
    def backward(ctx, grad_out, _gz, _gmean, _gvar):
        if grad_out is None:  # not materialised (above): nothing flows back
            return (None,) * 14
        x, h, weight, gamma, beta, z, mean, var = ctx.saved_tensors
        eps, relu, training, backend, op, extra = ctx.config
        dx, dh, dw, dgamma, dbeta = _CALLS[op][1](grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu,
                                                  training, *extra, backend)
        return dx, dh, dw, dgamma, dbeta, None, None, None, None, None, None, None, None, None


class SyncEntryFunction(torch.autograd.Function):
    """Training with statistics synchronised over a process group, on the fused kernels.

    Forward: the kernel in training mode gives z and the local statistics; these are all-reduced and
    z is normalised with the GLOBAL ones here. Backward: the BN statistics terms are all-reduced
    (bn_input_grad), then the kernel's EVAL-mode backward (no statistics terms, mask already applied)
    carries dz = gamma * rstd * g' through its convolutions. dgamma / dbeta are this rank's local sums.
    """

    @staticmethod
    def forward(ctx, x, h, weight, gamma, beta, running_mean, running_var, momentum, eps, relu, backend, group, op,
                extra):
        _, z, mean, var = _CALLS[op][0](x, h, weight, gamma, beta, None, None, True, momentum, eps, relu, *extra,
                                        backend)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        mean, var, total = _distributed.global_stats(mean, var, count, group)
        _distributed.update_running(running_mean, running_var, mean, var, total, momentum)
        _, out = _distributed.normalise(z, gamma, beta, mean, var, eps)
        out = (out.clamp_min(0) if relu else out).to(x.dtype)
        ctx.save_for_backward(x, h, weight, gamma, beta, z, mean, var, total)
        ctx.config = (eps, relu, backend, group, op, extra)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h, weight, gamma, beta, z, mean, var, total = ctx.saved_tensors
        eps, relu, backend, group, op, extra = ctx.config
        xhat, pre = _distributed.normalise(z, gamma, beta, mean, var, eps)
        g = grad_out.to(xhat.dtype)
        if relu:
            g = g * (pre > 0)
        g, dgamma, dbeta = _distributed.bn_input_grad(g, xhat, total, group)
        dx, dh, dw, _, _ = _CALLS[op][1](g.to(x.dtype), x, h, weight, gamma, beta, z, mean, var, eps, False, False,
                                         *extra, backend)
        return dx, dh, dw, dgamma, dbeta, None, None, None, None, None, None, None, None, None


def fused_call(op: str, extra: tuple, x: Tensor, h: Tensor, weight: Tensor, bn_weight: Tensor | None,
               bn_bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
               momentum: float, eps: float, relu: bool, backend: str, group: object | None) -> Tensor:
    """A validated block-entry call on fused `backend`: x and h in x's memory format, the BatchNorm affine
    in the statistics dtype, then the Function. `group`: the process group when the call synchronises its
    statistics (training on more than one rank), else None. `weight` is the kernels' canonical weight."""
    fmt = v.memory_format_of(x)
    gamma, beta = bn.affine(bn_weight, bn_bias, weight.shape[0], x)
    x, h = v.in_format(x, fmt), v.in_format(h, fmt)
    fast = None if group is not None else cpp_autograd(op, backend, x, h, weight, gamma, beta)
    if fast is not None:
        return fast(x, h, weight, gamma, beta, running_mean, running_var, training, momentum, *extra, eps, relu)
    if group is not None:
        return SyncEntryFunction.apply(x, h, weight, gamma, beta, running_mean, running_var, momentum, eps, relu,
                                       backend, group, op, extra)
    out, *_ = EntryFunction.apply(x, h, weight, gamma, beta, running_mean, running_var, training, momentum, eps,
                                  relu, backend, op, extra)
    return out
