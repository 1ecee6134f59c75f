"""Shared pieces of the Triton backend: launch configuration, dot precision, activation addressing.

Activations are addressed as (rows = N*H*W pixels, channels) matrices through their strides, so
one kernel serves NCHW and channels_last alike: a pixel's offset is ``n*stride_n + p*stride_p``
with ``p = i*W + j`` and ``stride_p = stride_w`` (valid for both formats, since stride_h = W *
stride_w in each). channels_last is the fast path (channels adjacent, loads coalesce along the
reduction); NCHW is served without a copy, at the price of strided channel loads.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself does when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Rows handled by one program of every kernel that writes per-program BatchNorm partials. It is
# fixed (never autotuned) so the number of partials, the order in which they are combined, and
# hence the statistics, are bit-identical whatever configuration the autotuner picks.
STAT_ROWS = 16 if INTERPRET else 64
# Partials are combined STAT_TILE at a time (in closed form), tiles in sequence.
STAT_TILE = 16 if INTERPRET else 256
# Split-M weight-gradient chunks are a multiple of this many rows (a multiple of every BLOCK_M).
SPLIT_GRAIN = 16 if INTERPRET else 256


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for float32 and only where PyTorch's matmul allows it."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def needs_aten(t: torch.Tensor) -> bool:
    """float64 on a GPU: tl.dot of fp64 is not lowered by every Triton release we support (3.6-3.8),
    so that one dtype takes plain ATen math there. Under the interpreter fp64 runs the kernels."""
    return t.dtype == torch.float64 and t.device.type != "cpu"


def configs(tiles: list[tuple[int, ...]], *, fixed_m: int | None = None) -> list[triton.Config]:
    """Autotune configurations from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples.

    Under the interpreter one small configuration keeps tests fast (and autotuning would only time
    the interpreter). With `fixed_m` every configuration uses that BLOCK_M (see STAT_ROWS).
    """
    if INTERPRET:
        tiles = [(16, 16, 16, 1, 1)]
    out = []
    seen = set()
    for bm, bn, bk, warps, stages in tiles:
        bm = fixed_m if fixed_m is not None else bm
        key = (bm, bn, bk, warps, stages)
        if key in seen:
            continue
        seen.add(key)
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                 num_stages=stages))
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). N is often k = 32 (the RLA state), hence narrow tiles.
GEMM_TILES = [
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4), (128, 32, 64, 4, 4),
    (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
]
# Weight gradients: (BLOCK_CO, BLOCK_C, BLOCK_M) tiles reducing over pixels.
WGRAD_TILES = [
    (32, 64, 64, 4, 3),
    (64, 64, 64, 4, 3), (32, 128, 64, 4, 3),
    (64, 128, 32, 8, 3), ]


def split_rows(rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, rows per split) for a reduction over `rows` pixels shared by `tiles` output
    tiles: enough programs to fill the GPU, each chunk a multiple of SPLIT_GRAIN rows."""
    if INTERPRET or device.type != "cuda":
        want = 2
    else:
        want = max(1, (4 * torch.cuda.get_device_properties(device).multi_processor_count) // max(tiles, 1))
    chunk = triton.cdiv(triton.cdiv(rows, want), SPLIT_GRAIN) * SPLIT_GRAIN
    return triton.cdiv(rows, chunk), chunk


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_p, stride_c) of a 4-D activation in NCHW or channels_last layout."""
    sn, sc, sh, sw = t.stride()
    if t.shape[3] == 1:
        # A size-1 dimension's stride is arbitrary in a "contiguous" tensor; p is then i alone.
        return sn, sh, sc
    assert t.shape[2] == 1 or sh == t.shape[3] * sw, "activation must be NCHW or channels_last"
    return sn, sw, sc


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_act(like: torch.Tensor, c: int, h: int, w: int, fmt: torch.memory_format, *, zero: bool = False):
    shape = (like.shape[0], c, h, w)
    t = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    return t.zero_() if zero else t


@triton.jit
def row_offsets(rows, HW, stride_n, stride_p):
    """Element offsets of pixel rows (flattened n*HW + p) in an activation, in int64."""
    n = rows // HW
    p = rows - n * HW
    return n.to(tl.int64) * stride_n + p.to(tl.int64) * stride_p


@triton.jit
def tanh(x):
    # tl.tanh is missing from some Triton releases; this form saturates correctly for large |x|.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
