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
# Partials are combined STAT_TILE at a time (in closed form), tiles in sequence, by programs that
# each own FINALIZE_BLOCK_C channels. A (STAT_TILE x FINALIZE_BLOCK_C) tile of 256 x 64 made the
# finalize kernel spill ~8 KB of registers on sm_90; 64 x 32 (16 values per thread and array at
# 4 warps) spills nothing and gives twice as many programs.
STAT_TILE = 16 if INTERPRET else 64
FINALIZE_BLOCK_C = 32
# Split-M weight-gradient chunks are a multiple of this many rows (a multiple of every BLOCK_M).
SPLIT_GRAIN = 16 if INTERPRET else 256


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_allows_tf32() -> bool:
    """Whether PyTorch lets float32 matmuls use TF32, read through the API that was used to set it.

    Since torch 2.9 the setting is `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or
    "none" = inherit `torch.backends.fp32_precision`). Reading the legacy `allow_tf32` flag (or
    `torch.get_float32_matmul_precision()`) raises RuntimeError once the new API has set anything,
    whereas a value set through the legacy API shows up in the new one, so the new API is read first.
    """
    m = torch.backends.cuda.matmul
    new = getattr(m, "fp32_precision", None)
    if new is None:  # torch without the fp32_precision API
        return bool(m.allow_tf32)
    if new == "none":
        new = getattr(torch.backends, "fp32_precision", "none")
    return new == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for float32 and only where PyTorch's matmul allows it."""
    if dtype == torch.float32 and not INTERPRET and matmul_allows_tf32():
        return "tf32"
    return "ieee"


def needs_aten(t: torch.Tensor) -> bool:
    """float64 on a GPU: tl.dot of fp64 is not lowered by every Triton release we support (3.6-3.8),
    so that one dtype takes plain ATen math there. Under the interpreter fp64 runs the kernels."""
    return t.dtype == torch.float64 and t.device.type != "cpu"


def configs(tiles: list[tuple[int, ...]], *, fixed_m: int | None = None) -> list[triton.Config]:
    """Autotune configurations from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples.

    Under the interpreter one small configuration keeps tests fast (and autotuning would only time
    the interpreter). With `fixed_m` every configuration uses that BLOCK_M (see STAT_ROWS). The
    first tile is the pinned default (see Autotuned).
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


def bucket(n: int) -> int:
    """Autotuning bucket of a size that varies with batch and resolution: the next power of two.
    RLA-ResNet's pixel counts (N*H*W) then fall into ~20 buckets instead of one per batch size."""
    return 1 << max(int(n) - 1, 0).bit_length()


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def register_bound(args, kwargs) -> bool:
    """Whether a call's tiles pass through registers rather than shared memory: float32 without
    TF32 (`tl.dot` on FMAs, both operands in registers) or NCHW activations (channel-strided loads;
    the first argument of every autotuned kernel is an activation). Larger tiles spill there (up to
    73 KB per thread, measured by scripts/triton_aot.py), so such calls choose among `lean` tiles."""
    t = args[0]
    strided = t.dim() == 4 and t.shape[1] > 1 and t.stride(1) != 1
    return strided or (t.dtype == torch.float32 and kwargs.get("PREC") == "ieee")


class Autotuned:
    """A Triton kernel launched with one of several configurations, picked per key.

    * The candidates are `configs`, or `lean_configs` for a register-bound call (`register_bound`).
    * The key is the named arguments' values, those in `bucketed` rounded up to a power of two
      (`bucket`), the tensor arguments' dtypes and the candidate list: a new batch or spatial size
      reuses the choice made for its bucket instead of timing every configuration again.
    * Under ``torch.use_deterministic_algorithms(True)`` nothing is timed and the first candidate
      always runs: the reduction split (BLOCK_K) and hence the summation order, and the results,
      are the same bits in every run and every process.
    * Otherwise the first launch of each key times every configuration on the real arguments (the
      kernels only write their outputs, so repeating a launch is harmless); a configuration that
      does not fit the GPU (out of shared memory or registers) is skipped.

    ``kernel[grid](*args, **kwargs)`` launches like a Triton kernel; scripts/triton_aot.py compiles
    every candidate of every call for sm_90.
    """

    def __init__(self, fn, configs: list[triton.Config], key: list[str], bucketed: tuple[str, ...] = (),
                 lean_configs: list[triton.Config] | None = None,
                 lean_flags: dict[str, list[triton.Config]] | None = None,
                 flags: dict[str, list[triton.Config]] | None = None):
        self.fn = fn
        self.configs = configs
        self.lean_configs = lean_configs or configs
        self.lean_flags = lean_flags or {}
        self.flags = flags or {}
        self.key = key
        self.bucketed = bucketed
        self.cache: dict[tuple, triton.Config] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def run(self, grid, *args, **kwargs):
        return self.launch(self.pick(grid, args, kwargs), grid, args, kwargs)

    def launch(self, config: triton.Config, grid, args, kwargs):
        return self.fn[grid](*args, **kwargs, **config.all_kwargs())

    def candidates(self, args, kwargs) -> list[triton.Config]:
        bound = register_bound(args, kwargs)
        by_flag = self.lean_flags if bound else self.flags
        return next((c for flag, c in by_flag.items() if kwargs.get(flag)),
                    self.lean_configs if bound else self.configs)

    def key_of(self, args, kwargs) -> tuple:
        named = dict(zip(self.fn.arg_names, args))
        named.update(kwargs)
        key = tuple(bucket(named[k]) if k in self.bucketed else named[k] for k in self.key)
        dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        return key + dtypes + (register_bound(args, kwargs),)

    def pick(self, grid, args, kwargs) -> triton.Config:
        candidates = self.candidates(args, kwargs)
        if len(candidates) == 1 or deterministic():
            return candidates[0]
        key = self.key_of(args, kwargs)
        best = self.cache.get(key)
        if best is None:
            best = self.cache[key] = self.tune(grid, args, kwargs)
        return best

    def tune(self, grid, args, kwargs) -> triton.Config:
        from triton.runtime.errors import OutOfResources

        def timed(config):
            try:
                return triton.testing.do_bench(lambda: self.launch(config, grid, args, kwargs), warmup=5,
                                               rep=20)
            except OutOfResources:
                return float("inf")

        candidates = self.candidates(args, kwargs)
        times = [timed(c) for c in candidates]
        return candidates[min(range(len(times)), key=times.__getitem__)]


def autotune(tiles: list[tuple[int, ...]], key: list[str], *, lean: list[tuple[int, ...]] | None = None,
             tiles_if: dict[str, list[tuple[int, ...]]] | None = None,
             lean_if: dict[str, list[tuple[int, ...]]] | None = None, bucketed: tuple[str, ...] = ("M",),
             fixed_m: int | None = None):
    """Decorator: ``@autotune(TILES, key=[...], lean=LEAN_TILES)`` over ``@triton.jit`` (see
    Autotuned); `lean` tiles serve register-bound calls (default: the same tiles). `tiles_if` /
    `lean_if` map a constexpr flag to the tiles of a call that sets it (a variant with other needs),
    for calls that are not / are register-bound."""
    def by_flag(table):
        return {flag: configs(t, fixed_m=fixed_m) for flag, t in (table or {}).items()}
    return lambda fn: Autotuned(fn, configs(tiles, fixed_m=fixed_m), key, bucketed,
                                configs(lean, fixed_m=fixed_m) if lean else None, by_flag(lean_if),
                                by_flag(tiles_if))


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). N is often k = 32 (the RLA state), hence narrow tiles.
# The first entry of each list is the configuration pinned in deterministic mode. Each *_LEAN list
# serves register-bound calls (common.register_bound: fp32 without TF32, NCHW activations): it leaves
# out the tiles that spilled there on sm_90 (scripts/triton_aot.py, full tier); the other calls
# (channels_last in bf16, fp16 or fp32 with TF32) spilled in none.
GEMM_TILES = [
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4), (128, 32, 64, 4, 4),
    (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
]
GEMM_LEAN = [(64, 64, 32, 4, 4), (128, 32, 64, 4, 4), (128, 128, 32, 8, 3)]  # 64x128x32 w4: 216 B
# Op A's GEMM finishing the block boundary's z (ACC_INIT: it reduces over h_next's k channels only):
# its 64x32x64 lean tile spilled 96 B in fp32 NCHW training on sm_90.
GEMM_ACC_INIT_LEAN = [GEMM_LEAN[0], GEMM_LEAN[2]]
# The BN-backward input-gradient GEMM (dz @ W): its A operand is rebuilt from TWO loaded tiles per
# step (the gradient source and z), so a (128 x 64) A tile with 4 stages needed ~270 KB of shared
# memory in fp32; BLOCK_K stays at 32 for 128-row tiles.
DGRAD_TILES = [
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4), (128, 32, 32, 4, 4),
    (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
]
DGRAD_LEAN = [(64, 64, 32, 4, 4), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3)]  # 128 rows at 4 warps: 728 B
# The block boundary's dgrad over a stored dP (RAW loads, no BN rebuild): its 128-column lean tiles
# spilled 88-112 B in fp32 NCHW on sm_90.
DGRAD_RAW_LEAN = DGRAD_LEAN[:1]
# GEMMs whose N is the RLA state width k (32 by default): out1x1(y) in op B's forward.
STATE_GEMM_TILES = [
    (64, 32, 64, 4, 4),
    (64, 32, 128, 4, 3), (64, 32, 32, 4, 4), (64, 64, 64, 4, 3),
]
STATE_GEMM_LEAN = STATE_GEMM_TILES[:3]  # 64x64x64: 312 B
# The block boundary's stacked GEMM (SPLIT: N = C_entry + k, 96-544 columns): every column tile sweeps
# all of y, so wide tiles cut y's re-reads (modelled on the H100, RLA-ResNet-50 step at batch 256:
# 17.6 -> 14.6 ms for the triton boundary). 128 columns need 8 warps: with 4 (and 256 columns with 8)
# the pooled epilogue spilled in TF32 on sm_90 (up to 824 B). Register-bound calls take
# STATE_SPLIT_LEAN: the 64x32x64 lean tile spilled 104 B there (fp32 NCHW).
STATE_SPLIT_TILES = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
STATE_SPLIT_LEAN = STATE_GEMM_LEAN[1:]
# Weight gradients: (BLOCK_CO, BLOCK_C, BLOCK_M) tiles reducing over pixels.
WGRAD_TILES = [
    (32, 64, 64, 4, 3),
    (64, 64, 64, 4, 3), (32, 128, 64, 4, 3),
    (64, 128, 32, 8, 3), ]
WGRAD_LEAN = [(64, 64, 64, 4, 3), (64, 128, 32, 8, 3)]  # 32x64x64: 1.5 KB, 32x128x64: 73 KB
# The 3x3 k -> k convolution (implicit GEMM over pixels x 9 taps x k): BLOCK_N tiles the k output
# channels, BLOCK_K the k input channels; k = 32 by default, so wider tiles only waste work.
CONV3X3_TILES = [
    (64, 32, 32, 4, 3),
    (64, 32, 32, 4, 4), (64, 64, 32, 4, 3), (64, 32, 16, 4, 4), (64, 64, 64, 8, 3),
]
CONV3X3_LEAN = [(64, 32, 32, 4, 3), (64, 32, 16, 4, 4)]  # the others: 72-112 B
# Its weight gradient: (BLOCK_CO, BLOCK_CI, BLOCK_M pixel rows) per tap.
WGRAD3X3_TILES = [
    (32, 32, 64, 4, 3),
    (32, 32, 128, 4, 3), (32, 32, 32, 4, 4), (64, 64, 64, 4, 3),
]
WGRAD3X3_LEAN = [(32, 32, 32, 4, 4)]  # the others: 1.1-29 KB


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_rows(rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, rows per split) for a reduction over `rows` pixels shared by `tiles` output
    tiles: enough programs to fill the GPU, each chunk a multiple of SPLIT_GRAIN rows. The split
    depends on the device only, never on the autotuner's choice."""
    sms = None if INTERPRET else sm_count(device)
    want = 2 if sms is None else max(1, (4 * sms) // max(tiles, 1))
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
