"""Op C: the block boundary, ``rla_update`` of step t and the next block's entry, reading y once.

    h_next = rla_update(h, y, out_weight, ...)                     rec3x3(tanh(bn(pool?(h) + W_out y)))
    out    = concat_conv_bn_act(y, h_next, entry_weight, ...)      act(bn_e(W_e [y; h_next]))

y (the block output, C channels) is the widest tensor of the step and both halves read it through a
1x1 conv. The fused kernel stacks ``[entry_weight[:, :C]; out_weight]`` into one (C_entry + k, C)
weight: ONE GEMM over y gives the entry's y-part and ``W_out y``; the entry adds the thin
``entry_weight[:, C:] @ h_next`` once h_next is known. Backward: one dgrad GEMM into y with the
stacked weight (both consumers' gradients at once) and one weight-gradient pass over y for both
weights. See docs/ARCHITECTURE.md ("Op C").
"""
from __future__ import annotations

import torch
from torch import Tensor

from rla_ext import _backend, _extension, _reference
from rla_ext.ops import _autocast
from rla_ext.ops import _batchnorm as bn
from rla_ext.ops import _distributed
from rla_ext.ops import _validation as v
from rla_ext.ops._kernels import cpp_autograd, eager_fast_path, empty_activation, kernels, register_kernel_fakes
from rla_ext.ops.concat_conv_bn_act import concat_conv_bn_act
from rla_ext.ops.rla_update import rla_update

_OP = "rla_update_and_entry"
# Backends with a kernel pair for this op (every fused backend).
FUSED = ("cpp", "cuda", "triton")
# The dispatch key of the extension's kernels for each backend that has them (one schema, csrc/ops.cpp).
_DISPATCH_KEY = {"cpp": "CPU", "cuda": "CUDA"}


# Registrations cannot change while a graph is traced (as _backend._unavailable_reason).
@torch.compiler.assume_constant_result
def _kernel_registered(dispatch_key: str) -> bool:
    """Whether the loaded rla_ext._C has this op's kernels for `dispatch_key` ("CPU" or "CUDA"); an
    extension built before the op (or, for "CUDA", before its CUDA kernels) has not."""
    return _extension.load_error() is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"rla_ext::{_OP}_kernel_{p}", dispatch_key)
        for p in ("fwd", "bwd"))


def _check_backend(backend: str | None, device: torch.device, size: tuple[int, int]) -> str:
    """The concrete backend: "torch" or one of FUSED ("auto" picks among them). triton runs on CUDA
    tensors, and on CPU tensors under Triton's interpreter (_backend.resolve)."""
    requested = _backend.get_backend() if backend is None else _backend._check_name(backend)
    name = _backend.resolve(requested, device, _OP, size)
    if name not in FUSED:
        return "torch"
    if name in _DISPATCH_KEY and not _kernel_registered(_DISPATCH_KEY[name]):
        if requested == "auto":
            return "torch"
        raise _backend.BackendUnavailableError(
            f"backend {name!r} is not available for {_OP}: the compiled extension rla_ext._C predates this op's "
            f"{name} kernels ({_extension.load_error() or 'no kernel registered'}); rebuild it with "
            "`pip install --no-build-isolation -e .` (or `make setup`)")
    return name


def _fwd_body(h: Tensor, y: Tensor, out_weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor | None,
              running_var: Tensor | None, rec_weight: Tensor, entry_weight: Tensor, entry_gamma: Tensor,
              entry_beta: Tensor, entry_running_mean: Tensor | None, entry_running_var: Tensor | None, pool: bool,
              training: bool, momentum: float, eps: float, entry_momentum: float, entry_eps: float, relu: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (h_next, s, mean, var, out, z, entry_mean, entry_var); updates both running-stat pairs in place
    when training."""
    kern = kernels(_OP, backend)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    with _autocast.disabled(y.device.type):
        if training:
            res = kern.forward(h, y, out_weight, gamma, beta, None, None, rec_weight, entry_weight, entry_gamma,
                               entry_beta, None, None, pool, eps, entry_eps, relu)
            bn.update_running_stats(running_mean, running_var, res[2], res[3], count, momentum)
            bn.update_running_stats(entry_running_mean, entry_running_var, res[6], res[7], count, entry_momentum)
            return res
        assert running_mean is not None and running_var is not None
        assert entry_running_mean is not None and entry_running_var is not None
        m, var = bn.eval_stats(running_mean, running_var, y.dtype)
        em, evar = bn.eval_stats(entry_running_mean, entry_running_var, y.dtype)
        return kern.forward(h, y, out_weight, gamma, beta, m, var, rec_weight, entry_weight, entry_gamma, entry_beta,
                            em, evar, pool, eps, entry_eps, relu)


_fwd = torch.library.custom_op(
    "rla_ext::rla_update_and_entry_fwd",
    mutates_args=("running_mean", "running_var", "entry_running_mean", "entry_running_var"))(_fwd_body)
_fwd_call = eager_fast_path(_fwd, _fwd_body)


@_fwd.register_fake
def _fwd_fake(h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, entry_weight, entry_gamma,
              entry_beta, entry_running_mean, entry_running_var, pool, training, momentum, eps, entry_momentum,
              entry_eps, relu, backend):
    return _kernel_fwd_fake(h, y, out_weight, gamma, beta, None, None, rec_weight, entry_weight, entry_gamma)


def _kernel_fwd_fake(h, y, out_weight, gamma, beta, mean, var, rec_weight, entry_weight, entry_gamma, *_):
    fmt = v.memory_format_of(y)
    k, ce, hh, ww = out_weight.shape[0], entry_weight.shape[0], y.shape[2], y.shape[3]
    return (empty_activation(y, k, hh, ww, fmt), empty_activation(y, k, hh, ww, fmt),
            gamma.new_empty((k,)), gamma.new_empty((k,)),
            empty_activation(y, ce, hh, ww, fmt), empty_activation(y, ce, hh, ww, fmt),
            entry_gamma.new_empty((ce,)), entry_gamma.new_empty((ce,)))


def _bwd_body(grad_h_next: Tensor, grad_out: Tensor, h: Tensor, y: Tensor, out_weight: Tensor, gamma: Tensor,
              beta: Tensor, rec_weight: Tensor, s: Tensor, mean: Tensor, var: Tensor, h_next: Tensor,
              entry_weight: Tensor, entry_gamma: Tensor, entry_beta: Tensor, z: Tensor, entry_mean: Tensor,
              entry_var: Tensor, pool: bool, eps: float, entry_eps: float, relu: bool, training: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dh, dy, dout_weight, drec_weight, dgamma, dbeta, dentry_weight, dentry_gamma, dentry_beta)."""
    fmt = v.memory_format_of(y)
    grad_h_next = v.in_format(grad_h_next.to(y.dtype), fmt)
    grad_out = v.in_format(grad_out.to(y.dtype), fmt)
    with _autocast.disabled(y.device.type):
        return kernels(_OP, backend).backward(grad_h_next, grad_out, h, y, out_weight, gamma, beta, rec_weight, s,
                                              mean, var, h_next, entry_weight, entry_gamma, entry_beta, z,
                                              entry_mean, entry_var, pool, eps, entry_eps, relu, training)


_bwd = torch.library.custom_op("rla_ext::rla_update_and_entry_bwd", mutates_args=())(_bwd_body)
_bwd_call = eager_fast_path(_bwd, _bwd_body)


@_bwd.register_fake
def _bwd_fake(grad_h_next, grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, h_next, entry_weight,
              entry_gamma, entry_beta, z, entry_mean, entry_var, pool, eps, entry_eps, relu, training, backend):
    fmt = v.memory_format_of(y)
    return (empty_activation(h, h.shape[1], h.shape[2], h.shape[3], fmt),
            empty_activation(y, y.shape[1], y.shape[2], y.shape[3], fmt),
            torch.empty_like(out_weight), torch.empty_like(rec_weight), torch.empty_like(gamma),
            torch.empty_like(beta), torch.empty_like(entry_weight), torch.empty_like(entry_gamma),
            torch.empty_like(entry_beta))


register_kernel_fakes(_OP, _kernel_fwd_fake, lambda *args: _bwd_fake(*args, None))


class RLAUpdateAndEntryFunction(torch.autograd.Function):
    """Autograd for the fused backends: saves the inputs, s, h_next, z and both statistics pairs (what the
    two single ops save, less the second copy of y)."""

    @staticmethod
    def forward(ctx, h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, entry_weight,
                entry_gamma, entry_beta, entry_running_mean, entry_running_var, pool, training, momentum, eps,
                entry_momentum, entry_eps, relu, backend):
        h_next, s, mean, var, out, z, emean, evar = _fwd_call(
            h, y, out_weight, gamma, beta, running_mean, running_var, rec_weight, entry_weight, entry_gamma,
            entry_beta, entry_running_mean, entry_running_var, pool, training, momentum, eps, entry_momentum,
            entry_eps, relu, backend)
        ctx.save_for_backward(h, y, out_weight, gamma, beta, rec_weight, s, mean, var, h_next, entry_weight,
                              entry_gamma, entry_beta, z, emean, evar)
        ctx.config = (pool, eps, entry_eps, relu, training, backend)
        ctx.mark_non_differentiable(s, mean, var, z, emean, evar)
        return h_next, out, s, mean, var, z, emean, evar

    @staticmethod
    def backward(ctx, grad_h_next, grad_out, *_unused):
        (h, y, out_weight, gamma, beta, rec_weight, s, mean, var, h_next, entry_weight, entry_gamma, entry_beta, z,
         emean, evar) = ctx.saved_tensors
        pool, eps, entry_eps, relu, training, backend = ctx.config
        dh, dy, dw_out, dw_rec, dgamma, dbeta, dw_e, dgamma_e, dbeta_e = _bwd_call(
            grad_h_next, grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, h_next, entry_weight,
            entry_gamma, entry_beta, z, emean, evar, pool, eps, entry_eps, relu, training, backend)
        return (dh, dy, dw_out, dgamma, dbeta, None, None, dw_rec, dw_e, dgamma_e, dbeta_e, None, None, None, None,
                None, None, None, None, None, None)


def rla_update_and_entry(h: Tensor, y: Tensor, out_weight: Tensor, bn_weight: Tensor | None,
                         bn_bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                         rec_weight: Tensor, entry_weight: Tensor, entry_bn_weight: Tensor | None,
                         entry_bn_bias: Tensor | None, entry_running_mean: Tensor | None,
                         entry_running_var: Tensor | None, *, pool: bool = False, pool_mode: str = "floor",
                         training: bool, momentum: float = 0.1, eps: float = 1e-5, entry_momentum: float = 0.1,
                         entry_eps: float = 1e-5, activation: str = "relu", backend: str | None = None,
                         process_group: object | None = None) -> tuple[Tensor, Tensor]:
    """The block boundary: ``(h_next, entry_out)`` with

        h_next    = rla_update(h, y, out_weight, bn_weight, bn_bias, running_mean, running_var, rec_weight,
                               pool=pool, pool_mode=pool_mode, training=training, momentum=momentum, eps=eps)
        entry_out = concat_conv_bn_act(y, h_next, entry_weight, entry_bn_weight, entry_bn_bias,
                                       entry_running_mean, entry_running_var, training=training,
                                       momentum=entry_momentum, eps=entry_eps, activation=activation)

    equal to that composition in values, gradients and running-statistics updates, with y read once
    (see the module docstring).

    Shapes:
        h: (N, k, Hh, Wh) the state before block t's update; y: (N, C, H, W) block t's final output (the
            next block's input), (H, W) = h's size, pooled when ``pool`` (as ``rla_update``).
        out_weight: (k, C, 1, 1) or (k, C); rec_weight: (k, k, 3, 3) or (k, 9k); bn_weight, bn_bias,
            running_mean, running_var: (k,) or None: the update's, as ``rla_update``.
        entry_weight: (C_entry, C + k, 1, 1) or (C_entry, C + k), columns [0, C) on y, [C, C + k) on
            h_next; entry_bn_weight, entry_bn_bias, entry_running_mean, entry_running_var: (C_entry,) or
            None: the next block's entry, as ``concat_conv_bn_act``.
        returns: h_next (N, k, H, W) and entry_out (N, C_entry, H, W), both in y's memory format.
    Args: as the two ops. ``training`` applies to both BatchNorms; ``momentum`` / ``eps`` are the
        update's, ``entry_momentum`` / ``entry_eps`` / ``activation`` ("relu" or "none") the entry's.
        process_group: statistics synchronised over that group when training; the boundary then runs as
            the two (synchronised) ops on the chosen backend, unfused.
    Backends: ``torch`` (the composition of the two reference ops), ``cpp`` (the fused CPU kernel),
        ``cuda`` (the fused CUDA kernels, CUDA tensors) and ``triton`` (CUDA tensors, or CPU tensors under
        Triton's interpreter); ``auto`` picks among these. The cuda and triton kernels have been proved
        on CPU only (CUDA emulator, Triton interpreter) until a GPU run.
    Dtypes: float16, bfloat16, float32, float64 (statistics in float32, float64 for float64). Under
    ``torch.autocast`` h, y and the three conv weights run in the autocast dtype (float64 excepted).
    """
    if isinstance(y, Tensor):
        h, y, out_weight, rec_weight, entry_weight = _autocast.cast(
            _autocast.autocast_dtype(y.device.type), h, y, out_weight, rec_weight, entry_weight)
    (n, c, hy, wy), k, pool_mode, w_out, w_rec = v.check_update_inputs(h, y, out_weight, rec_weight, pool,
                                                                       pool_mode)
    w_e = v.weight_matrix("entry_weight", entry_weight, None, c + k, y, "y", f"C + k = {c} + {k}")
    ce = w_e.shape[0]
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps = bn.check_arguments(
        bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, out_shape=(n, k, hy, wy),
        like=y, like_name="y")
    entry_bn_weight, entry_bn_bias, entry_running_mean, entry_running_var, _, entry_momentum, entry_eps = (
        bn.check_arguments(entry_bn_weight, entry_bn_bias, entry_running_mean, entry_running_var, training,
                           entry_momentum, entry_eps, out_shape=(n, ce, hy, wy), like=y, like_name="y",
                           prefix="entry_"))
    activation = v.check_activation_name(activation)
    group = _distributed.check_process_group(process_group)
    name = _check_backend(backend, y.device, (hy, wy))
    if name == "torch":
        pg = group if _distributed.syncs(group, training) else None
        h_next = _reference.rla_update(h, y, out_weight, bn_weight, bn_bias, running_mean, running_var, rec_weight,
                                       pool, training, momentum, eps, process_group=pg, pool_mode=pool_mode)
        out = _reference.concat_conv_bn_act(y, h_next, entry_weight, entry_bn_weight, entry_bn_bias,
                                            entry_running_mean, entry_running_var, training, entry_momentum,
                                            entry_eps, activation, process_group=pg)
        return h_next, out
    if _distributed.syncs(group, training):
        h_next = rla_update(h, y, w_out, bn_weight, bn_bias, running_mean, running_var, w_rec, pool=pool,
                            pool_mode=pool_mode, training=training, momentum=momentum, eps=eps, backend=name,
                            process_group=group)
        out = concat_conv_bn_act(y, h_next, w_e, entry_bn_weight, entry_bn_bias, entry_running_mean,
                                 entry_running_var, training=training, momentum=entry_momentum, eps=entry_eps,
                                 activation=activation, backend=name, process_group=group)
        return h_next, out
    h, pool = v.prepool_for_kernel(h, pool, pool_mode)  # the kernels pool in floor mode only
    fmt = v.memory_format_of(y)
    gamma, beta = bn.affine(bn_weight, bn_bias, k, y)
    entry_gamma, entry_beta = bn.affine(entry_bn_weight, entry_bn_bias, ce, y)
    h, y = v.in_format(h, fmt), v.in_format(y, fmt)
    args = (h, y, w_out, gamma, beta, running_mean, running_var, w_rec, w_e, entry_gamma, entry_beta,
            entry_running_mean, entry_running_var, pool, training, momentum, eps, entry_momentum, entry_eps,
            activation == "relu")
    fast = cpp_autograd(_OP, name, h, y, w_out, gamma, beta, w_rec, w_e, entry_gamma, entry_beta)
    if fast is not None:
        h_next, out = fast(*args)
        return h_next, out
    h_next, out, *_ = RLAUpdateAndEntryFunction.apply(*args, name)
    return h_next, out
