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
from .common import (CONV3X3_LEAN, CONV3X3_TILES, STAT_ROWS, STATE_GEMM_LEAN, STATE_GEMM_TILES,
                     STATE_SPLIT_LEAN, STATE_SPLIT_TILES, WGRAD3X3_LEAN, WGRAD3X3_TILES, autotune,
                     dot_precision, empty_act, memory_format_of, needs_aten, pixel_strides, row_offsets,
                     split_rows, tanh)
from .gemm import BNGrad, dz_dgrad, dz_wgrad


@autotune(STATE_GEMM_TILES, key=["M", "C", "K", "CE", "POOL", "TRAINING", "SPLIT", "PREC"],
          lean=STATE_GEMM_LEAN, tiles_if={"SPLIT": STATE_SPLIT_TILES}, lean_if={"SPLIT": STATE_SPLIT_LEAN},
          fixed_m=STAT_ROWS)
@triton.jit
def _fwd_gemm_kernel(y, w, h, s, zx, part_mean, part_m2, M, HW, Wd, C, K, CE,
                     y_sn, y_sp, y_sc, h_sn, h_sc, h_sh, h_sw, s_sn, s_sp, s_sc, x_sn, x_sp, x_sc,
                     POOL: tl.constexpr, TRAINING: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y @ w^T for w = (CE + K, C): the first CE output columns (the block boundary's entry share,
    CE = 0 for rla_update alone) are stored unrounded into zx (stat dtype), the last K become s."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    # Each program owns one column segment, so no tile straddles zx and s; the GEMM loop is shared
    # and only the epilogue branches (see _dz_dgrad_kernel on loops inside branches).
    # SPLIT (CE > 0) is a constexpr so rla_update alone compiles without the segment selects: with
    # them, fp32 NCHW lean tiles spilled up to 104 B on sm_90 (scripts/triton_aot.py, full tier).
    pid_n = tl.program_id(1)
    if SPLIT:
        nb1 = tl.cdiv(CE, BLOCK_N)
        seg2 = pid_n >= nb1
        cols = tl.where(seg2, pid_n - nb1, pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < tl.where(seg2, K, CE)
        wcols = cols + tl.where(seg2, CE, 0)
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < K
        wcols = cols
    valid = rmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=part_mean.dtype.element_ty)
    y_row = row_offsets(rows, HW, y_sn, y_sp)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < C
        a = tl.load(y + y_row[:, None] + kk[None, :] * y_sc, mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(w + wcols[None, :] * C + kk[:, None], mask=km[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if SPLIT:
        if seg2:
            _state_epilogue(acc, h, s, part_mean, part_m2, pid_m, rows, cols, cmask, valid, M, HW, Wd, K,
                            h_sn, h_sc, h_sh, h_sw, s_sn, s_sp, s_sc, POOL, TRAINING, BLOCK_M)
        else:
            tl.store(zx + row_offsets(rows, HW, x_sn, x_sp)[:, None] + cols[None, :] * x_sc, acc, mask=valid)
    else:
        _state_epilogue(acc, h, s, part_mean, part_m2, pid_m, rows, cols, cmask, valid, M, HW, Wd, K,
                        h_sn, h_sc, h_sh, h_sw, s_sn, s_sp, s_sc, POOL, TRAINING, BLOCK_M)


@triton.jit
def _state_epilogue(acc, h, s, part_mean, part_m2, pid_m, rows, cols, cmask, valid, M, HW, Wd, K,
                    h_sn, h_sc, h_sh, h_sw, s_sn, s_sp, s_sc,
                    POOL: tl.constexpr, TRAINING: tl.constexpr, BLOCK_M: tl.constexpr):
    """s = acc + pool?(h), rounded and stored, with its BN partials (training)."""
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
               POOL: tl.constexpr, RELU: tl.constexpr, TRAINING: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """dh = unpool?(dz) for dz rebuilt from (g, s), or (POOL=False, any dh strides) dz stored into a
    channel slice of another tensor: the block boundary materialises its [dz ; ds] this way (RELU:
    g is the gradient after a ReLU, as op A's grad_out)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < K
    valid = rmask[:, None] & cmask[None, :]
    dz = load_dz(g + row_offsets(rows, HW, g_sn, g_sp)[:, None] + cols[None, :] * g_sc,
                 s + row_offsets(rows, HW, s_sn, s_sp)[:, None] + cols[None, :] * s_sc, valid, cols, cmask,
                 mean, var, gamma, beta, dbeta, dgamma, eps, inv_count, RELU, TRAINING, False)
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


def state_gemm(y, w, h, s, zx, part_mean, part_m2, pool: bool, training: bool) -> None:
    """s = pool?(h) + y @ w[CE:]^T (+ BN partials when training) and zx = y @ w[:CE]^T in ONE GEMM.

    y (N, C, H, W); w (CE + k, C) contiguous; s (N, k, H, W); zx (N, CE, H, W) in the stat dtype, or
    None (CE = 0)."""
    n, c, hy, wy = y.shape
    k = s.shape[1]
    ce = 0 if zx is None else zx.shape[1]
    rows = n * hy * wy
    zxt = s if zx is None else zx

    def grid(meta):
        bn = meta["BLOCK_N"]
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(ce, bn) + triton.cdiv(k, bn))

    _fwd_gemm_kernel[grid](y, w, h, s, zxt, part_mean, part_m2, rows, hy * wy, wy, c, k, ce,
                           *pixel_strides(y), *h.stride(), *pixel_strides(s), *pixel_strides(zxt), POOL=pool,
                           TRAINING=training, SPLIT=ce > 0, PREC=dot_precision(y.dtype))


def tail_forward(s, part_mean, part_m2, mean, var, rec_weight, gamma, beta, eps):
    """The update after s: statistics (finalized from the partials when mean is None), then
    out = conv3x3(tanh(bn(s))). -> out (s's shape and format), mean, var."""
    if mean is None:
        mean, var = finalize_stats(part_mean, part_m2, s.shape[0] * s.shape[2] * s.shape[3])
    else:
        mean, var = mean.clone(), var.clone()
    out = empty_act(s, s.shape[1], s.shape[2], s.shape[3], memory_format_of(s))
    _conv3x3(s, rec_weight, out, s, mean, var, gamma, beta, part_mean, part_m2, eps, False)
    return out, mean, var


def tail_backward(grad_out, s, rec_weight, gamma, beta, mean, var, eps):
    """Backward of tail_forward down to the BN: -> g = d tanh(bn(s)) (s's format), dbeta, dgamma, drec."""
    n, k, hy, wy = s.shape
    rows = n * hy * wy
    g = empty_act(s, k, hy, wy, memory_format_of(s))
    part_g, part_gx, _ = new_partials(rows, k, s)
    _conv3x3(grad_out, rec_weight, g, s, mean, var, gamma, beta, part_g, part_gx, eps, True)
    dbeta, dgamma = finalize_sums(part_g, part_gx)

    splits, chunk = split_rows(rows, 9 * triton.cdiv(k, 32) ** 2, s.device)
    wpart = mean.new_empty((splits, k, k * 9))

    def wgrid(meta):
        return (triton.cdiv(k, meta["BLOCK_M"]), 9 * triton.cdiv(k, meta["BLOCK_N"]), splits)

    _wgrad3x3_kernel[wgrid](grad_out, s, wpart, mean, var, gamma, beta, rows, hy * wy, hy, wy, k, chunk, eps,
                            *pixel_strides(grad_out), *s.stride(), PREC=dot_precision(s.dtype))
    drec = (wpart[0] if splits == 1 else wpart.sum(dim=0)).to(s.dtype).reshape(k, k, 3, 3)
    return g, dbeta, dgamma, drec


def store_dz(g, z, dst, mean, var, gamma, beta, dbeta, dgamma, eps, pool: bool, relu: bool,
             training: bool) -> None:
    """dst = unpool?(dz), dz the BN input gradient rebuilt from (g, z) (N, CO, H, W); dst (N, CO, H', W')
    any strided 4-D tensor (a channel slice included), (H', W') >= 2 (H, W) when pooling."""
    n, co, hy, wy = z.shape
    rows = n * hy * wy
    bn = min(triton.next_power_of_2(co), 64)
    _dh_kernel[(triton.cdiv(rows, STAT_ROWS), triton.cdiv(co, bn))](
        g, z, dst, mean, var, gamma, beta, dbeta, dgamma, rows, hy * wy, wy, co, eps, 1.0 / rows,
        *pixel_strides(g), *pixel_strides(z), *dst.stride(), POOL=pool, RELU=relu, TRAINING=training,
        BLOCK_M=STAT_ROWS, BLOCK_N=bn)


def new_dh(y, s, h, pool: bool):
    """dh's buffer: with pooling, rows/columns of h beyond 2H / 2W never reach the output and get 0."""
    hh, wh = h.shape[2], h.shape[3]
    return empty_act(y, s.shape[1], hh, wh, memory_format_of(y),
                     zero=pool and (hh != 2 * s.shape[2] or wh != 2 * s.shape[3]))


def forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool: bool, eps: float):
    """-> out (N, k, H, W) and s in y's memory format, batch (or given) mean and biased var."""
    if needs_aten(y):
        return _aten.rla_update_forward(h, y, out_weight, gamma, beta, mean, var, rec_weight, pool, eps)
    n, c, hy, wy = y.shape
    k = out_weight.shape[0]
    assert h.shape[1] == k and rec_weight.shape == (k, k, 3, 3)
    rows = n * hy * wy
    training = mean is None
    s = empty_act(y, k, hy, wy, memory_format_of(y))
    part_mean, part_m2, _ = new_partials(rows if training else 1, k, y)
    state_gemm(y, out_weight, h, s, None, part_mean, part_m2, pool, training)
    out, mean, var = tail_forward(s, part_mean, part_m2, mean, var, rec_weight, gamma, beta, eps)
    return out, s, mean, var


def backward(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var, pool: bool, eps: float,
             training: bool):
    """-> dh, dy (y's memory format), dout_weight, drec_weight (T), dgamma, dbeta (stat dtype)."""
    if needs_aten(y):
        return _aten.rla_update_backward(grad_out, h, y, out_weight, gamma, beta, rec_weight, s, mean, var,
                                         pool, eps, training)
    n, c, hy, wy = y.shape
    k = out_weight.shape[0]
    g, dbeta, dgamma, drec = tail_backward(grad_out, s, rec_weight, gamma, beta, mean, var, eps)
    bg = BNGrad(g, s, mean, var, gamma, beta, dbeta, dgamma, eps, False, training)
    dy = empty_act(y, c, hy, wy, memory_format_of(y))
    dz_dgrad(bg, out_weight, dy, None)
    dout_weight = dz_wgrad(bg, y, None, k)
    dh = new_dh(y, s, h, pool)
    store_dz(g, s, dh, mean, var, gamma, beta, dbeta, dgamma, eps, pool, False, training)
    return dh, dy, dout_weight, drec, dgamma, dbeta
