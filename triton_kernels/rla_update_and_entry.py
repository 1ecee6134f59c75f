"""Op C in Triton: the block boundary, rla_update then the next block's entry, reading y once each way.

forward:  ONE GEMM over y with the stacked weight [W_entry[:, :C] ; W_out] (rla_update's state GEMM
          with a column split): the entry's Ce columns go unrounded to zx (stat dtype), the update's
          k columns get pool?(h) added and become s with its BN partials. Then the update's tail
          (statistics, 3x3 conv on tanh(bn(s))) gives h_next, and op A's forward GEMM, its
          accumulator started from zx and reducing over h_next's k channels only, gives z (rounded
          once) and the entry's BN + activation.
backward: the entry's BN sums; go_u = grad_h_next + dz @ W_entry[:, C:] and dW_entry[:, C:] with dz
          rebuilt on load (op A's GEMMs); the update's tail backward from go_u to g. dz and ds are
          then stored side by side as dP = [dz ; ds] (their BN parameters differ, so one GEMM
          cannot rebuild both on load): ONE dgrad GEMM dy = dP @ stacked and ONE weight-gradient
          GEMM dP^T @ y give both consumers' share of y.
Kernel contract: docs/ARCHITECTURE.md ("Op C").
"""
from __future__ import annotations

import torch

from . import _aten
from . import concat_conv_bn_act as op_a
from . import rla_update as op_b
from .batchnorm import new_partials
from .common import empty_act, memory_format_of, needs_aten, stat_dtype
from .gemm import BNGrad, dz_dgrad, dz_wgrad


def _stacked(out_weight, entry_weight, c):
    """(Ce + k, C): the weight of the one GEMM over y."""
    return torch.cat((entry_weight[:, :c], out_weight), dim=0).contiguous()


def forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, entry_weight, entry_gamma, entry_beta,
            entry_mean, entry_var, pool: bool, eps: float, entry_eps: float, relu: bool):
    """h (N, k, Hh, Wh), y (N, C, H, W), out_weight (k, C), rec_weight (k, k, 3, 3), entry_weight
    (Ce, C + k); mean / var (k,) and entry_mean / entry_var (Ce,) both None (training) or given.
    -> h_next, s (N, k, H, W), mean, var (k,), out, z (N, Ce, H, W), entry_mean, entry_var (Ce,);
    activations in y's memory format, statistics in the stat dtype."""
    if needs_aten(y):
        return _aten.rla_update_and_entry_forward(h, y, out_weight, gamma, beta, mean, var, rec_weight,
                                                  entry_weight, entry_gamma, entry_beta, entry_mean,
                                                  entry_var, pool, eps, entry_eps, relu)
    n, c, hy, wy = y.shape
    k = out_weight.shape[0]
    ce = entry_weight.shape[0]
    assert h.shape[1] == k and rec_weight.shape == (k, k, 3, 3) and entry_weight.shape[1] == c + k
    rows = n * hy * wy
    fmt = memory_format_of(y)
    training = mean is None
    s = empty_act(y, k, hy, wy, fmt)
    zx = torch.empty((n, ce, hy, wy), dtype=stat_dtype(y.dtype), device=y.device, memory_format=fmt)
    part_mean, part_m2, _ = new_partials(rows if training else 1, k, y)
    op_b.state_gemm(y, _stacked(out_weight, entry_weight, c), h, s, zx, part_mean, part_m2, pool, training)
    h_next, mean, var = op_b.tail_forward(s, part_mean, part_m2, mean, var, rec_weight, gamma, beta, eps)
    out, z, entry_mean, entry_var = op_a.fused_forward(y, h_next, entry_weight[:, c:].contiguous(), zx,
                                                       entry_gamma, entry_beta, entry_mean, entry_var,
                                                       entry_eps, relu)
    return h_next, s, mean, var, out, z, entry_mean, entry_var


def backward(grad_h_next, grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, h_next,
             entry_weight, entry_gamma, entry_beta, z, entry_mean, entry_var, pool: bool, eps: float,
             entry_eps: float, relu: bool, training: bool):
    """-> dh (h's shape), dy (y's memory format), dout_weight, drec_weight, dgamma, dbeta (update),
    dentry_weight, dentry_gamma, dentry_beta (entry); weights in their dtype, BN grads in the stat dtype."""
    if needs_aten(y):
        return _aten.rla_update_and_entry_backward(grad_h_next, grad_out, h, y, out_weight, gamma, beta,
                                                   rec_weight, s, mean, var, h_next, entry_weight,
                                                   entry_gamma, entry_beta, z, entry_mean, entry_var, pool,
                                                   eps, entry_eps, relu, training)
    n, c, hy, wy = y.shape
    k = out_weight.shape[0]
    ce = entry_weight.shape[0]
    fmt = memory_format_of(y)

    # The entry: its BN sums, then what dz sends into h_next and its h-columns' weight gradient.
    dbeta_e, dgamma_e = op_a.bn_act_grad_sums(grad_out, z, entry_mean, entry_var, entry_gamma, entry_beta,
                                              entry_eps, relu)
    bg_e = BNGrad(grad_out, z, entry_mean, entry_var, entry_gamma, entry_beta, dbeta_e, dgamma_e, entry_eps,
                  relu, training)
    go_u = empty_act(y, k, hy, wy, fmt)
    dz_dgrad(bg_e, entry_weight[:, c:].contiguous(), go_u, None)
    # Rounded before the add, as autograd sums the two gradients of h_next in the unfused composition.
    go_u += grad_h_next
    dwe_h = dz_wgrad(bg_e, h_next, None, ce)

    # The update, from h_next back to its BN.
    g, dbeta, dgamma, drec = op_b.tail_backward(go_u, s, rec_weight, gamma, beta, mean, var, eps)
    dh = op_b.new_dh(y, s, h, pool)
    op_b.store_dz(g, s, dh, mean, var, gamma, beta, dbeta, dgamma, eps, pool, False, training)

    # The shared read of y, backward: dP = [dz ; ds], one dgrad GEMM and one weight-gradient GEMM.
    dp = empty_act(y, ce + k, hy, wy, fmt)
    op_b.store_dz(grad_out, z, dp[:, :ce], entry_mean, entry_var, entry_gamma, entry_beta, dbeta_e, dgamma_e,
                  entry_eps, False, relu, training)
    op_b.store_dz(g, s, dp[:, ce:], mean, var, gamma, beta, dbeta, dgamma, eps, False, False, training)
    bg_p = BNGrad.materialised(dp)
    dy = empty_act(y, c, hy, wy, fmt)
    dz_dgrad(bg_p, _stacked(out_weight, entry_weight, c), dy, None)
    dws = dz_wgrad(bg_p, y, None, ce + k)
    dentry_weight = torch.cat((dws[:ce], dwe_h), dim=1)
    return dh, dy, dws[ce:].contiguous(), drec, dgamma, dbeta, dentry_weight, dgamma_e, dbeta_e
