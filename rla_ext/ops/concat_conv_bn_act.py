"""Op A: ``act(batch_norm(conv1x1(cat(x, h))))`` without ever building ``cat(x, h)``.

This is the RLA bottleneck's entry: its first 1x1 conv reads the block input x and the RLA hidden
state h as two slices of one reduction.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rla_ext import _backend, _reference
from rla_ext.ops import _autocast, _concat_entry
from rla_ext.ops import _batchnorm as bn
from rla_ext.ops import _distributed
from rla_ext.ops import _validation as v
from rla_ext.ops._kernels import (eager_fast_path, fake_forward_outputs, forward_with_stats, kernels,
                                  register_kernel_fakes)

_OP = "concat_conv_bn_act"


def _fwd_body(x: Tensor, h: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor | None,
              running_var: Tensor | None, training: bool, momentum: float, eps: float, relu: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out, z, mean, var); updates running_mean / running_var in place when training."""
    kern = kernels(_OP, backend)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    with _autocast.disabled(x.device.type):
        return forward_with_stats(lambda m, var: kern.forward(x, h, weight, gamma, beta, m, var, eps, relu),
                                  running_mean, running_var, training=training, momentum=momentum, count=count,
                                  dtype=x.dtype)


_fwd = torch.library.custom_op("rla_ext::concat_conv_bn_act_fwd",
                                mutates_args=("running_mean", "running_var"))(_fwd_body)
_fwd_call = eager_fast_path(_fwd, _fwd_body)


@_fwd.register_fake
def _fwd_fake(x, h, weight, gamma, beta, running_mean, running_var, training, momentum, eps, relu, backend):
    return fake_forward_outputs(x, weight.shape[0], gamma)


def _bwd_body(grad_out: Tensor, x: Tensor, h: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, z: Tensor,
              mean: Tensor, var: Tensor, eps: float, relu: bool, training: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dh, dweight, dgamma, dbeta)."""
    grad_out = v.in_format(grad_out.to(x.dtype), v.memory_format_of(x))
    with _autocast.disabled(x.device.type):
        return kernels(_OP, backend).backward(grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu,
                                              training)


_bwd = torch.library.custom_op("rla_ext::concat_conv_bn_act_bwd",
                                mutates_args=())(_bwd_body)
_bwd_call = eager_fast_path(_bwd, _bwd_body)


@_bwd.register_fake
def _bwd_fake(grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu, training, backend):
    return _concat_entry.fake_grads(x, h, weight, gamma, beta)


register_kernel_fakes(_OP, lambda x, h, weight, gamma, *_: fake_forward_outputs(x, weight.shape[0], gamma),
                      lambda grad_out, x, h, weight, gamma, beta, *_: _concat_entry.fake_grads(x, h, weight, gamma,
                                                                                               beta))
_concat_entry.register(_OP, _fwd_call, _bwd_call)


def concat_conv_bn_act(x: Tensor, h: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                       running_mean: Tensor | None, running_var: Tensor | None, *, training: bool,
                       momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                       backend: str | None = None, process_group: object | None = None) -> Tensor:
    """``act(batch_norm(conv1x1(cat(x, h), weight)))`` with no concatenation built or saved.

    Shapes:
        x: (N, C, H, W) block input; h: (N, k, H, W) RLA hidden state (same dtype and device).
        weight: (C_out, C + k, 1, 1) or (C_out, C + k); columns [0, C) act on x, [C, C+k) on h.
        bn_weight, bn_bias: (C_out,) or None (no affine). running_mean, running_var: (C_out,) or None;
            updated in place when ``training`` (unbiased variance, factor ``momentum``), read in eval.
        returns: (N, C_out, H, W), in x's memory format (contiguous or channels_last).
    Args:
        training: batch statistics (True) or running statistics (False), as ``F.batch_norm``.
        momentum: the already-resolved averaging factor for the running statistics.
        activation: "relu" or "none".
        backend: "torch", "cpp", "cuda", "triton" or "auto"; None uses the selection in force.
        process_group: a ``torch.distributed`` process group to synchronise the batch statistics over
            (SyncBatchNorm semantics: every rank normalises with the statistics of the union of the
            ranks' batches, and input gradients include the other ranks' terms; parameter gradients
            are this rank's, for DDP to reduce). Only used when ``training`` and the group has more
            than one rank; None (default): local statistics. Every rank must make the same calls.
    Dtypes: float16, bfloat16, float32, float64 (statistics in float32, float64 for float64). Under
    ``torch.autocast`` x, h and weight run in the autocast dtype (float64 excepted), like a convolution.
    """
    if isinstance(x, Tensor):
        x, h, weight = _autocast.cast(_autocast.autocast_dtype(x.device.type), x, h, weight)
    v.check_activation("x", x)
    v.check_activation("h", h, x, "x")
    n, c, hh, ww = x.shape
    if h.shape[0] != n or tuple(h.shape[2:]) != (hh, ww):
        raise ValueError(f"h: expected shape ({n}, k, {hh}, {ww}) to match x {tuple(x.shape)}, got {tuple(h.shape)}")
    k = h.shape[1]
    w2 = v.weight_matrix("weight", weight, None, c + k, x, "x", f"C + k = {c} + {k}")
    co = w2.shape[0]
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps = bn.check_arguments(
        bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, out_shape=(n, co, hh, ww),
        like=x, like_name="x")
    activation = v.check_activation_name(activation)
    group = _distributed.check_process_group(process_group)
    sync = _distributed.syncs(group, training)
    name = _backend.resolve(backend, x.device, _OP, (x.shape[2], x.shape[3]))
    if name == "torch":
        return _reference.concat_conv_bn_act(x, h, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                             momentum, eps, activation, process_group=group if sync else None)
    return _concat_entry.fused_call(_OP, (), x, h, w2, bn_weight, bn_bias, running_mean, running_var, training,
                                    momentum, eps, activation == "relu", name, group if sync else None)
