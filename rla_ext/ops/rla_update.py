"""Op B: one RLA hidden-state update, ``rec3x3(tanh(bn(pool?(h) + out1x1(y))))``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rla_ext import _backend, _reference
from rla_ext.ops import _autocast
from rla_ext.ops import _batchnorm as bn
from rla_ext.ops import _distributed
from rla_ext.ops import _validation as v
from rla_ext.ops._kernels import (cpp_autograd, eager_fast_path, empty_activation, fake_forward_outputs,
                                  forward_with_stats, kernels, register_kernel_fakes)

_OP = "rla_update"


def _fwd_body(h: Tensor, y: Tensor, out_weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor | None,
              running_var: Tensor | None, rec_weight: Tensor, pool: bool, training: bool, momentum: float, eps: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out, s, mean, var); updates running_mean / running_var in place when training."""
    kern = kernels(_OP, backend)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    with _autocast.disabled(y.device.type):
        return forward_with_stats(
            lambda m, var: kern.forward(h, y, out_weight, gamma, beta, m, var, rec_weight, pool, eps),
            running_mean, running_var, training=training, momentum=momentum, count=count, dtype=y.dtype)


_fwd = torch.library.custom_op("rla_ext::rla_update_fwd",
                                mutates_args=("running_mean", "running_var"))(_fwd_body)
_fwd_call = eager_fast_path(_fwd, _fwd_body)


@_fwd.register_fake
def _fwd_fake(h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, pool, training, momentum, eps,
              backend):
    return fake_forward_outputs(y, out_weight.shape[0], gamma)


def _bwd_body(grad_out: Tensor, h: Tensor, y: Tensor, out_weight: Tensor, gamma: Tensor, beta: Tensor,
              rec_weight: Tensor, s: Tensor, mean: Tensor, var: Tensor, pool: bool, eps: float, training: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dh, dy, dout_weight, drec_weight, dgamma, dbeta)."""
    grad_out = v.in_format(grad_out.to(y.dtype), v.memory_format_of(y))
    with _autocast.disabled(y.device.type):
        return kernels(_OP, backend).backward(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var,
                                              pool, eps, training)


_bwd = torch.library.custom_op("rla_ext::rla_update_bwd",
                                mutates_args=())(_bwd_body)
_bwd_call = eager_fast_path(_bwd, _bwd_body)


@_bwd.register_fake
def _bwd_fake(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, pool, eps, training, backend):
    fmt = v.memory_format_of(y)
    return (empty_activation(h, h.shape[1], h.shape[2], h.shape[3], fmt),
            empty_activation(y, y.shape[1], y.shape[2], y.shape[3], fmt),
            torch.empty_like(out_weight), torch.empty_like(rec_weight), torch.empty_like(gamma),
            torch.empty_like(beta))


# The kernel ops' arguments are the custom ops' less the BatchNorm bookkeeping (fwd) or the backend (bwd).
register_kernel_fakes(_OP, lambda h, y, out_weight, gamma, *_: fake_forward_outputs(y, out_weight.shape[0], gamma),
                      lambda *args: _bwd_fake(*args, None))


class RLAUpdateFunction(torch.autograd.Function):
    """Autograd for the fused backends: saves inputs, the pre-BN sum s and the statistics; backward
    recomputes tanh(bn(s)) rather than keeping it."""

    @staticmethod
    def forward(ctx, h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, pool, training, momentum,
                eps, backend):
        out, s, mean, var = _fwd_call(h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, pool,
                                      training, momentum, eps, backend)
        ctx.save_for_backward(h, y, out_weight, gamma, beta, rec_weight, s, mean, var)
        ctx.config = (pool, eps, training, backend)
        ctx.mark_non_differentiable(s, mean, var)
        return out, s, mean, var

    @staticmethod
    def backward(ctx, grad_out, _gs, _gmean, _gvar):
        h, y, out_weight, gamma, beta, rec_weight, s, mean, var = ctx.saved_tensors
        pool, eps, training, backend = ctx.config
        dh, dy, dw_out, dw_rec, dgamma, dbeta = _bwd_call(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean,
                                                          var, pool, eps, training, backend)
        return dh, dy, dw_out, dgamma, dbeta, None, None, dw_rec, None, None, None, None, None


class SyncRLAUpdateFunction(torch.autograd.Function):
    """Training with statistics synchronised over a process group.

    Forward: the kernel in training mode gives s (pooled h + out1x1(y), one fused pass over y) and the
    local statistics; after the all-reduce, tanh(bn(s)) with the GLOBAL statistics and the 3x3 conv run
    here in ATen. Backward is written out in ATen (the kernel's backward starts at the 3x3 conv's
    output, before the point where the all-reduced statistics terms enter).
    """

    @staticmethod
    def forward(ctx, h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, pool, momentum, eps,
                backend, group):
        _, s, mean, var = _fwd_call(h, y, out_weight, gamma, beta, None, None, rec_weight, pool, True, momentum, eps,
                                    backend)
        count = y.shape[0] * y.shape[2] * y.shape[3]
        mean, var, total = _distributed.global_stats(mean, var, count, group)
        _distributed.update_running(running_mean, running_var, mean, var, total, momentum)
        _, pre = _distributed.normalise(s, gamma, beta, mean, var, eps)
        with _autocast.disabled(y.device.type):
            out = F.conv2d(torch.tanh(pre).to(y.dtype), rec_weight, padding=1)
        ctx.save_for_backward(h, y, out_weight, gamma, beta, rec_weight, s, mean, var, total)
        ctx.config = (pool, eps, group)
        return v.in_format(out, v.memory_format_of(y))

    @staticmethod
    def backward(ctx, grad_out):
        h, y, out_weight, gamma, beta, rec_weight, s, mean, var, total = ctx.saved_tensors
        pool, eps, group = ctx.config
        fmt = v.memory_format_of(y)
        with _autocast.disabled(y.device.type):
            xhat, pre = _distributed.normalise(s, gamma, beta, mean, var, eps)
            a = torch.tanh(pre)
            a_t = a.to(y.dtype)
            grad_out = v.in_format(grad_out.to(y.dtype), fmt)
            da = torch.nn.grad.conv2d_input(a_t.shape, rec_weight, grad_out, padding=1)
            drec = torch.nn.grad.conv2d_weight(a_t, rec_weight.shape, grad_out, padding=1)
            g = da.to(a.dtype) * (1 - a * a)
            g, dgamma, dbeta = _distributed.bn_input_grad(g, xhat, total, group)
            ds = (g * (gamma * torch.rsqrt(var + eps))[None, :, None, None]).to(y.dtype)
            k, c = out_weight.shape
            dy = v.in_format(torch.nn.grad.conv2d_input(y.shape, out_weight.view(k, c, 1, 1), ds), fmt)
            dw_out = torch.nn.grad.conv2d_weight(y, (k, c, 1, 1), ds).view(k, c)
            if pool:
                # 2x2 average pool, floor mode: each pooled value spreads a quarter to its window;
                # rows / columns beyond 2H / 2W get zero gradient.
                hy, wy = ds.shape[2:]
                dh = torch.zeros_like(h)
                dh[:, :, :2 * hy, :2 * wy] = (ds * 0.25).repeat_interleave(2, 2).repeat_interleave(2, 3)
            else:
                dh = ds
        return (v.in_format(dh, fmt), dy, dw_out, dgamma, dbeta, None, None, drec, None, None, None, None, None)


def rla_update(h: Tensor, y: Tensor, out_weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, rec_weight: Tensor, *, pool: bool = False,
               pool_mode: str = "floor", training: bool, momentum: float = 0.1, eps: float = 1e-5,
               backend: str | None = None, process_group: object | None = None) -> Tensor:
    """``conv3x3(tanh(batch_norm(avgpool2x2?(h) + conv1x1(y, out_weight))), rec_weight)``.

    Shapes:
        h: (N, k, Hh, Wh) previous hidden state; y: (N, C, H, W) the block's final output, where
            (H, W) = (Hh // 2, Wh // 2) when ``pool`` (2x2 average pool, stride 2) else (Hh, Wh);
            with ``pool_mode="ceil"``, (H, W) = (ceil(Hh / 2), ceil(Wh / 2)) when ``pool``.
        out_weight: (k, C, 1, 1) or (k, C), the stage's shared 1x1 conv.
        bn_weight, bn_bias, running_mean, running_var: (k,) or None (this block's BatchNorm).
        rec_weight: (k, k, 3, 3) or (k, 9k), the stage's shared 3x3 conv (padding 1, no bias).
        returns: (N, k, H, W), in y's memory format (contiguous or channels_last).
    Args: as ``concat_conv_bn_act`` (training, momentum, eps, backend, process_group: the BatchNorm's
        batch statistics synchronised over that torch.distributed group when training); pool as above.
        pool_mode: how ``pool`` rounds an odd side of h. "floor" (default): the published model
            (``F.avg_pool2d(h, 2, 2)``; an odd last row / column of h is dropped), so h only matches a
            stride-2 conv's output (ceil(H / 2)) at even sizes. "ceil": ``F.avg_pool2d(h, 2, 2,
            ceil_mode=True)``, the stride-2 convs' size at any input size; an edge window covering one
            row / column averages the values it covers. The two agree for even sides. Every backend
            computes it (the fused kernels pool odd sides in ceil mode through the same pooling call,
            then add the pooled h).
    Dtypes: float16, bfloat16, float32, float64 (statistics in float32, float64 for float64). Under
    ``torch.autocast`` h, y and both conv weights run in the autocast dtype (float64 excepted).
    """
    if isinstance(y, Tensor):
        h, y, out_weight, rec_weight = _autocast.cast(_autocast.autocast_dtype(y.device.type), h, y, out_weight,
                                                      rec_weight)
    (n, c, hy, wy), k, pool_mode, w_out, w_rec = v.check_update_inputs(h, y, out_weight, rec_weight, pool,
                                                                       pool_mode)
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps = bn.check_arguments(
        bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, out_shape=(n, k, hy, wy),
        like=y, like_name="y")
    group = _distributed.check_process_group(process_group)
    sync = _distributed.syncs(group, training)
    name = _backend.resolve(backend, y.device, _OP, (y.shape[2], y.shape[3]))
    if name == "torch":
        return _reference.rla_update(h, y, out_weight, bn_weight, bn_bias, running_mean, running_var, rec_weight,
                                     pool, training, momentum, eps, process_group=group if sync else None,
                                     pool_mode=pool_mode)
    h, pool = v.prepool_for_kernel(h, pool, pool_mode)  # the kernels pool in floor mode only
    fmt = v.memory_format_of(y)
    gamma, beta = bn.affine(bn_weight, bn_bias, k, y)
    h, y = v.in_format(h, fmt), v.in_format(y, fmt)
    fast = None if sync else cpp_autograd(_OP, name, h, y, w_out, gamma, beta, w_rec)
    if fast is not None:
        return fast(h, y, w_out, gamma, beta, running_mean, running_var, w_rec, pool, training, momentum, eps)
    if sync:
        return SyncRLAUpdateFunction.apply(h, y, w_out, gamma, beta, running_mean, running_var, w_rec, pool, momentum,
                                           eps, name, group)
    out, *_ = RLAUpdateFunction.apply(h, y, w_out, gamma, beta, running_mean, running_var, w_rec, pool, training,
                                      momentum, eps, name)
    return out
