"""GEMMs that consume the BN input gradient dz without it ever being stored.

Both ops end their backward the same way: dz (rows = pixels, CO channels) multiplies a weight
matrix W (CO, C1 + C2) into activation gradients, and an activation into the weight gradient.
The output columns come in up to two segments (op A: x and h, which are never concatenated;
op B: y alone, C2 = 0). Each program works on one segment only, picked from its program id.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batchnorm import load_dz
from .common import (DGRAD_LEAN, DGRAD_RAW_LEAN, DGRAD_TILES, WGRAD_LEAN, WGRAD_TILES, autotune,
                     dot_precision, pixel_strides, row_offsets, split_rows, stat_dtype)


@triton.jit
def _dgrad_acc(src, zp, w, mean, var, gamma, beta, dbeta, dgamma, pid_m, pid_n, M, HW, CO, WCOLS, col0, ncols,
               eps, inv_count, s_sn, s_sp, s_sc, z_sn, z_sp, z_sc,
               RELU: tl.constexpr, TRAINING: tl.constexpr, RAW: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz[rows] @ W[:, col0 + cols] for one tile, in S; cols < ncols."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    s_row = row_offsets(rows, HW, s_sn, s_sp)
    z_row = row_offsets(rows, HW, z_sn, z_sp)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < ncols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=mean.dtype.element_ty)
    for k0 in range(0, CO, BLOCK_K):
        ch = k0 + tl.arange(0, BLOCK_K)
        chm = ch < CO
        dz = load_dz(src + s_row[:, None] + ch[None, :] * s_sc, zp + z_row[:, None] + ch[None, :] * z_sc,
                     rmask[:, None] & chm[None, :], ch, chm, mean, var, gamma, beta, dbeta, dgamma, eps,
                     inv_count, RELU, TRAINING, RAW)
        b = tl.load(w + ch[:, None] * WCOLS + col0 + cols[None, :], mask=chm[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(dz.to(w.dtype.element_ty), b, acc, input_precision=PREC)
    return acc, rows, rmask, cols, cmask


@triton.jit
def _store_act_tile(out, acc, rows, rmask, cols, cmask, HW, o_sn, o_sp, o_sc):
    o_row = row_offsets(rows, HW, o_sn, o_sp)
    tl.store(out + o_row[:, None] + cols[None, :] * o_sc, acc.to(out.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@autotune(DGRAD_TILES, key=["M", "CO", "C1", "C2", "RELU", "TRAINING", "RAW", "PREC"], lean=DGRAD_LEAN,
          lean_if={"RAW": DGRAD_RAW_LEAN})
@triton.jit
def _dz_dgrad_kernel(src, zp, w, out1, out2, mean, var, gamma, beta, dbeta, dgamma, M, HW, CO, C1, C2, eps,
                     inv_count, s_sn, s_sp, s_sc, z_sn, z_sp, z_sc, o1_sn, o1_sp, o1_sc, o2_sn, o2_sp, o2_sc,
                     RELU: tl.constexpr, TRAINING: tl.constexpr, RAW: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    nb1 = tl.cdiv(C1, BLOCK_N)
    seg2 = pid_n >= nb1
    # ONE pipelined GEMM loop whichever segment this program has; only the store branches. (With the
    # whole tile inlined in both branches of an `if`, each copy of the loop got its own shared-memory
    # buffers: 9 configurations needed more than sm_90's 227 KB.)
    acc, rows, rmask, cols, cmask = _dgrad_acc(
        src, zp, w, mean, var, gamma, beta, dbeta, dgamma, pid_m, tl.where(seg2, pid_n - nb1, pid_n), M, HW,
        CO, C1 + C2, tl.where(seg2, C1, 0), tl.where(seg2, C2, C1), eps, inv_count, s_sn, s_sp, s_sc, z_sn,
        z_sp, z_sc, RELU, TRAINING, RAW, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if seg2:
        _store_act_tile(out2, acc, rows, rmask, cols, cmask, HW, o2_sn, o2_sp, o2_sc)
    else:
        _store_act_tile(out1, acc, rows, rmask, cols, cmask, HW, o1_sn, o1_sp, o1_sc)


@triton.jit
def _wgrad_tile(src, zp, act, wpart, mean, var, gamma, beta, dbeta, dgamma, pid_co, pid_c, pid_s, M, HW, CO,
                WCOLS,
                col0, ncols, rows_per_split, eps, inv_count, s_sn, s_sp, s_sc, z_sn, z_sp, z_sc, a_sn, a_sp,
                a_sc, RELU: tl.constexpr, TRAINING: tl.constexpr, RAW: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    com = co < CO
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < ncols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=mean.dtype.element_ty)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rm = rows < end
        s_row = row_offsets(rows, HW, s_sn, s_sp)
        z_row = row_offsets(rows, HW, z_sn, z_sp)
        a_row = row_offsets(rows, HW, a_sn, a_sp)
        dz = load_dz(src + s_row[:, None] + co[None, :] * s_sc, zp + z_row[:, None] + co[None, :] * z_sc,
                     rm[:, None] & com[None, :], co, com, mean, var, gamma, beta, dbeta, dgamma, eps,
                     inv_count, RELU, TRAINING, RAW)
        a = tl.load(act + a_row[:, None] + cols[None, :] * a_sc, mask=rm[:, None] & cm[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz.to(act.dtype.element_ty)), a, acc, input_precision=PREC)
    offs = pid_s.to(tl.int64) * CO * WCOLS + co[:, None] * WCOLS + col0 + cols[None, :]
    tl.store(wpart + offs, acc, mask=com[:, None] & cm[None, :])


# Config names reused: BLOCK_M tiles CO, BLOCK_N the weight columns, BLOCK_K the pixel rows.
@autotune(WGRAD_TILES, key=["M", "CO", "C1", "C2", "RELU", "TRAINING", "RAW", "PREC"], lean=WGRAD_LEAN)
@triton.jit
def _dz_wgrad_kernel(src, zp, act1, act2, wpart, mean, var, gamma, beta, dbeta, dgamma, M, HW, CO, C1, C2,
                     rows_per_split, eps, inv_count, s_sn, s_sp, s_sc, z_sn, z_sp, z_sc, a1_sn, a1_sp, a1_sc,
                     a2_sn, a2_sp, a2_sc, RELU: tl.constexpr, TRAINING: tl.constexpr, RAW: tl.constexpr,
                     PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_co = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    nb1 = tl.cdiv(C1, BLOCK_N)
    if pid_c < nb1:
        _wgrad_tile(src, zp, act1, wpart, mean, var, gamma, beta, dbeta, dgamma, pid_co, pid_c, pid_s, M, HW,
                    CO, C1 + C2, 0, C1, rows_per_split, eps, inv_count, s_sn, s_sp, s_sc, z_sn, z_sp, z_sc,
                    a1_sn, a1_sp, a1_sc, RELU, TRAINING, RAW, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _wgrad_tile(src, zp, act2, wpart, mean, var, gamma, beta, dbeta, dgamma, pid_co, pid_c - nb1, pid_s,
                    M, HW,
                    CO, C1 + C2, C1, C2, rows_per_split, eps, inv_count, s_sn, s_sp, s_sc, z_sn, z_sp, z_sc,
                    a2_sn, a2_sp, a2_sc, RELU, TRAINING, RAW, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


class BNGrad:
    """What `load_dz` needs: the gradient source, the pre-BN values, statistics and dbeta/dgamma."""

    def __init__(self, src, z, mean, var, gamma, beta, dbeta, dgamma, eps, relu, training, raw=False):
        self.src, self.z, self.mean, self.var, self.gamma, self.beta = src, z, mean, var, gamma, beta
        self.dbeta, self.dgamma, self.eps, self.relu, self.training = dbeta, dgamma, eps, relu, training
        self.raw = raw
        n, _, h, w = z.shape
        self.rows, self.hw = n * h * w, h * w

    @classmethod
    def materialised(cls, dz: torch.Tensor) -> "BNGrad":
        """dz (N, CO, H, W) already stored: the GEMMs load it as it is (load_dz's RAW)."""
        # Never read: it fixes the accumulation dtype (the kernels accumulate in mean's dtype).
        unused = torch.empty(1, dtype=stat_dtype(dz.dtype), device=dz.device)
        return cls(dz, dz, *(unused,) * 6, 0.0, False, False, raw=True)

    def tensors(self):
        return (self.mean, self.var, self.gamma, self.beta, self.dbeta, self.dgamma)


def dz_dgrad(bg: BNGrad, weight: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor | None) -> None:
    """out1 = dz @ W[:, :C1], out2 = dz @ W[:, C1:] (out2 None: one segment)."""
    co = weight.shape[0]
    c1 = out1.shape[1]
    c2 = 0 if out2 is None else out2.shape[1]
    o2 = out1 if out2 is None else out2

    def grid(meta):
        return (triton.cdiv(bg.rows, meta["BLOCK_M"]),
                triton.cdiv(c1, meta["BLOCK_N"]) + triton.cdiv(c2, meta["BLOCK_N"]))

    _dz_dgrad_kernel[grid](bg.src, bg.z, weight, out1, o2, *bg.tensors(), bg.rows, bg.hw, co, c1, c2, bg.eps,
                           1.0 / bg.rows, *pixel_strides(bg.src), *pixel_strides(bg.z), *pixel_strides(out1),
                           *pixel_strides(o2), RELU=bg.relu, TRAINING=bg.training, RAW=bg.raw,
                           PREC=dot_precision(out1.dtype))


def dz_wgrad(bg: BNGrad, act1: torch.Tensor, act2: torch.Tensor | None, co: int) -> torch.Tensor:
    """dW (co, C1 + C2) = dz^T @ [act1 | act2] in the activations' dtype, reduced over pixels in
    split chunks whose fp32 (fp64) partial sums are added in a fixed order."""
    c1 = act1.shape[1]
    c2 = 0 if act2 is None else act2.shape[1]
    a2 = act1 if act2 is None else act2
    # Tile counts for the split heuristic use the GPU configs' typical 64x64 tiles.
    splits, chunk = split_rows(bg.rows, triton.cdiv(co, 64) * triton.cdiv(c1 + c2, 64), act1.device)
    wpart = torch.empty((splits, co, c1 + c2), dtype=bg.mean.dtype, device=act1.device)

    def grid(meta):
        bn = meta["BLOCK_N"]
        return (triton.cdiv(co, meta["BLOCK_M"]), triton.cdiv(c1, bn) + triton.cdiv(c2, bn), splits)

    _dz_wgrad_kernel[grid](bg.src, bg.z, act1, a2, wpart, *bg.tensors(), bg.rows, bg.hw, co, c1, c2, chunk,
                           bg.eps,
                           1.0 / bg.rows, *pixel_strides(bg.src), *pixel_strides(bg.z), *pixel_strides(act1),
                           *pixel_strides(a2), RELU=bg.relu, TRAINING=bg.training, RAW=bg.raw,
                           PREC=dot_precision(act1.dtype))
    return (wpart[0] if splits == 1 else wpart.sum(dim=0)).to(act1.dtype)
