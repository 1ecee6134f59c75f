"""The basic-block entry: ``act(batch_norm(conv3x3(cat(x, h), stride, padding 1)))`` without ever
building ``cat(x, h)``.

The RLA basic block's first conv (3x3, carrying the block's stride) reads the block input x and the
RLA hidden state h. Fused: the conv is two library convolutions (oneDNN on CPU, cuDNN on GPU) with the
weight's column segments (x's columns [0, C), h's [C, C + k)) summed into one pre-BN output z, followed
by the BatchNorm + ReLU passes op A's kernels use; backward is that fused BN + ReLU backward, then each
segment's convolution backward (input and weight gradients). Only x, h, z and the statistics are kept
for backward. Autograd, the synchronised-statistics path and the call tail are op A's
(:mod:`rla_ext.ops._concat_entry`).

Backends: ``torch`` (the reference: the composition over the concatenation), ``cpp`` and ``cuda``
(csrc/cpu/, csrc/cuda/concat_conv3x3_bn_act.*). ``triton`` has no kernels of this op: it runs the
reference, as the ConvGRU / ConvLSTM cells do.

In float16 / bfloat16, z = conv(x, W[:, :C]) + conv(h, W[:, C:]) is rounded up to three times where the
reference's one conv over cat(x, h) rounds once (the same z the basic block's plain-PyTorch entry
computed before this op); see tests/ops/test_concat_conv3x3_bn_act.py for the precision bar this meets.
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

_OP = "concat_conv3x3_bn_act"
# Backends with a fused kernel pair for this op; the others run the reference (module docstring).
FUSED = ("cpp", "cuda")


def _fwd_body(x: Tensor, h: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor | None,
              running_var: Tensor | None, training: bool, momentum: float, eps: float, relu: bool, stride: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out, z, mean, var); updates running_mean / running_var in place when training."""
    kern = kernels(_OP, backend)
    ho, wo = v.conv3x3_out_size(x.shape[2], x.shape[3], stride)
    with _autocast.disabled(x.device.type):
        return forward_with_stats(lambda m, var: kern.forward(x, h, weight, gamma, beta, m, var, stride, eps, relu),
                                  running_mean, running_var, training=training, momentum=momentum,
                                  count=x.shape[0] * ho * wo, dtype=x.dtype)


_fwd = torch.library.custom_op("rla_ext::concat_conv3x3_bn_act_fwd",
                                mutates_args=("running_mean", "running_var"))(_fwd_body)
_fwd_call = eager_fast_path(_fwd, _fwd_body)


def _kernel_fwd_fake(x, h, weight, gamma, beta, mean, var, stride, eps, relu):
    return fake_forward_outputs(x, weight.shape[0], gamma, v.conv3x3_out_size(x.shape[2], x.shape[3], stride))


@_fwd.register_fake
def _fwd_fake(x, h, weight, gamma, beta, running_mean, running_var, training, momentum, eps, relu, stride, backend):
    return _kernel_fwd_fake(x, h, weight, gamma, beta, None, None, stride, eps, relu)


def _bwd_body(grad_out: Tensor, x: Tensor, h: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, z: Tensor,
              mean: Tensor, var: Tensor, eps: float, relu: bool, training: bool, stride: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dh, dweight, dgamma, dbeta)."""
    grad_out = v.in_format(grad_out.to(x.dtype), v.memory_format_of(x))
    with _autocast.disabled(x.device.type):
        return kernels(_OP, backend).backward(grad_out, x, h, weight, gamma, beta, z, mean, var, stride, eps, relu,
                                              training)


_bwd = torch.library.custom_op("rla_ext::concat_conv3x3_bn_act_bwd", mutates_args=())(_bwd_body)
_bwd_call = eager_fast_path(_bwd, _bwd_body)


@_bwd.register_fake
def _bwd_fake(grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu, training, stride, backend):
    return _concat_entry.fake_grads(x, h, weight, gamma, beta)


register_kernel_fakes(_OP, _kernel_fwd_fake,
                      lambda grad_out, x, h, weight, gamma, beta, *_: _concat_entry.fake_grads(x, h, weight, gamma,
                                                                                               beta))
_concat_entry.register(_OP, _fwd_call, _bwd_call)


def concat_conv3x3_bn_act(x: Tensor, h: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                          running_mean: Tensor | None, running_var: Tensor | None, *, stride: int = 1,
                          training: bool, momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                          backend: str | None = None, process_group: object | None = None) -> Tensor:
    """``act(batch_norm(conv2d(cat(x, h), weight, stride=stride, padding=1)))`` with no concatenation
    built or saved.

    Shapes:
        x: (N, C, H, W) block input; h: (N, k, H, W) RLA hidden state (same dtype and device).
        weight: (C_out, C + k, 3, 3); columns [0, C) act on x, [C, C+k) on h.
        bn_weight, bn_bias: (C_out,) or None (no affine). running_mean, running_var: (C_out,) or None;
            updated in place when ``training`` (unbiased variance, factor ``momentum``), read in eval.
        returns: (N, C_out, ceil(H / stride), ceil(W / stride)) (what the conv gives), in x's memory
            format (contiguous or channels_last).
    Args:
        stride: the conv's stride (the basic block's: 1, or 2 where it downsamples).
        training: batch statistics (True) or running statistics (False), as ``F.batch_norm``.
        momentum: the already-resolved averaging factor for the running statistics.
        activation: "relu" or "none".
        backend: "torch", "cpp", "cuda", "triton" or "auto"; None uses the selection in force. "triton"
            runs the reference (module docstring).
        process_group: a ``torch.distributed`` process group to synchronise the batch statistics over,
            as in :func:`rla_ext.ops.concat_conv_bn_act`; None (default): local statistics.
    An empty batch (N = 0) behaves as the reference (F.batch_norm): an empty output, running statistics
    untouched (an error when the statistics are synchronised over a group, as for SyncBatchNorm2d).
    Dtypes: float16, bfloat16, float32, float64 (statistics in float32, float64 for float64). Under
    ``torch.autocast`` x, h and weight run in the autocast dtype (float64 excepted), like a convolution.
    """
    if isinstance(x, Tensor):
        x, h, weight = _autocast.cast(_autocast.autocast_dtype(x.device.type), x, h, weight)
    v.check_activation("x", x, empty_batch=True)
    h = v.check_state("h", h, x, empty_batch=True)
    n, c = x.shape[0], x.shape[1]
    weight = v.conv3x3_segments_weight("weight", weight, None, c, h.shape[1], x, "x")
    stride = v.check_stride(stride)
    co = weight.shape[0]
    ho, wo = v.conv3x3_out_size(x.shape[2], x.shape[3], stride)
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps = bn.check_arguments(
        bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, out_shape=(n, co, ho, wo),
        like=x, like_name="x", empty_batch=True)
    activation = v.check_activation_name(activation)
    group = _distributed.check_process_group(process_group)
    sync = _distributed.syncs(group, training)
    name = _backend.resolve(backend, x.device, _OP, (x.shape[2], x.shape[3]))
    if name not in FUSED or n == 0:  # nothing to fuse in an empty batch: the reference's own result
        return _reference.concat_conv3x3_bn_act(x, h, weight, bn_weight, bn_bias, running_mean, running_var,
                                                stride, training, momentum, eps, activation,
                                                process_group=group if sync else None)
    return _concat_entry.fused_call(_OP, (stride,), x, h, weight, bn_weight, bn_bias, running_mean, running_var,
                                    training, momentum, eps, activation == "relu", name, group if sync else None)
