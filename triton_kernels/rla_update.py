"""Op B in Triton: ``out = conv3x3(tanh(bn(pool?(h) + W_out @ y)), W_rec)``.

forward:  the C -> k 1x1 GEMM over y with the 2x2 average pool of h (floor mode) and the add
          fused into its epilogue, which writes s and per-tile BN partials; the statistics are
          finalized; then the 3x3 k -> k convolution as an implicit GEMM (padding 1) whose operand
          load normalises s and applies tanh on the fly, so tanh(bn(s)) is never stored.
backward: the transposed 3x3 implicit GEMM gives da; its epilogue recomputes a = tanh(bn(s))
          (tanh is never inverted), forms g = da * (1 - a^2), stores g and the per-tile sums for
          dbeta / dgamma. dz is rebuilt from (g, s) inside the loads of the dy and dW_out GEMMs and
          of the small pass that scatters it back to h (un-pooling). dW_rec re-derives a from s.
Kernel contract: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _aten
from .batchnorm import (bn_affine, channel_rstd, finalize_stats, finalize_sums, load_dz, new_partials,
                        store_grad_partials, store_stat_partials)
from .common import (CONV3X3_LEAN, CONV3X3_TILES, STAT_ROWS, STATE_GEMM_LEAN, STATE_GEMM_TILES, WGRAD3X3_LEAN,
                     WGRAD3X3_TILES, autotune, dot_precision, empty_act, memory_format_of, needs_aten,
                     pixel_strides, row_offsets, split_rows, tanh)
from .gemm import BNGrad, dz_dgrad, dz_wgrad


@autotune(STATE_GEMM_TILES, key=["M", "C", "K", "POOL", "TRAINING", "PREC"], lean=STATE_GEMM_LEAN,
          fixed_m=STAT_ROWS)
@triton.jit
def _fwd_gemm_kernel(y, w, h, s, part_mean, part_m2, M, HW, Wd, C, K,
                     y_sn, y_sp, y_sc, h_sn, h_sc, h_sh, h_sw, s_sn, s_sp, s_sc,
                     POOL: tl.constexpr, TRAINING: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < K
    valid = rmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=part_mean.dtype.element_ty)
    y_row = row_offsets(rows, HW, y_sn, y_sp)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < C
        a = tl.load(y + y_row[:, None] + kk[None, :] * y_sc, mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(w + cols[None, :] * C + kk[:, None], mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    n = rows // HW
    p = rows - n * HW
    i = p // Wd
    j = p - i * Wd
    c_off = cols[None, :] * h_sc
    if POOL:
        base = (n.to(tl.int64) * h_sn + (2 * i) * h_sh + (2 * j) * h_sw)[:, None] + c_off
        hp = tl.load(h + base, mask=valid, other=0.0).to(acc.dtype)
        hp += tl.load(h + base + h_sw, mask=valid, other=0.0).to(acc.dtype)
        hp += tl.load(h + base + h_sh, mask=valid, other=0.0).to(acc.dtype)
        hp += tl.load(h + base + h_sh + h_sw, mask=valid, other=0.0).to(acc.dtype)
        acc += 0.25 * hp
    else:
        base = (n.to(tl.int64) * h_sn + i * h_sh + j * h_sw)[:, None] + c_off
        acc += tl.load(h + base, mask=valid, other=0.0).to(acc.dtype)
    st = acc.to(s.dtype.element_ty)
    tl.store(s + row_offsets(rows, HW, s_sn, s_sp)[:, None] + cols[None, :] * s_sc, st, mask=valid)
    if TRAINING:
        store_stat_partials(st.to(acc.dtype), valid, cols, cmask, pid_m, tl.minimum(M - pid_m * BLOCK_M,
                                                                                    BLOCK_M),
                            part_mean, part_m2, K)


@triton.jit
def _bn_tanh(v, ch, ch_mask, mean, var, gamma, beta, eps):
    """tanh(bn(v)) for a [rows, channels] tile of pre-BN values (channels along axis 1), in S; also xhat."""
    mu = tl.load(mean + ch, mask=ch_mask, other=0.0)
    rstd = channel_rstd(var, ch, ch_mask, eps)
    gm = tl.load(gamma + ch, mask=ch_mask, other=0.0)
    bt = tl.load(beta + ch, mask=ch_mask, other=0.0)
    xhat = (v.to(mean.dtype.element_ty) - mu[None, :]) * rstd[None, :]
    return tanh(bn_affine(xhat, gm[None, :], bt[None, :])), xhat


@autotune(CONV3X3_TILES, key=["M", "K", "TRANSPOSED", "PREC"], lean=CONV3X3_LEAN, fixed_m=STAT_ROWS)
@triton.jit
def _conv3x3_kernel(src, w, out, s, mean, var, gamma, beta, part_g, part_gx, M, HW, H, Wd, K, eps,
                    i_sn, i_sc, i_sh, i_sw, o_sn, o_sp, o_sc, s_sn, s_sp, s_sc,
                    TRANSPOSED: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward (TRANSPOSED=False): out = conv3x3(tanh(bn(src = s))), zero padding applied to the
    activation. Backward (True): da = conv3x3^T(src = grad_out); the epilogue writes g = da * tanh'
    into `out` and the BN gradient partials."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < K
    n = rows // HW
    p = rows - n * HW
    i = p // Wd
    j = p - i * Wd
    nb = n.to(tl.int64) * i_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=mean.dtype.element_ty)
    # The 9 taps x the input-channel blocks as ONE loop, which Triton software-pipelines once (a
    # static_range(9) around a pipelined loop took 15-90 s per configuration to compile).
    nk = tl.cdiv(K, BLOCK_K)
    for it in range(0, 9 * nk):
        tap = it // nk
        kk = (it - tap * nk) * BLOCK_K + tl.arange(0, BLOCK_K)
        du = tap // 3 - 1
        dv = tap - (tap // 3) * 3 - 1
        if TRANSPOSED:
            ii = i - du
            jj = j - dv
        else:
            ii = i + du
            jj = j + dv
        ok = rmask & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < Wd)
        km = kk < K
        mk = ok[:, None] & km[None, :]
        a = tl.load(src + (nb + ii * i_sh + jj * i_sw)[:, None] + kk[None, :] * i_sc, mask=mk, other=0.0)
        wm = km[:, None] & cmask[None, :]
        if TRANSPOSED:
            b = tl.load(w + kk[:, None] * (K * 9) + cols[None, :] * 9 + tap, mask=wm, other=0.0)
        else:
            act, _ = _bn_tanh(a, kk, km, mean, var, gamma, beta, eps)
            a = tl.where(mk, act, 0.0).to(w.dtype.element_ty)
            b = tl.load(w + cols[None, :] * (K * 9) + kk[:, None] * 9 + tap, mask=wm, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    valid = rmask[:, None] & cmask[None, :]
    o_ptrs = out + row_offsets(rows, HW, o_sn, o_sp)[:, None] + cols[None, :] * o_sc
    if TRANSPOSED:
        sv = tl.load(s + row_offsets(rows, HW, s_sn, s_sp)[:, None] + cols[None, :] * s_sc, mask=valid,
                     other=0.0)
        act, xhat = _bn_tanh(sv, cols, cmask, mean, var, gamma, beta, eps)
        g = (acc * (1.0 - act * act)).to(out.dtype.element_ty)
        tl.store(o_ptrs, g, mask=valid)
        # Sum the rounded g: dz is later rebuilt from the stored g, and dbeta must match it.
        store_grad_partials(g.to(acc.dtype), xhat, valid, cols, cmask, pid_m, part_g, part_gx, K)
    else:
        tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=valid)


# BLOCK_M tiles the output channels, BLOCK_N the input channels, BLOCK_K the pixel rows.
@autotune(WGRAD3X3_TILES, key=["M", "K", "PREC"], lean=WGRAD3X3_LEAN)
@triton.jit
def _wgrad3x3_kernel(go, s, wpart, mean, var, gamma, beta, M, HW, H, Wd, K, rows_per_split, eps,
                     g_sn, g_sp, g_sc, s_sn, s_sc, s_sh, s_sw, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_co = tl.program_id(0)
    nci = tl.cdiv(K, BLOCK_N)
    tap = tl.program_id(1) // nci
    pid_ci = tl.program_id(1) - tap * nci
    pid_s = tl.program_id(2)
    du = tap // 3 - 1
    dv = tap - (tap // 3) * 3 - 1
    co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    com = co < K
    ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    cim = ci < K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=mean.dtype.element_ty)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rm = rows < end
        n = rows // HW
        p = rows - n * HW
        i = p // Wd + du
        j = p - (p // Wd) * Wd + dv
        ok = rm & (i >= 0) & (i < H) & (j >= 0) & (j < Wd)
        dout = tl.load(go + row_offsets(rows, HW, g_sn, g_sp)[:, None] + co[None, :] * g_sc,
                       mask=rm[:, None] & com[None, :], other=0.0)
        mk = ok[:, None] & cim[None, :]
        sv = tl.load(s + (n.to(tl.int64) * s_sn + i * s_sh + j * s_sw)[:, None] + ci[None, :] * s_sc, mask=mk,
                     other=0.0)
        act, _ = _bn_tanh(sv, ci, cim, mean, var, gamma, beta, eps)
        a = tl.where(mk, act, 0.0).to(go.dtype.element_ty)
        acc = tl.dot(tl.trans(dout), a, acc, input_precision=PREC)
    offs = pid_s.to(tl.int64) * K * K * 9 + co[:, None] * (K * 9) + ci[None, :] * 9 + tap
    tl.store(wpart + offs, acc, mask=com[:, None] & cim[None, :])


@triton.jit
def _dh_kernel(g, s, dh, mean, var, gamma, beta, dbeta, dgamma, M, HW, Wd, K, eps, inv_count,
               g_sn, g_sp, g_sc, s_sn, s_sp, s_sc, d_sn, d_sc, d_sh, d_sw,
               POOL: tl.constexpr, TRAINING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < K
    valid = rmask[:, None] & cmask[None, :]
    dz = load_dz(g + row_offsets(rows, HW, g_sn, g_sp)[:, None] + cols[None, :] * g_sc,
                 s + row_offsets(rows, HW, s_sn, s_sp)[:, None] + cols[None, :] * s_sc, valid, cols, cmask,
                 mean, var, gamma, beta, dbeta, dgamma, eps, inv_count, False, TRAINING)
    n = rows // HW
    p = rows - n * HW
    i = p // Wd
    j = p - i * Wd
    c_off = cols[None, :] * d_sc
    if POOL:
        v = (0.25 * dz).to(dh.dtype.element_ty)
        base = (n.to(tl.int64) * d_sn + (2 * i) * d_sh + (2 * j) * d_sw)[:, None] + c_off
        tl.store(dh + base, v, mask=valid)
        tl.store(dh + base + d_sw, v, mask=valid)
        tl.store(dh + base + d_sh, v, mask=valid)
        tl.store(dh + base + d_sh + d_sw, v, mask=valid)
    else:
        base = (n.to(tl.int64) * d_sn + i * d_sh + j * d_sw)[:, None] + c_off
        tl.store(dh + base, dz.to(dh.dtype.element_ty), mask=valid)


def _conv3x3(src, w, out, s, mean, var, gamma, beta, part_g, part_gx, eps, transposed):
    n, k, hh, ww = out.shape
    rows = n * hh * ww

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))

    _conv3x3_kernel[grid](src, w, out, s, mean, var, gamma, beta, part_g, part_gx, rows, hh * ww, hh, ww, k,
                          eps, *src.stride(), *pixel_strides(out), *pixel_strides(s),
                          TRANSPOSED=transposed, PREC=dot_precision(out.dtype))


def forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool: bool, eps: float):
    """-> out (N, k, H, W) and s in y's memory format, batch (or given) mean and biased var."""
    if needs_aten(y):
        return _aten.rla_update_forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool, eps)
    n, c, hy, wy = y.shape
    k = out_weight.shape[0]
    assert h.shape[1] == k and rec_weight.shape == (k, k, 3, 3)
    rows = n * hy * wy
    fmt = memory_format_of(y)
    training = mean is None
    s = empty_act(y, k, hy, wy, fmt)
    part_mean, part_m2, _ = new_partials(rows if training else 1, k, y)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))

    _fwd_gemm_kernel[grid](y, out_weight, h, s, part_mean, part_m2, rows, hy * wy, wy, c, k,
                           *pixel_strides(y), *h.stride(), *pixel_strides(s), POOL=pool, TRAINING=training,
                           PREC=dot_precision(y.dtype))
    if training:
        mean, var = finalize_stats(part_mean, part_m2, rows)
    else:
        mean, var = mean.clone(), var.clone()
    out = empty_act(y, k, hy, wy, fmt)
    _conv3x3(s, rec_weight, out, s, mean, var, gamma, beta, part_mean, part_m2, eps, False)
    return out, s, mean, var


def backward(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, pool: bool, eps: float,
             training: bool):
    """-> dh, dy (y's memory format), dout_weight, drec_weight (T), dgamma, dbeta (stat dtype)."""
    if needs_aten(y):
        return _aten.rla_update_backward(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var,
                                         pool, eps, training)
    n, c, hy, wy = y.shape
    k = out_weight.shape[0]
    rows = n * hy * wy
    fmt = memory_format_of(y)
    g = empty_act(y, k, hy, wy, fmt)
    part_g, part_gx, _ = new_partials(rows, k, y)
    _conv3x3(grad_out, rec_weight, g, s, mean, var, gamma, beta, part_g, part_gx, eps, True)
    dbeta, dgamma = finalize_sums(part_g, part_gx)
    bg = BNGrad(g, s, mean, var, gamma, beta, dbeta, dgamma, eps, False, training)
    dy = empty_act(y, c, hy, wy, fmt)
    dz_dgrad(bg, out_weight, dy, None)
    dout_weight = dz_wgrad(bg, y, None, k)

    splits, chunk = split_rows(rows, 9 * triton.cdiv(k, 32) ** 2, y.device)
    wpart = mean.new_empty((splits, k, k * 9))

    def wgrid(meta):
        return (triton.cdiv(k, meta["BLOCK_M"]), 9 * triton.cdiv(k, meta["BLOCK_N"]), splits)

    _wgrad3x3_kernel[wgrid](grad_out, s, wpart, mean, var, gamma, beta, rows, hy * wy, hy, wy, k, chunk, eps,
                            *pixel_strides(grad_out), *s.stride(), PREC=dot_precision(y.dtype))
    drec = (wpart[0] if splits == 1 else wpart.sum(dim=0)).to(y.dtype).reshape(k, k, 3, 3)

    hh, wh = h.shape[2], h.shape[3]
    # With pooling, rows/columns of h beyond 2H / 2W never reach the output: their gradient is 0.
    dh = empty_act(y, k, hh, wh, fmt, zero=pool and (hh != 2 * hy or wh != 2 * wy))
    bn = min(triton.next_power_of_2(k), 64)
    _dh_kernel[(triton.cdiv(rows, STAT_ROWS), triton.cdiv(k, bn))](
        g, s, dh, mean, var, gamma, beta, dbeta, dgamma, rows, hy * wy, wy, k, eps, 1.0 / rows,
        *pixel_strides(g), *pixel_strides(s), *dh.stride(), POOL=pool, TRAINING=training, BLOCK_M=STAT_ROWS,
        BLOCK_N=bn)
    return dh, dy, dout_weight, drec, dgamma, dbeta
