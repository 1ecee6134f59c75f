"""The ConvGRU aggregation cell (``rla_ext.nn.ConvGRUCell``, released ``ConvGRUCell_layer``) as one op.

    r, u = split(gate_conv(cat(x, h)))              3x3, padding 1, bias; 2k outputs
    r = sigmoid(GN_r(r)),  u = sigmoid(GN_u(u))     GroupNorm(1 group, eps = 1e-6 as released)
    y = tanh(GN_o(output_conv(cat(x, r * h))))      3x3, padding 1, bias; k outputs
    h' = u * h + (1 - u) * y

Fused (cpp): no concatenation is saved. Each conv runs as one convolution over a concatenation that
lives for the call while it is at most 1 MiB, else as two with the weight's x and h columns summed into
one pre-norm output (conv_over_cat in csrc/cpu/conv_cell.h); the GroupNorm statistics (per sample, per
gate), the sigmoid / tanh gating and ``r * h`` are fused, vectorised passes; backward recomputes r, u, y
from the saved pre-norm outputs and per-sample statistics (N x 3 means and reciprocal deviations).

Backends: ``torch`` (the reference) and ``cpp``. ``cuda`` and ``triton`` route to the reference (plain
PyTorch on the GPU), deliberately: the cell works on k = 32-channel tensors, tiny next to the
C-channel block GEMMs around it (at RLA-GRU-ResNet-50's first stage, N=8, 56x56, the cell's five
k-channel convolutions move ~1/8 of the bytes of one bottleneck's 256-channel convs), so on a GPU a
fused cell would save a few launches per block, not the memory traffic the other fused ops remove.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rla_ext import _backend, _reference
from rla_ext.ops import _autocast
from rla_ext.ops import _validation as v
from rla_ext.ops._batchnorm import stat_dtype
from rla_ext.ops._kernels import eager_fast_path, empty_activation, kernels, register_kernel_fakes

_OP = "conv_gru_cell"
# Backends with a fused kernel pair for this op; the others run the reference (see the module docstring).
FUSED = ("cpp",)


def _fwd_body(x: Tensor, h: Tensor, gate_weight: Tensor, gate_bias: Tensor, output_weight: Tensor,
              output_bias: Tensor, gamma: Tensor, beta: Tensor, eps: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (h', zg (pre-norm r, u), zo (pre-norm output), stats (N, 3, 2): per sample and gate (mean, rstd))."""
    with _autocast.disabled(x.device.type):
        return kernels(_OP, backend).forward(x, h, gate_weight, gate_bias, output_weight, output_bias, gamma, beta,
                                             eps)


_fwd = torch.library.custom_op("rla_ext::conv_gru_cell_fwd", mutates_args=())(_fwd_body)
_fwd_call = eager_fast_path(_fwd, _fwd_body)


@_fwd.register_fake
def _fwd_fake(x, h, gate_weight, gate_bias, output_weight, output_bias, gamma, beta, eps, backend):
    fmt = v.memory_format_of(x)
    k, hh, ww = h.shape[1], x.shape[2], x.shape[3]
    return (empty_activation(x, k, hh, ww, fmt), empty_activation(x, 2 * k, hh, ww, fmt),
            empty_activation(x, k, hh, ww, fmt), gamma.new_empty((x.shape[0], 3, 2)))


def _bwd_body(grad_out: Tensor, x: Tensor, h: Tensor, gate_weight: Tensor, output_weight: Tensor, gamma: Tensor,
              beta: Tensor, zg: Tensor, zo: Tensor, stats: Tensor,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dh, dgate_weight, dgate_bias, doutput_weight, doutput_bias, dgamma, dbeta)."""
    grad_out = v.in_format(grad_out.to(x.dtype), v.memory_format_of(x))
    with _autocast.disabled(x.device.type):
        return kernels(_OP, backend).backward(grad_out, x, h, gate_weight, output_weight, gamma, beta, zg, zo, stats)


_bwd = torch.library.custom_op("rla_ext::conv_gru_cell_bwd", mutates_args=())(_bwd_body)
_bwd_call = eager_fast_path(_bwd, _bwd_body)


@_bwd.register_fake
def _bwd_fake(grad_out, x, h, gate_weight, output_weight, gamma, beta, zg, zo, stats, backend):
    fmt = v.memory_format_of(x)
    k = h.shape[1]
    return (empty_activation(x, x.shape[1], x.shape[2], x.shape[3], fmt),
            empty_activation(x, k, x.shape[2], x.shape[3], fmt), torch.empty_like(gate_weight),
            gate_weight.new_empty((2 * k,)), torch.empty_like(output_weight), output_weight.new_empty((k,)),
            torch.empty_like(gamma), torch.empty_like(beta))


# The kernel ops take the custom ops' arguments less the backend.
register_kernel_fakes(_OP, lambda *args: _fwd_fake(*args, None), lambda *args: _bwd_fake(*args, None))


class ConvGRUCellFunction(torch.autograd.Function):
    """Autograd for the fused backends: saves the inputs, the pre-norm outputs and the statistics."""

    @staticmethod
    def forward(ctx, x, h, gate_weight, gate_bias, output_weight, output_bias, gamma, beta, eps, backend):
        out, zg, zo, stats = _fwd_call(x, h, gate_weight, gate_bias, output_weight, output_bias, gamma, beta, eps,
                                       backend)
        ctx.save_for_backward(x, h, gate_weight, output_weight, gamma, beta, zg, zo, stats)
        ctx.backend = backend
        ctx.mark_non_differentiable(zg, zo, stats)
        return out, zg, zo, stats

    @staticmethod
    def backward(ctx, grad_out, _gzg, _gzo, _gstats):
        x, h, gate_weight, output_weight, gamma, beta, zg, zo, stats = ctx.saved_tensors
        grads = _bwd_call(grad_out, x, h, gate_weight, output_weight, gamma, beta, zg, zo, stats, ctx.backend)
        return (*grads, None, None)


def _norm_params(norms: tuple, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The three GroupNorms' (name, weight, bias), checked, stacked (r, u, o) as (3k,) tensors in the
    statistics dtype (ones / zeros where a norm has no affine)."""
    sd = stat_dtype(like.dtype)
    ws, bs = [], []
    for _, w, b in norms:
        ws.append(like.new_ones((k,), dtype=sd) if w is None else w.to(sd))
        bs.append(like.new_zeros((k,), dtype=sd) if b is None else b.to(sd))
    return torch.cat(ws), torch.cat(bs)


def conv_gru_cell(x: Tensor, h: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, output_weight: Tensor,
                  output_bias: Tensor | None, reset_norm_weight: Tensor | None = None,
                  reset_norm_bias: Tensor | None = None, update_norm_weight: Tensor | None = None,
                  update_norm_bias: Tensor | None = None, output_norm_weight: Tensor | None = None,
                  output_norm_bias: Tensor | None = None, *, eps: float = 1e-6, backend: str | None = None) -> Tensor:
    """One ConvGRU step (module docstring) with no concatenation saved.

    Shapes:
        x: (N, C, H, W) the cell input (the block output's projection); h: (N, k, H, W) the state.
        gate_weight: (2k, C + k, 3, 3), gate_bias: (2k,) or None — gates r (rows [0, k)) and u.
        output_weight: (k, C + k, 3, 3), output_bias: (k,) or None. Columns [0, C) act on x, [C, C+k) on h
            (on r * h for the output conv).
        *_norm_weight, *_norm_bias: (k,) or None (no affine): the GroupNorm(1, k) of r, u and the output.
        returns: h' (N, k, H, W), in x's memory format (contiguous or channels_last).
    Args:
        eps: the GroupNorms' eps (1e-6 in the released cell).
        backend: "torch", "cpp", "cuda", "triton" or "auto"; None uses the selection in force. Only
            "cpp" has fused kernels; "cuda" / "triton" run the reference (module docstring).
    Dtypes: float16, bfloat16, float32, float64; GroupNorm statistics in float32 (float64 for float64).
    Under ``torch.autocast`` x, h, the conv weights and biases run in the autocast dtype (float64 excepted).
    """
    if isinstance(x, Tensor):
        x, h, gate_weight, gate_bias, output_weight, output_bias = _autocast.cast(
            _autocast.autocast_dtype(x.device.type), x, h, gate_weight, gate_bias, output_weight, output_bias)
    v.check_activation("x", x)
    h = v.check_state("h", h, x)
    c, k = x.shape[1], h.shape[1]
    gate_weight = v.conv3x3_segments_weight("gate_weight", gate_weight, 2 * k, c, k, x, "x")
    output_weight = v.conv3x3_segments_weight("output_weight", output_weight, k, c, k, x, "x")
    gate_bias = v.bias_vector("gate_bias", gate_bias, 2 * k, x, "x")
    output_bias = v.bias_vector("output_bias", output_bias, k, x, "x")
    eps = v.check_scalars(True, 0.0, eps)[2]
    norms = (("reset_norm", reset_norm_weight, reset_norm_bias), ("update_norm", update_norm_weight, update_norm_bias),
             ("output_norm", output_norm_weight, output_norm_bias))
    for what, w, b in norms:
        v.channel_vector(f"{what}_weight", w, k, x, "x")
        v.channel_vector(f"{what}_bias", b, k, x, "x")
    name = _backend.resolve(backend, x.device, _OP, (x.shape[2], x.shape[3]))
    if name not in FUSED:
        return _reference.conv_gru_cell(x, h, gate_weight, gate_bias, output_weight, output_bias, reset_norm_weight,
                                        reset_norm_bias, update_norm_weight, update_norm_bias, output_norm_weight,
                                        output_norm_bias, eps)
    gamma, beta = _norm_params(norms, k, x)
    if gate_bias is None:
        gate_bias = x.new_zeros((2 * k,))
    if output_bias is None:
        output_bias = x.new_zeros((k,))
    fmt = v.memory_format_of(x)
    out, *_ = ConvGRUCellFunction.apply(v.in_format(x, fmt), v.in_format(h, fmt), gate_weight, gate_bias,
                                        output_weight, output_bias, gamma, beta, eps, name)
    return out
