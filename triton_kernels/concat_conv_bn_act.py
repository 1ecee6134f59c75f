"""Op A in Triton: ``act(bn(W[:, :C] @ x + W[:, C:] @ h))`` per pixel, cat(x, h) never built.

forward:  one GEMM whose reduction runs over x's channels then h's (two segments, one
          accumulator); its epilogue writes z and per-tile BN partials (training) or, in eval, the
          normalised activation directly. Training then finalizes the statistics and normalises z
          in one elementwise pass.
backward: one pass over (grad_out, z) for the ReLU mask and the BN reductions (dbeta, dgamma),
          then GEMMs that rebuild dz inside their operand loads: dx | dh (one launch, two output
          segments) and dW (both column segments, split over pixels, fixed-order sum).
Kernel contract: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _aten
from .batchnorm import (bn_act, bn_relu_mask, channel_rstd, finalize_stats, finalize_sums, new_partials,
                        store_grad_partials, store_stat_partials)
from .common import (GEMM_ACC_INIT_LEAN, GEMM_LEAN, GEMM_TILES, STAT_ROWS, autotune, dot_precision, empty_act,
                     memory_format_of, needs_aten, pixel_strides, row_offsets)
from .gemm import BNGrad, dz_dgrad, dz_wgrad


@autotune(GEMM_TILES, key=["M", "C", "K", "CO", "TRAINING", "RELU", "ACC_INIT", "PREC"], lean=GEMM_LEAN,
          lean_if={"ACC_INIT": GEMM_ACC_INIT_LEAN}, fixed_m=STAT_ROWS)
@triton.jit
def _fwd_kernel(x, h, w, zx, z, out, part_mean, part_m2, mean, var, gamma, beta, M, HW, C, K, CO, eps,
                x_sn, x_sp, x_sc, h_sn, h_sp, h_sc, zx_sn, zx_sp, zx_sc, z_sn, z_sp, z_sc, o_sn, o_sp, o_sc,
                TRAINING: tl.constexpr, RELU: tl.constexpr, ACC_INIT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ACC_INIT: zx (CO channels, stat dtype), the x-part the block boundary's stacked GEMM already
    computed (then C = 0), is added to the accumulator before z is rounded once. It is loaded after the
    reduction: loaded before it, its tile stayed live across the loop and fp32 NCHW tiles spilled on
    sm_90 (72-112 B, scripts/triton_aot.py full tier)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < CO
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=part_mean.dtype.element_ty)
    x_row = row_offsets(rows, HW, x_sn, x_sp)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < C
        a = tl.load(x + x_row[:, None] + kk[None, :] * x_sc, mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(w + cols[None, :] * (C + K) + kk[:, None], mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    h_row = row_offsets(rows, HW, h_sn, h_sp)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        a = tl.load(h + h_row[:, None] + kk[None, :] * h_sc, mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(w + cols[None, :] * (C + K) + C + kk[:, None], mask=km[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    valid = rmask[:, None] & cmask[None, :]
    if ACC_INIT:
        acc += tl.load(zx + row_offsets(rows, HW, zx_sn, zx_sp)[:, None] + cols[None, :] * zx_sc, mask=valid,
                       other=0.0)
    zt = acc.to(z.dtype.element_ty)
    tl.store(z + row_offsets(rows, HW, z_sn, z_sp)[:, None] + cols[None, :] * z_sc, zt, mask=valid)
    zs = zt.to(part_mean.dtype.element_ty)
    if TRAINING:
        store_stat_partials(zs, valid, cols, cmask, pid_m, tl.minimum(M - pid_m * BLOCK_M, BLOCK_M),
                            part_mean, part_m2, CO)
    else:
        _store_bn_act(zs, rows, cols, rmask, cmask, out, mean, var, gamma, beta, HW, eps, o_sn, o_sp, o_sc,
                      RELU)


@triton.jit
def _store_bn_act(zs, rows, cols, rmask, cmask, out, mean, var, gamma, beta, HW, eps, o_sn, o_sp, o_sc,
                  RELU: tl.constexpr):
    mu = tl.load(mean + cols, mask=cmask, other=0.0)
    rstd = channel_rstd(var, cols, cmask, eps)
    gm = tl.load(gamma + cols, mask=cmask, other=0.0)
    bt = tl.load(beta + cols, mask=cmask, other=0.0)
    y = bn_act((zs - mu[None, :]) * rstd[None, :], gm[None, :], bt[None, :], RELU, out.dtype.element_ty)
    tl.store(out + row_offsets(rows, HW, o_sn, o_sp)[:, None] + cols[None, :] * o_sc, y,
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _normalize_kernel(z, out, mean, var, gamma, beta, M, HW, CO, eps, z_sn, z_sp, z_sc, o_sn, o_sp, o_sc,
                      RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < CO
    zt = tl.load(z + row_offsets(rows, HW, z_sn, z_sp)[:, None] + cols[None, :] * z_sc,
                 mask=rmask[:, None] & cmask[None, :], other=0.0)
    _store_bn_act(zt.to(mean.dtype.element_ty), rows, cols, rmask, cmask, out, mean, var, gamma, beta, HW,
                  eps, o_sn, o_sp, o_sc, RELU)


@triton.jit
def _bwd_reduce_kernel(go, z, part_g, part_gx, mean, var, gamma, beta, M, HW, CO, eps,
                       g_sn, g_sp, g_sc, z_sn, z_sp, z_sc,
                       RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < CO
    valid = rmask[:, None] & cmask[None, :]
    g = tl.load(go + row_offsets(rows, HW, g_sn, g_sp)[:, None] + cols[None, :] * g_sc, mask=valid, other=0.0)
    zt = tl.load(z + row_offsets(rows, HW, z_sn, z_sp)[:, None] + cols[None, :] * z_sc, mask=valid, other=0.0)
    g = g.to(mean.dtype.element_ty)
    mu = tl.load(mean + cols, mask=cmask, other=0.0)
    rstd = channel_rstd(var, cols, cmask, eps)
    xhat = (zt.to(mean.dtype.element_ty) - mu[None, :]) * rstd[None, :]
    if RELU:
        gm = tl.load(gamma + cols, mask=cmask, other=0.0)
        bt = tl.load(beta + cols, mask=cmask, other=0.0)
        g = tl.where(bn_relu_mask(xhat, gm[None, :], bt[None, :], go.dtype.element_ty), g, 0.0)
    store_grad_partials(g, xhat, valid, cols, cmask, pid_m, part_g, part_gx, CO)


def _elementwise_block(co: int) -> int:
    return min(triton.next_power_of_2(co), 64)


def fused_forward(x, h, weight, zx, gamma, beta, mean, var, eps: float, relu: bool):
    """out = act(bn(z)), z = zx + weight @ h (zx given: the x-part computed elsewhere, weight (Co, k)) or
    weight @ cat(x, h) (zx None, weight (Co, C + k)). x (N, C, H, W) also fixes the format and dtype.
    -> out, z (x's format), batch (or given) mean and biased var."""
    n, c, hh, ww = x.shape
    k = h.shape[1]
    co = weight.shape[0]
    if zx is not None:
        c = 0  # the x-loop is skipped; x still gives the launch its format (common.register_bound)
    assert h.dtype == x.dtype and weight.dtype == x.dtype and weight.shape[1] == c + k
    rows = n * hh * ww
    fmt = memory_format_of(x)
    training = mean is None
    z = empty_act(x, co, hh, ww, fmt)
    out = empty_act(x, co, hh, ww, fmt)
    part_mean, part_m2, _ = new_partials(rows if training else 1, co, x)
    stats = (part_mean, part_m2) if training else (mean, var)
    zxt = z if zx is None else zx

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(co, meta["BLOCK_N"]))

    _fwd_kernel[grid](x, h, weight, zxt, z, out, part_mean, part_m2, *stats, gamma, beta, rows, hh * ww, c, k,
                      co, eps, *pixel_strides(x), *pixel_strides(h), *pixel_strides(zxt), *pixel_strides(z),
                      *pixel_strides(out), TRAINING=training, RELU=relu, ACC_INIT=zx is not None,
                      PREC=dot_precision(x.dtype))
    if not training:
        return out, z, mean.clone(), var.clone()
    mean, var = finalize_stats(part_mean, part_m2, rows)
    bn = _elementwise_block(co)
    _normalize_kernel[(triton.cdiv(rows, STAT_ROWS), triton.cdiv(co, bn))](
        z, out, mean, var, gamma, beta, rows, hh * ww, co, eps, *pixel_strides(z), *pixel_strides(out),
        RELU=relu, BLOCK_M=STAT_ROWS, BLOCK_N=bn)
    return out, z, mean, var


def bn_act_grad_sums(grad_out, z, mean, var, gamma, beta, eps: float, relu: bool):
    """(dbeta, dgamma) of act(bn(z)) for grad_out (N, Co, H, W), in the stat dtype."""
    n, co, hh, ww = z.shape
    rows = n * hh * ww
    part_g, part_gx, p = new_partials(rows, co, z)
    bn = _elementwise_block(co)
    _bwd_reduce_kernel[(p, triton.cdiv(co, bn))](grad_out, z, part_g, part_gx, mean, var, gamma, beta, rows,
                                                 hh * ww, co, eps, *pixel_strides(grad_out),
                                                 *pixel_strides(z), RELU=relu, BLOCK_M=STAT_ROWS, BLOCK_N=bn)
    return finalize_sums(part_g, part_gx)


def forward(x, h, weight, gamma, beta, mean, var, eps: float, relu: bool):
    """-> out (N, Co, H, W) and z in x's memory format, batch (or given) mean and biased var."""
    if needs_aten(x):
        return _aten.concat_conv_bn_act_forward(x, h, weight, gamma, beta, mean, var, eps, relu)
    return fused_forward(x, h, weight, None, gamma, beta, mean, var, eps, relu)


def backward(grad_out, x, h, weight, gamma, beta, z, mean, var, eps: float, relu: bool, training: bool):
    """-> dx, dh (x's memory format), dweight (T), dgamma, dbeta (stat dtype)."""
    if needs_aten(x):
        return _aten.concat_conv_bn_act_backward(grad_out, x, h, weight, gamma, beta, z, mean, var, eps, relu,
                                                 training)
    n, c, hh, ww = x.shape
    k = h.shape[1]
    co = weight.shape[0]
    fmt = memory_format_of(x)
    dbeta, dgamma = bn_act_grad_sums(grad_out, z, mean, var, gamma, beta, eps, relu)
    dx = empty_act(x, c, hh, ww, fmt)
    dh = empty_act(x, k, hh, ww, fmt)
    bg = BNGrad(grad_out, z, mean, var, gamma, beta, dbeta, dgamma, eps, relu, training)
    dz_dgrad(bg, weight, dx, dh)
    dweight = dz_wgrad(bg, x, h, co)
    return dx, dh, dweight, dgamma, dbeta
