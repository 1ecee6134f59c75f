"""BatchNorm pieces shared by both ops: deterministic batch statistics and the BN backward.

Statistics: every program that produces pre-BN values writes, per channel, the mean and the sum
of squared deviations (M2) of its own STAT_ROWS-row tile, in the stat dtype S (fp32, or fp64 for
fp64 activations). A finalize kernel then combines the partials in a fixed order (Chan's parallel
formula, STAT_TILE partials at a time), so the result never depends on scheduling and there are
no float atomics. Centred partials avoid the E[x^2] - E[x]^2 cancellation.

Backward: the programs that see g (the gradient at the BN output) write per-tile sums of g and of
g * xhat; a second finalize sums them in a fixed order into dbeta and dgamma. The input gradient
``dz = gamma * rstd * (g - dbeta / M - xhat * dgamma / M)`` (training; ``gamma * rstd * g`` in
eval) is never stored: `load_dz` rebuilds it inside the operand loads of the GEMMs that consume it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FINALIZE_BLOCK_C, STAT_ROWS, STAT_TILE, stat_dtype


@triton.jit
def store_stat_partials(v, valid, cols, col_mask, pid_m, rows_here, part_mean, part_m2, C):
    """Per-column mean and M2 of the valid rows of tile `v` (already in S), into partial row pid_m."""
    cnt = rows_here.to(v.dtype)
    mean = tl.sum(tl.where(valid, v, 0.0), axis=0) / cnt
    dev = tl.where(valid, v - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    tl.store(part_mean + pid_m * C + cols, mean, mask=col_mask)
    tl.store(part_m2 + pid_m * C + cols, m2, mask=col_mask)


@triton.jit
def store_grad_partials(g, xhat, valid, cols, col_mask, pid_m, part_g, part_gx, C):
    """Per-column sums of g and g * xhat over the valid rows of a tile, into partial row pid_m."""
    g = tl.where(valid, g, 0.0)
    tl.store(part_g + pid_m * C + cols, tl.sum(g, axis=0), mask=col_mask)
    tl.store(part_gx + pid_m * C + cols, tl.sum(g * xhat, axis=0), mask=col_mask)


@triton.jit
def _finalize_stats_kernel(part_mean, part_m2, mean_out, var_out, P, M, C,
                           ROWS: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n_a = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    mean_a = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    m2_a = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    for p0 in range(0, P, TILE):
        ps = p0 + tl.arange(0, TILE)
        pmask = ps < P
        cnt = tl.where(pmask, tl.minimum(M - ps * ROWS, ROWS), 0).to(mean_out.dtype.element_ty)
        mk = pmask[:, None] & cmask[None, :]
        offs = ps[:, None] * C + cols[None, :]
        mb = tl.load(part_mean + offs, mask=mk, other=0.0)
        m2b = tl.load(part_m2 + offs, mask=mk, other=0.0)
        # Closed-form combination of one tile of partials, then a sequential merge with the total.
        n_t = tl.sum(cnt, axis=0)
        mean_t = tl.sum(cnt[:, None] * mb, axis=0) / n_t
        dev = mb - mean_t[None, :]
        m2_t = tl.sum(m2b + cnt[:, None] * dev * dev, axis=0)
        n = n_a + n_t
        delta = mean_t - mean_a
        mean_a = mean_a + delta * (n_t / n)
        m2_a = m2_a + m2_t + delta * delta * (n_a * n_t / n)
        n_a = n
    tl.store(mean_out + cols, mean_a, mask=cmask)
    tl.store(var_out + cols, m2_a / n_a, mask=cmask)


@triton.jit
def _finalize_sums_kernel(part_g, part_gx, dbeta, dgamma, P, C, TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sg = tl.zeros([BLOCK_C], dtype=dbeta.dtype.element_ty)
    sgx = tl.zeros([BLOCK_C], dtype=dbeta.dtype.element_ty)
    for p0 in range(0, P, TILE):
        ps = p0 + tl.arange(0, TILE)
        mk = (ps < P)[:, None] & cmask[None, :]
        offs = ps[:, None] * C + cols[None, :]
        sg += tl.sum(tl.load(part_g + offs, mask=mk, other=0.0), axis=0)
        sgx += tl.sum(tl.load(part_gx + offs, mask=mk, other=0.0), axis=0)
    tl.store(dbeta + cols, sg, mask=cmask)
    tl.store(dgamma + cols, sgx, mask=cmask)


def new_partials(rows: int, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two (P, channels) partial buffers in the stat dtype of `like`, one row per STAT_ROWS rows."""
    p = triton.cdiv(rows, STAT_ROWS)
    sd = stat_dtype(like.dtype)
    return (torch.empty((p, channels), dtype=sd, device=like.device),
            torch.empty((p, channels), dtype=sd, device=like.device), p)


def finalize_stats(part_mean: torch.Tensor, part_m2: torch.Tensor, rows: int) -> tuple[torch.Tensor,
                                                                                       torch.Tensor]:
    """Batch mean and biased variance from the partials of `rows` values per channel."""
    p, c = part_mean.shape
    mean = torch.empty(c, dtype=part_mean.dtype, device=part_mean.device)
    var = torch.empty_like(mean)
    block_c = min(triton.next_power_of_2(c), FINALIZE_BLOCK_C)
    _finalize_stats_kernel[(triton.cdiv(c, block_c),)](part_mean, part_m2, mean, var, p, rows, c,
                                                      ROWS=STAT_ROWS, TILE=STAT_TILE, BLOCK_C=block_c)
    return mean, var


def finalize_sums(part_g: torch.Tensor, part_gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dbeta, dgamma) = column sums of the partials, in a fixed order."""
    p, c = part_g.shape
    dbeta = torch.empty(c, dtype=part_g.dtype, device=part_g.device)
    dgamma = torch.empty_like(dbeta)
    block_c = min(triton.next_power_of_2(c), FINALIZE_BLOCK_C)
    _finalize_sums_kernel[(triton.cdiv(c, block_c),)](part_g, part_gx, dbeta, dgamma, p, c,
                                                     TILE=STAT_TILE, BLOCK_C=block_c)
    return dbeta, dgamma


@triton.jit
def channel_rstd(var, ch, ch_mask, eps):
    return 1.0 / tl.sqrt(tl.load(var + ch, mask=ch_mask, other=1.0) + eps)


@triton.jit
def bn_affine(xhat, gm, bt):
    """gamma * xhat + beta as one fused multiply-add: the forward and every backward pass that
    recomputes the BN output get the same bits (a compiler may contract `a * b + c` differently)."""
    xhat, gm = tl.broadcast(xhat, gm)
    xhat, bt = tl.broadcast(xhat, bt)
    return tl.fma(xhat, gm, bt)


@triton.jit
def relu_keep(y):
    """The ReLU mask: True where relu(y) is y, i.e. y > 0 or y is NaN. torch.relu keeps NaN
    (`tl.maximum(y, 0.0)` drops it on a GPU) and its backward passes the gradient wherever the
    output is not <= 0, NaN included."""
    return (y > 0) | (y != y)


@triton.jit
def bn_act(xhat, gm, bt, RELU: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The forward's output act(gamma * xhat + beta) of a tile, rounded to OUT_DTYPE."""
    y = bn_affine(xhat, gm, bt).to(OUT_DTYPE)
    if RELU:
        y = tl.where(relu_keep(y), y, 0.0).to(OUT_DTYPE)
    return y


@triton.jit
def bn_relu_mask(xhat, gm, bt, OUT_DTYPE: tl.constexpr):
    """Where the backward keeps the gradient: the mask of the value `bn_act` rounded and stored, so
    a BN output that rounds to 0 in the activation dtype is masked as the forward stored a 0."""
    return relu_keep(bn_affine(xhat, gm, bt).to(OUT_DTYPE))


@triton.jit
def load_dz(src_ptrs, z_ptrs, mask, ch, ch_mask, mean, var, gamma, beta, dbeta, dgamma, eps, inv_count,
            RELU: tl.constexpr, TRAINING: tl.constexpr, RAW: tl.constexpr):
    """The BN input gradient of a [rows, channels] tile (channels along axis 1), in S.

    `src_ptrs` point at the gradient after the activation (op A: grad_out, masked by the ReLU
    recomputed from z; op B: g, tanh' already applied); `z_ptrs` at the pre-BN values. RAW: src
    already holds dz (the block boundary's materialised [dz ; ds], whose halves have different BN
    parameters); nothing else is read.
    """
    if RAW:
        return tl.load(src_ptrs, mask=mask, other=0.0).to(mean.dtype.element_ty)
    mu = tl.load(mean + ch, mask=ch_mask, other=0.0)
    rstd = channel_rstd(var, ch, ch_mask, eps)
    gm = tl.load(gamma + ch, mask=ch_mask, other=0.0)
    g = tl.load(src_ptrs, mask=mask, other=0.0).to(mean.dtype.element_ty)
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(mean.dtype.element_ty)
    xhat = (z - mu[None, :]) * rstd[None, :]
    if RELU:
        bt = tl.load(beta + ch, mask=ch_mask, other=0.0)
        g = tl.where(bn_relu_mask(xhat, gm[None, :], bt[None, :], src_ptrs.dtype.element_ty), g, 0.0)
    if TRAINING:
        db = tl.load(dbeta + ch, mask=ch_mask, other=0.0) * inv_count
        dg = tl.load(dgamma + ch, mask=ch_mask, other=0.0) * inv_count
        g = g - db[None, :] - xhat * dg[None, :]
    return tl.where(mask, g * (gm * rstd)[None, :], 0.0)
