"""The ConvLSTM aggregation cell (``rla_ext.nn.ConvLSTMCell``, released ``ConvLSTMCell_layer``) as one op.

    i, f, o, g = split(conv(cat(x, h)))             3x3, padding 1, optional bias (none as released); 4k outputs
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')

The released cell has no normalisation. Fused (cpp): cat(x, h) is not saved: the conv runs over a
concatenation that lives for the call while it is at most 1 MiB, else as two convolutions with the
weight's x and h columns summed (conv_over_cat in csrc/cpu/conv_cell.h); the gating is one vectorised
pass over the pre-activation z (saved for backward), and backward is one elementwise pass from
(z, c, c') to the pre-activation gradient followed by the convolution's input and weight gradients.

Backends: ``torch`` (the reference) and ``cpp``. ``cuda`` and ``triton`` route to the reference, for
the reason given in :mod:`rla_ext.ops.conv_gru_cell`: k = 32-channel cells are tiny next to the
C-channel GEMMs of the blocks, a GPU kernel would save launches, not traffic.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rla_ext import _backend, _reference
from rla_ext.ops import _autocast
from rla_ext.ops import _validation as v
from rla_ext.ops._kernels import eager_fast_path, empty_activation, kernels, register_kernel_fakes

_OP = "conv_lstm_cell"
FUSED = ("cpp",)


def _fwd_body(x: Tensor, h: Tensor, c: Tensor, weight: Tensor, bias: Tensor,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (h', c', z (pre-activation gates i, f, o, g))."""
    with _autocast.disabled(x.device.type):
        return kernels(_OP, backend).forward(x, h, c, weight, bias)


_fwd = torch.library.custom_op("rla_ext::conv_lstm_cell_fwd", mutates_args=())(_fwd_body)
_fwd_call = eager_fast_path(_fwd, _fwd_body)


@_fwd.register_fake
def _fwd_fake(x, h, c, weight, bias, backend):
    fmt = v.memory_format_of(x)
    k, hh, ww = h.shape[1], x.shape[2], x.shape[3]
    return (empty_activation(x, k, hh, ww, fmt), empty_activation(x, k, hh, ww, fmt),
            empty_activation(x, 4 * k, hh, ww, fmt))


def _bwd_body(grad_h: Tensor, grad_c: Tensor, x: Tensor, h: Tensor, c: Tensor, weight: Tensor, z: Tensor,
              c_out: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dh, dc, dweight, dbias)."""
    fmt = v.memory_format_of(x)
    grad_h = v.in_format(grad_h.to(x.dtype), fmt)
    grad_c = v.in_format(grad_c.to(x.dtype), fmt)
    with _autocast.disabled(x.device.type):
        return kernels(_OP, backend).backward(grad_h, grad_c, x, h, c, weight, z, c_out)


_bwd = torch.library.custom_op("rla_ext::conv_lstm_cell_bwd", mutates_args=())(_bwd_body)
_bwd_call = eager_fast_path(_bwd, _bwd_body)


@_bwd.register_fake
def _bwd_fake(grad_h, grad_c, x, h, c, weight, z, c_out, backend):
    fmt = v.memory_format_of(x)
    k = h.shape[1]
    return (empty_activation(x, x.shape[1], x.shape[2], x.shape[3], fmt),
            empty_activation(x, k, x.shape[2], x.shape[3], fmt), empty_activation(x, k, x.shape[2], x.shape[3], fmt),
            torch.empty_like(weight), weight.new_empty((4 * k,)))


# The kernel ops take the custom ops' arguments less the backend.
register_kernel_fakes(_OP, lambda *args: _fwd_fake(*args, None), lambda *args: _bwd_fake(*args, None))


class ConvLSTMCellFunction(torch.autograd.Function):
    """Autograd for the fused backends: saves the inputs, the pre-activation gates and c'."""

    @staticmethod
    def forward(ctx, x, h, c, weight, bias, backend):
        h_out, c_out, z = _fwd_call(x, h, c, weight, bias, backend)
        ctx.save_for_backward(x, h, c, weight, z, c_out)
        ctx.backend = backend
        ctx.mark_non_differentiable(z)
        return h_out, c_out, z

    @staticmethod
    def backward(ctx, grad_h, grad_c, _gz):
        x, h, c, weight, z, c_out = ctx.saved_tensors
        grads = _bwd_call(grad_h, grad_c, x, h, c, weight, z, c_out, ctx.backend)
        return (*grads, None)


def conv_lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """One ConvLSTM step (module docstring) with no concatenation built.

    Shapes:
        x: (N, C, H, W) the cell input; h, c: (N, k, H, W) the hidden and cell states.
        weight: (4k, C + k, 3, 3), gates i, f, o, g in row blocks of k; columns [0, C) act on x, [C, C+k) on h.
        bias: (4k,) or None (the released cell has none).
        returns: (h', c'), each (N, k, H, W) in x's memory format (contiguous or channels_last).
    Args:
        backend: "torch", "cpp", "cuda", "triton" or "auto"; None uses the selection in force. Only
            "cpp" has fused kernels; "cuda" / "triton" run the reference (module docstring).
    Dtypes: float16, bfloat16, float32, float64 (gating computed in float32 for half inputs). Under
    ``torch.autocast`` every tensor runs in the autocast dtype (float64 excepted).
    """
    if isinstance(x, Tensor):
        x, h, c, weight, bias = _autocast.cast(_autocast.autocast_dtype(x.device.type), x, h, c, weight, bias)
    v.check_activation("x", x)
    h = v.check_state("h", h, x)
    k = h.shape[1]
    c = v.check_state("c", c, x, k)
    weight = v.conv3x3_segments_weight("weight", weight, 4 * k, x.shape[1], k, x, "x")
    bias = v.bias_vector("bias", bias, 4 * k, x, "x")
    name = _backend.resolve(backend, x.device, _OP, (x.shape[2], x.shape[3]))
    if name not in FUSED:
        return _reference.conv_lstm_cell(x, h, c, weight, bias)
    if bias is None:
        bias = x.new_zeros((4 * k,))
    fmt = v.memory_format_of(x)
    x, h, c = v.in_format(x, fmt), v.in_format(h, fmt), v.in_format(c, fmt)
    if c is h:  # one zero tensor as both initial states: torch.compile refuses a tensor given twice to a Function
        c = c.clone()
    h_out, c_out, _ = ConvLSTMCellFunction.apply(x, h, c, weight, bias, name)
    return h_out, c_out
