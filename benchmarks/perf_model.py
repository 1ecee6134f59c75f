"""A per-design performance model of the fused RLA ops (issue 13, item 1): everything here is MODELLED.

For each op (concat_conv_bn_act, rla_update, and the block boundary rla_update_and_entry that fuses an
update with the next block's entry), pass (fwd, fwd+bwd) and design, the model lists the
kernels the design launches, in order, each with the DRAM bytes it reads and writes, its FLOPs (on
tensor cores or on FP32 CUDA cores) and its launches. On a named device one kernel takes

    max(bytes / bandwidth, tensor FLOPs / tensor rate, FP32 FLOPs / FP32 rate) + launches * launch overhead

and a design takes the sum over its kernels (one stream: kernels run one after another). Designs:

* ``eager``: the reference composition (rla_ext/_reference) as ATen, cuDNN and cuBLAS run it on CUDA;
* ``cuda``: our CUDA kernels as written in csrc/cuda/*.cu and *.cuh, plus the Python layer's launches;
* ``triton``: our Triton kernels in triton_kernels/*.py, plus the Python layer's launches;
* ``floor``: compulsory traffic (benchmarks/bytes_model.py), one pass, i.e. one launch per pass, and
  every GEMM on tensor cores: what no design can beat.

The block boundary's ``eager`` design is the two ops' eager kernels plus what autograd adds when y and
h_next each feed two ops (dy and dh_next are summed from both consumers): the ``torch`` backend's
composition. Its fused designs (and its floor) read y once each way. The network table shows each
design with the two ops at every step and, where the design has a boundary kernel, with the boundary
fused at the 15 boundaries of RLA-ResNet-50 (``fused boundary``).

Scope: training mode (batch statistics, running-stat update), channels_last activations, k <= 64 (the
CUDA design's direct 3x3 path); bf16/fp16 (fp32 GEMMs are taken at the TF32 rate).

Assumptions (the kernel lists were read from the code; these are what the code does not decide):

* DRAM bytes: a kernel reads each operand once and writes each output once. Re-reads that stay
  on chip are free: convolution halos and 3x3 taps (L1/L2), weights re-read per tile (L2), and the
  chunks of split weight-gradient reductions, whose programs run together. A whole-tensor re-read
  by a later sweep of the grid (Triton GEMMs whose column tiles are the slow program axis) reaches
  DRAM unless the tensor fits in half the L2 (the other half holds what streams past) or the sweeps'
  programs are resident together (taken as 4 programs per SM).
* Library kernels (cuBLAS, cuDNN) fill the device (the H200 run's 0.43 ms for CUDA op A's whole
  backward at C256xH56, batch 128, would be impossible otherwise) and launch once, except weight
  gradients (K = N*H*W, a tiny output): a split-K GEMM plus its reduction, 2 launches.
* Eager BatchNorm runs ATen's native channels_last kernels: ``_select_batch_norm_backend`` never
  picks cuDNN for bf16 input. Forward: semaphore zero-fill, Welford statistics, running-stat update
  + invstd, normalise. Backward: zero-fill, reduction, input gradient.
* Elementwise work is counted as FP32 operations per element (the *_OPS constants below): rough
  instruction counts, which matter only where a design recomputes them many times (per 3x3 tap).
* The launch overhead is the GPU-side cost of a launch with the host running ahead (CUDA graphs or
  a fast host). Python time per op call (tens of microseconds, issue 13 item 7) is NOT modelled, so
  measured times at small shapes, which are host-bound, sit far above the model.
* Every kernel reaches the full bandwidth and rates of the device table, so every design is modelled
  optimistically alike; on the H200 run, eager at the largest shape measured 1.75-2x its model.
  On the CPU entry, eager keeps the CUDA kernel list (a simple stand-in for oneDNN and ATen's CPU ops).
* Not seen by a roofline: uncoalesced loads (the CUDA op A statistics pass reads k weights with a
  stride of C + k per element), occupancy, tile quantisation beyond what is counted explicitly,
  library-internal copies (e.g. cuDNN's copy of the 3x3 weight to channels_last).

``python -m benchmarks model [--device h100|h200|cpu] [--measured RESULTS.json] [--kernels]`` prints
the tables; ``model_ops``, ``model_network`` and ``join_measured`` return the rows.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import bytes_model
from benchmarks.shapes import RLA_CHANNELS, STAGES, Stage, stage_by_label

ENTRY, UPDATE, BOUNDARY = "concat_conv_bn_act", "rla_update", "rla_update_and_entry"
OPS = (ENTRY, UPDATE, BOUNDARY)
# Ops the benchmarks time that this model has no kernel lists for: asking to model one raises with
# this reason, and --measured rows of one are left out with it (named in the report).
UNMODELLED = {
    "concat_conv3x3_bn_act": "the basic block's 3x3 entry is not modelled: its fused designs run each pass as "
                             "library 3x3 convolutions (cuDNN / oneDNN), whose kernels and traffic cannot be read "
                             "from this repository's code the way the 1x1 ops' kernel lists are",
}
PASSES = bytes_model.PASSES
DESIGNS = ("eager", "cuda", "triton", "floor")
CPU_DESIGNS = ("eager", "floor")  # the CUDA and Triton designs do not run on a CPU
PROVIDER_DESIGN = {"eager": "eager", "cuda": "cuda", "triton": "triton"}  # benchmark provider -> design
STAT_BYTES = 4  # statistics, BN partials and weight-gradient workspaces are fp32
RESNET50_BLOCKS = (3, 4, 6, 3)  # bottlenecks per stage: 16 RLA steps
RESNET50_STEPS = sum(RESNET50_BLOCKS)
STEM_CHANNELS, STEM_SIZE = 64, 56  # RLA-ResNet-50's stem output at 224x224 (after the max-pool)

# FP32 operations per element (see the module docstring).
WELFORD_OPS = 6  # count, delta, divide, mean update, M2 fma
BN_OPS = 3  # (v - mean) * scale + beta
RELU_OPS = 1
TANH_OPS = 8  # exp, add, reciprocal, scale: both 2*sigmoid(2x)-1 (Triton) and the expm1 form (CUDA)
BN_BWD_SUM_OPS = 4  # xhat, g * xhat, two running sums
BN_BWD_ELEM_OPS = 6  # dz = scale * (g - (dbeta + xhat * dgamma) / M)
LOAD_DZ_OPS = BN_OPS + BN_BWD_ELEM_OPS  # Triton's load_dz rebuilds dz from (g, z) in a GEMM's operand load

LIBRARY_WGRAD_LAUNCHES = 2  # cuBLAS/cuDNN weight gradient: split-K GEMM + reduction (an assumption)
L2_FIT_FRACTION = 0.5

# CUDA design constants, read from csrc/cuda/batchnorm.cuh (make_reduce_plan, channels_last) and
# csrc/cuda/update_tail.cuh (make_conv_plan).
CUDA_REDUCE_TX, CUDA_REDUCE_TY, CUDA_REDUCE_TARGET_BLOCKS, CUDA_REDUCE_MAX_CHUNKS = 32, 8, 1024, 1024
CUDA_REDUCE_MIN_ROWS_PER_THREAD = 4
CUDA_CONV_OC_PER_THREAD, CUDA_CONV_TILE_W, CUDA_CONV_THREADS = 8, 8, 256
CUDA_MAX_DIRECT_K = 64

# Triton design constants, from triton_kernels/common.py: STAT_ROWS (the BLOCK_M of every kernel
# that writes BN partials), SPLIT_GRAIN, and the BLOCK_N of the FIRST tile of each autotune list
# (the one pinned in deterministic mode; the autotuner may choose another).
TRITON_STAT_ROWS = 64
TRITON_SPLIT_GRAIN = 256
TRITON_GEMM_BLOCK_N = 64  # GEMM_TILES[0]: op A's forward GEMM, columns = C_out
TRITON_DGRAD_BLOCK_N = 64  # DGRAD_TILES[0]: dz @ W, columns = the activation-gradient channels
TRITON_WGRAD_BLOCK_M, TRITON_WGRAD_BLOCK_N = 32, 64  # WGRAD_TILES[0]: C_out rows x weight columns
TRITON_STATE_BLOCK_N = 32  # STATE_GEMM_TILES[0]: op B's forward GEMM, columns = k
TRITON_SPLIT_BLOCK_N = 128  # STATE_SPLIT_TILES[0]: the boundary's stacked GEMM, columns = C_entry + k
TRITON_CONV3X3_BLOCK_N = 32  # CONV3X3_TILES[0]: output channels of the 3x3 implicit GEMM
TRITON_WGRAD3X3_BLOCK = 32  # WGRAD3X3_TILES[0]: (BLOCK_CO, BLOCK_CI)
TRITON_DGRAD_BLOCK_M = 128  # DGRAD_TILES[0]
# Programs resident per SM for these 4-warp tiles (registers and shared memory allow about 4-7): an
# assumption, used only to decide which column sweeps of a grid run together.
TRITON_RESIDENT_PER_SM = 4

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceSpec:
    """What the model needs to know about a device. Rates are dense (no sparsity)."""

    key: str
    name: str
    bandwidth_gbps: float  # DRAM bandwidth the model uses, GB/s (1e9 B/s)
    tensor_tflops: float  # 16-bit (bf16/fp16) tensor-core GEMM rate, TFLOP/s
    tf32_tflops: float  # TF32 tensor-core rate, for fp32 GEMMs, TFLOP/s
    fp32_tflops: float  # FP32 CUDA-core rate (direct convolutions, elementwise work), TFLOP/s
    launch_us: float  # cost of one kernel launch, microseconds
    l2_mb: float  # last-level cache, MB (1e6 B): whether a whole-tensor re-read reaches DRAM
    sms: int  # streaming multiprocessors (Triton's split heuristic); 0 for a CPU
    source: str  # where the numbers come from

    @property
    def gpu(self) -> bool:
        return self.sms > 0

    def gemm_rate(self, dtype: torch.dtype) -> float:
        """GEMM FLOP/s for activations of `dtype` (16-bit on tensor cores, fp32 at the TF32 rate)."""
        tflops = self.tensor_tflops if _elem(dtype) <= 2 else self.tf32_tflops
        return tflops * 1e12


H100 = DeviceSpec("h100", "NVIDIA H100 SXM", bandwidth_gbps=3350.0, tensor_tflops=989.0, tf32_tflops=495.0,
                  fp32_tflops=67.0, launch_us=3.0, l2_mb=50.0, sms=132,
                  source="datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 67 TFLOP/s fp32 "
                         "(SPEC section 5: ~3.0 TB/s measured device-to-device)")
H200 = DeviceSpec("h200", "NVIDIA H200", bandwidth_gbps=4119.0, tensor_tflops=989.0, tf32_tflops=495.0,
                  fp32_tflops=67.0, launch_us=3.0, l2_mb=50.0, sms=132,
                  source="bandwidth: copy measured 2026-11-30 (benchmarks/results/h200-2026-11-30; "
                         "datasheet 4.8 TB/s); compute as H100 SXM (the same GH100 chip)")


def cpu_device(bandwidth_gbps: float = 20.0, gflops: float = 400.0, launch_us: float = 5.0,
               llc_mb: float = 32.0) -> DeviceSpec:
    """A CPU: one GEMM rate for all FLOPs (oneDNN reached 335-446 GFLOP/s on 2 AVX-512 cores, SPEC
    section 4), a memory bandwidth, and a per-op dispatch cost in place of the launch overhead."""
    return DeviceSpec("cpu", "CPU", bandwidth_gbps=bandwidth_gbps, tensor_tflops=gflops / 1e3,
                      tf32_tflops=gflops / 1e3, fp32_tflops=gflops / 1e3, launch_us=launch_us, l2_mb=llc_mb,
                      sms=0, source="parameters (--cpu-bandwidth-gbps, --cpu-gflops)")


DEVICES: dict[str, DeviceSpec] = {"h100": H100, "h200": H200, "cpu": cpu_device()}


# ---------------------------------------------------------------------------------------------------
# Kernels and op shapes
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """One kernel (or `launches` back-to-back launches counted together) of a design."""

    name: str
    read: int = 0  # DRAM bytes read
    written: int = 0  # DRAM bytes written
    tensor_flops: int = 0  # FLOPs on tensor cores (2 per multiply-add)
    fp32_flops: int = 0  # FLOPs / operations on FP32 CUDA cores
    launches: int = 1
    phase: str = "fwd"  # "fwd" or "bwd"
    note: str = ""

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass(frozen=True)
class OpShape:
    """One op call, channels_last. Op A: x (n, c, size, size), h (n, k, size, size) -> (n, width, size,
    size). Op B: y (n, c, size, size), h (n, k, 2*size, 2*size) if pool else (n, k, size, size) ->
    (n, k, size, size). Op C (the boundary): op B's inputs -> op B's output h_next and the entry out
    (n, width, size, size) of op A on (y, h_next)."""

    n: int
    c: int
    size: int
    width: int = 0  # op A's C_out (the bottleneck width); unused by op B
    k: int = RLA_CHANNELS
    pool: bool = False
    label: str = ""

    @property
    def m(self) -> int:
        """Pixels at the op's resolution: the GEMMs' M."""
        return self.n * self.size * self.size

    @classmethod
    def from_stage(cls, stage: Stage, batch: int, k: int = RLA_CHANNELS) -> "OpShape":
        """A stage's benchmarked shape (a block that is not the stage's first: no pooling)."""
        return cls(n=batch, c=stage.channels, size=stage.size, width=stage.width, k=k, label=stage.label)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bwd(kernels: Sequence[Kernel]) -> list[Kernel]:
    return [replace(kn, phase="bwd") for kn in kernels]


def _rereads(nbytes: int, sweeps: int, row_tiles: int, dev: DeviceSpec) -> int:
    """DRAM bytes of a row operand that `sweeps` column sweeps of a grid each read whole, `row_tiles`
    programs per sweep (row tiles on the fastest program axis).

    Sweeps whose programs are resident together read each row tile at about the same time, so L2
    serves all but the first: with R programs resident, R // row_tiles sweeps share one DRAM read.
    Sweeps that run one after another re-read the whole tensor, unless it fits in the L2 share.
    """
    if sweeps <= 1 or nbytes <= L2_FIT_FRACTION * dev.l2_mb * 1e6:
        return nbytes
    together = max(1, (dev.sms * TRITON_RESIDENT_PER_SM) // max(row_tiles, 1))
    return nbytes * _cdiv(sweeps, together)


def _library_wgrad(name: str, read: int, out_elems: int, e: int, flops: int) -> Kernel:
    """A cuBLAS/cuDNN weight gradient: split-K partials (fp32 workspace) reduced into the output."""
    ws = out_elems * STAT_BYTES
    return Kernel(name + " + split-K reduce", read=read + ws, written=ws + out_elems * e, tensor_flops=flops,
                  launches=LIBRARY_WGRAD_LAUNCHES)


def _running_stats(channels: int) -> Kernel:
    """rla_ext/ops/_batchnorm.update_running_stats after a fused forward: lerp_, mul_, add_ in fp32."""
    v = channels * STAT_BYTES
    return Kernel("running stats: lerp_, mul_, add_ (Python layer)", read=5 * v, written=3 * v, launches=3)


# ---------------------------------------------------------------------------------------------------
# eager: rla_ext/_reference as ATen runs it on CUDA
# ---------------------------------------------------------------------------------------------------

def _native_bn_forward(m: int, ch: int, e: int) -> list[Kernel]:
    """F.batch_norm, training, channels_last, bf16 -> ATen's native kernels (batch_norm_cuda)."""
    act, v = m * ch * e, ch * STAT_BYTES
    return [
        Kernel("bn: zero semaphores (at::zeros)", written=v),
        Kernel("bn: batch statistics (Welford)", read=act, written=2 * v, fp32_flops=m * ch * WELFORD_OPS),
        Kernel("bn: running-stat update + invstd", read=4 * v, written=3 * v),
        Kernel("bn: normalise", read=act + 4 * v, written=act, fp32_flops=m * ch * BN_OPS),
    ]


def _native_bn_backward(m: int, ch: int, e: int) -> list[Kernel]:
    """native_batch_norm_backward, channels_last: reduction then elementwise input gradient."""
    act, v = m * ch * e, ch * STAT_BYTES
    return _bwd([
        Kernel("bn backward: zero semaphores", written=v),
        Kernel("bn backward: reduce sum(g), sum(g*xhat)", read=2 * act + 2 * v, written=4 * v,
               fp32_flops=m * ch * BN_BWD_SUM_OPS),
        Kernel("bn backward: input gradient", read=2 * act + 5 * v, written=act, fp32_flops=m * ch * BN_BWD_ELEM_OPS),
    ])


def eager_concat_conv_bn_act(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """relu(batch_norm(conv2d(cat(x, h), w))): cat is materialised, read by the conv and, as the conv's
    saved input, by its weight gradient; autograd's cat backward is two views (no kernel)."""
    e = _elem(dtype)
    m, c, k, co = s.m, s.c, s.k, s.width
    cat, z, w = m * (c + k) * e, m * co * e, co * (c + k) * e
    gemm = 2 * m * co * (c + k)
    fwd = [
        Kernel("cat(x, h)", read=cat, written=cat),
        Kernel("conv1x1 on cat (cuDNN)", read=cat + w, written=z, tensor_flops=gemm),
        *_native_bn_forward(m, co, e),
        Kernel("relu", read=z, written=z, fp32_flops=m * co * RELU_OPS),
    ]
    bwd = [
        Kernel("relu backward (threshold_backward)", read=2 * z, written=z, fp32_flops=m * co * RELU_OPS),
        *_native_bn_backward(m, co, e),
        Kernel("conv1x1 dgrad -> d cat (cuDNN)", read=z + w, written=cat, tensor_flops=gemm),
        _library_wgrad("conv1x1 wgrad (cuDNN)", read=z + cat, out_elems=co * (c + k), e=e, flops=gemm),
    ]
    return fwd, _bwd(bwd)


def _update_sizes(s: OpShape, dtype: torch.dtype) -> tuple[int, ...]:
    """rla_update's operand sizes: (element bytes, pixels m, C, k, bytes of y, bytes of one k-channel
    activation at the output resolution, bytes of h (4x that when pooled), bytes of Wout and of the
    3x3 weight, FLOPs of the 1x1 GEMM and of the 3x3 conv)."""
    e = _elem(dtype)
    m, c, k = s.m, s.c, s.k
    st = m * k * e
    return (e, m, c, k, m * c * e, st, st * (4 if s.pool else 1), k * c * e, 9 * k * k * e,
            2 * m * k * c, 2 * m * k * k * 9)


def eager_rla_update(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """conv3x3(tanh(batch_norm(pool?(h) + conv1x1(y)))): every intermediate is a tensor (t, s, bn, a)."""
    e, m, c, k, y, st, hin, wo, wr, g1, g3 = _update_sizes(s, dtype)
    fwd = [Kernel("avg_pool2d(h)", read=hin, written=st, fp32_flops=4 * m * k)] if s.pool else []
    fwd += [
        Kernel("conv1x1 out (cuDNN)", read=y + wo, written=st, tensor_flops=g1),
        Kernel("s = h + t", read=2 * st, written=st, fp32_flops=m * k),
        *_native_bn_forward(m, k, e),
        Kernel("tanh", read=st, written=st, fp32_flops=m * k * TANH_OPS),
        Kernel("conv3x3 rec (cuDNN)", read=st + wr, written=st, tensor_flops=g3),
    ]
    bwd = [
        Kernel("conv3x3 dgrad (cuDNN)", read=st + wr, written=st, tensor_flops=g3),
        _library_wgrad("conv3x3 wgrad (cuDNN)", read=2 * st, out_elems=9 * k * k, e=e, flops=g3),
        Kernel("tanh backward", read=2 * st, written=st, fp32_flops=3 * m * k),
        *_native_bn_backward(m, k, e),
        # The add's backward hands ds to both inputs unchanged: no kernel.
        Kernel("conv1x1 dgrad -> dy (cuDNN)", read=st + wo, written=y, tensor_flops=g1),
        _library_wgrad("conv1x1 wgrad (cuDNN)", read=st + y, out_elems=k * c, e=e, flops=g1),
    ]
    if s.pool:
        bwd.append(Kernel("avg_pool2d backward", read=st, written=hin))
    return fwd, _bwd(bwd)


# ---------------------------------------------------------------------------------------------------
# cuda: csrc/cuda/concat_conv_bn_act.cu, rla_update.cu, rla_update_and_entry.cu and their headers
# ---------------------------------------------------------------------------------------------------

def cuda_reduce_chunks(channels: int, m: int) -> int:
    """Row chunks of reduce_channels (make_reduce_plan<channels_last>): one fp32 partial per chunk and channel."""
    channel_blocks = _cdiv(channels, CUDA_REDUCE_TX)
    chunks = _cdiv(CUDA_REDUCE_TARGET_BLOCKS, channel_blocks)
    chunks = min(chunks, _cdiv(m, CUDA_REDUCE_TY * CUDA_REDUCE_MIN_ROWS_PER_THREAD))
    chunks = max(1, min(chunks, CUDA_REDUCE_MAX_CHUNKS))
    rows_per_chunk = max(1, _cdiv(m, chunks))
    return max(1, _cdiv(m, rows_per_chunk))


def cuda_direct_conv_work(n: int, k: int, size: int) -> tuple[int, int]:
    """(pixels computed, halo elements loaded) of conv3x3_direct_kernel (make_conv_plan) over n images.

    A block computes a tile_h x 8 pixel tile for all k outputs, so pixels of tiles that overhang the
    image are computed and dropped (7x7 -> one 8x8 tile); each block loads its (tile_h+2) x 10 halo
    of every input channel, transformed (tanh(bn(s)) in the forward) as it is loaded.
    """
    groups = _cdiv(k, CUDA_CONV_OC_PER_THREAD)
    tile_h = max(1, (CUDA_CONV_THREADS // groups) // CUDA_CONV_TILE_W)
    tiles = _cdiv(size, CUDA_CONV_TILE_W) * _cdiv(size, tile_h)
    pixels = n * tiles * tile_h * CUDA_CONV_TILE_W
    halo = n * tiles * (tile_h + 2) * (CUDA_CONV_TILE_W + 2) * k
    return pixels, halo


def _check_cuda_k(k: int) -> None:
    if k > CUDA_MAX_DIRECT_K:
        raise ValueError(f"k = {k}: the model covers the CUDA design's k <= {CUDA_MAX_DIRECT_K} paths only")


def cuda_concat_conv_bn_act(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """Forward: cuBLAS GEMM of the x-part into an fp32 buffer; the statistics pass adds the h-part per
    element (k FMAs, on FP32 cores), rounds z and writes it; finalize; normalise + relu. Backward:
    statistics of the BN backward, the elementwise dz pass, four cuBLAS GEMMs that each read dz."""
    _check_cuda_k(s.k)
    e = _elem(dtype)
    m, c, k, co = s.m, s.c, s.k, s.width
    x, h, z = m * c * e, m * k * e, m * co * e
    zx = m * co * STAT_BYTES  # the x-part, unrounded (acc_t)
    v = co * STAT_BYTES
    chunks = cuda_reduce_chunks(co, m)
    part3, part2 = chunks * co * 3 * STAT_BYTES, chunks * co * 2 * STAT_BYTES
    fwd = [
        Kernel("GEMM x-part -> zx fp32 (cuBLAS)", read=x + co * c * e, written=zx, tensor_flops=2 * m * co * c),
        # h is read by each of the ceil(co/32) channel blocks of a chunk; they run side by side, so L2 serves the rest.
        Kernel("stats: z = round(zx + Wh.h), Welford partials", read=zx + h + co * k * e, written=z + part3,
               fp32_flops=m * co * (2 * k + WELFORD_OPS),
               note="per element k weight loads at stride C+k: uncoalesced, unseen by the roofline"),
        Kernel("stats finalize (+ BN params)", read=part3 + 2 * v, written=6 * v),
        Kernel("normalise + relu", read=z + 4 * v, written=z, fp32_flops=m * co * (BN_OPS + RELU_OPS)),
        _running_stats(co),
    ]
    bwd = [
        Kernel("bn params from saved stats", read=4 * v, written=4 * v),
        Kernel("bn backward partials: sum g, sum g*xhat", read=2 * z, written=part2,
               fp32_flops=m * co * (BN_OPS + RELU_OPS + BN_BWD_SUM_OPS)),
        Kernel("bn backward finalize", read=part2, written=2 * v),
        Kernel("bn input gradient -> dz", read=2 * z + 6 * v, written=z,
               fp32_flops=m * co * (BN_OPS + RELU_OPS + BN_BWD_ELEM_OPS)),
        Kernel("dgrad dx = dz.Wx (cuBLAS)", read=z + co * c * e, written=x, tensor_flops=2 * m * co * c),
        Kernel("dgrad dh = dz.Wh (cuBLAS)", read=z + co * k * e, written=h, tensor_flops=2 * m * co * k),
        _library_wgrad("wgrad dWx = dz^T.x (cuBLAS)", read=z + x, out_elems=co * c, e=e, flops=2 * m * co * c),
        _library_wgrad("wgrad dWh = dz^T.h (cuBLAS)", read=z + h, out_elems=co * k, e=e, flops=2 * m * co * k),
    ]
    return fwd, _bwd(bwd)


def cuda_rla_update(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """Forward: cuBLAS GEMM t = Wout.y into s; the statistics pass adds pool(h) in place; finalize; the
    direct 3x3 on FP32 cores with tanh(bn(s)) on load. Backward: a = tanh(bn(s)) materialised for
    cuDNN's weight gradient, the transposed direct 3x3 for da, BN backward (2 passes), cuBLAS GEMMs."""
    _check_cuda_k(s.k)
    e, m, c, k, y, st, hin, wo, wr, g1, g3 = _update_sizes(s, dtype)
    v = k * STAT_BYTES
    chunks = cuda_reduce_chunks(k, m)
    part3, part2 = chunks * k * 3 * STAT_BYTES, chunks * k * 2 * STAT_BYTES
    pixels, halo = cuda_direct_conv_work(s.n, k, s.size)
    direct = 2 * pixels * _cdiv(k, CUDA_CONV_OC_PER_THREAD) * CUDA_CONV_OC_PER_THREAD * k * 9
    fwd = [
        Kernel("GEMM t = y.Wout^T (cuBLAS)", read=y + wo, written=st, tensor_flops=g1),
        Kernel("stats: s = pool(h) + t in place, Welford partials", read=st + hin, written=st + part3,
               fp32_flops=m * k * (WELFORD_OPS + (4 if s.pool else 1))),
        Kernel("stats finalize (+ BN params)", read=part3 + 2 * v, written=6 * v),
        Kernel("direct conv3x3, tanh(bn(s)) on load (FP32 cores)", read=st + wr, written=st,
               fp32_flops=direct + halo * (BN_OPS + TANH_OPS)),
        _running_stats(k),
    ]
    bwd = [
        Kernel("bn params from saved stats", read=4 * v, written=4 * v),
        Kernel("a = tanh(bn(s)) recomputed", read=st + 4 * v, written=st, fp32_flops=m * k * (BN_OPS + TANH_OPS)),
        Kernel("direct conv3x3 transposed -> da (FP32 cores)", read=st + wr, written=st, fp32_flops=direct),
        _library_wgrad("conv3x3 wgrad (cuDNN convolution_backward)", read=2 * st, out_elems=9 * k * k, e=e,
                       flops=g3),
        Kernel("bn backward partials (tanh')", read=2 * st, written=part2,
               fp32_flops=m * k * (BN_OPS + TANH_OPS + BN_BWD_SUM_OPS)),
        Kernel("bn backward finalize", read=part2, written=2 * v),
        Kernel("bn input gradient (tanh') -> ds", read=2 * st + 6 * v, written=st,
               fp32_flops=m * k * (BN_OPS + TANH_OPS + BN_BWD_ELEM_OPS)),
    ]
    if s.pool:
        bwd.append(Kernel("pool backward -> dh", read=st, written=hin))
    bwd += [
        Kernel("dgrad dy = ds.Wout (cuBLAS)", read=st + wo, written=y, tensor_flops=g1),
        _library_wgrad("wgrad dWout = ds^T.y (cuBLAS)", read=st + y, out_elems=k * c, e=e, flops=g1),
    ]
    return fwd, _bwd(bwd)


def cuda_rla_update_and_entry(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """csrc/cuda/rla_update_and_entry.cu. Forward: the stacked weight (cat), ONE cuBLAS GEMM over y into
    P (Ce + k channels, fp32); the update tail reads P[Ce:] in place (statistics pass with pool(h),
    finalize, direct 3x3 with tanh(bn) on load); the entry's statistics pass reads P[:Ce] in place and
    adds W_entry[:, C:] h_next per element; finalize; normalise + relu. Backward: the entry's BN backward,
    go_u = dz.W_h (cuBLAS) + grad_h_next, dW_h, the update tail's backward, dP = [dz ; ds] copied side
    by side, ONE dgrad GEMM into y and ONE weight-gradient GEMM over y with the stacked weight."""
    _check_cuda_k(s.k)
    e, m, c, k, y, st, hin, wo, wr, g1, g3 = _update_sizes(s, dtype)
    co = s.width
    z, ws = m * co * e, (co + k) * c * e
    pc, pk = m * co * STAT_BYTES, m * k * STAT_BYTES  # P's entry and update columns, fp32
    ve, vk = co * STAT_BYTES, k * STAT_BYTES
    ch_e, ch_k = cuda_reduce_chunks(co, m), cuda_reduce_chunks(k, m)
    pixels, halo = cuda_direct_conv_work(s.n, k, s.size)
    direct = 2 * pixels * _cdiv(k, CUDA_CONV_OC_PER_THREAD) * CUDA_CONV_OC_PER_THREAD * k * 9
    stacked = Kernel("stacked weight [W_entry[:, :C] ; W_out] (cat)", read=ws, written=ws)
    fwd = [
        stacked,
        Kernel("ONE GEMM P = y.stacked^T -> fp32 (cuBLAS)", read=y + ws, written=pc + pk,
               tensor_flops=2 * m * (co + k) * c),
        Kernel("stats: s = pool(h) + P[Ce:], Welford partials", read=pk + hin, written=st + ch_k * k * 3 * STAT_BYTES,
               fp32_flops=m * k * (WELFORD_OPS + (4 if s.pool else 1))),
        Kernel("stats finalize (+ BN params)", read=ch_k * k * 3 * STAT_BYTES + 2 * vk, written=6 * vk),
        Kernel("direct conv3x3, tanh(bn(s)) on load (FP32 cores)", read=st + wr, written=st,
               fp32_flops=direct + halo * (BN_OPS + TANH_OPS)),
        _running_stats(k),
        Kernel("stats: z = round(P[:Ce] + Wh.h_next), Welford partials", read=pc + st + co * k * e,
               written=z + ch_e * co * 3 * STAT_BYTES, fp32_flops=m * co * (2 * k + WELFORD_OPS)),
        Kernel("stats finalize (+ BN params)", read=ch_e * co * 3 * STAT_BYTES + 2 * ve, written=6 * ve),
        Kernel("normalise + relu", read=z + 4 * ve, written=z, fp32_flops=m * co * (BN_OPS + RELU_OPS)),
        _running_stats(co),
    ]
    bwd = [
        Kernel("entry: bn params from saved stats", read=4 * ve, written=4 * ve),
        Kernel("entry: bn backward partials", read=2 * z, written=ch_e * co * 2 * STAT_BYTES,
               fp32_flops=m * co * (BN_OPS + RELU_OPS + BN_BWD_SUM_OPS)),
        Kernel("entry: bn backward finalize", read=ch_e * co * 2 * STAT_BYTES, written=2 * ve),
        Kernel("entry: bn input gradient -> dz", read=2 * z + 6 * ve, written=z,
               fp32_flops=m * co * (BN_OPS + RELU_OPS + BN_BWD_ELEM_OPS)),
        Kernel("dgrad dz.Wh -> entry's dh_next (cuBLAS)", read=z + co * k * e, written=st,
               tensor_flops=2 * m * co * k),
        _library_wgrad("wgrad dWh = dz^T.h_next (cuBLAS)", read=z + st, out_elems=co * k, e=e, flops=2 * m * co * k),
        Kernel("go_u = entry's dh_next + grad_h_next (add_)", read=2 * st, written=st, fp32_flops=m * k),
        Kernel("bn params from saved stats", read=4 * vk, written=4 * vk),
        Kernel("a = tanh(bn(s)) recomputed", read=st + 4 * vk, written=st, fp32_flops=m * k * (BN_OPS + TANH_OPS)),
        Kernel("direct conv3x3 transposed -> da (FP32 cores)", read=st + wr, written=st, fp32_flops=direct),
        _library_wgrad("conv3x3 wgrad (cuDNN convolution_backward)", read=2 * st, out_elems=9 * k * k, e=e,
                       flops=g3),
        Kernel("bn backward partials (tanh')", read=2 * st, written=ch_k * k * 2 * STAT_BYTES,
               fp32_flops=m * k * (BN_OPS + TANH_OPS + BN_BWD_SUM_OPS)),
        Kernel("bn backward finalize", read=ch_k * k * 2 * STAT_BYTES, written=2 * vk),
        Kernel("bn input gradient (tanh') -> ds", read=2 * st + 6 * vk, written=st,
               fp32_flops=m * k * (BN_OPS + TANH_OPS + BN_BWD_ELEM_OPS)),
    ]
    if s.pool:
        bwd.append(Kernel("pool backward -> dh", read=st, written=hin))
    bwd += [
        Kernel("dP = [dz ; ds] (two copies)", read=z + st, written=z + st, launches=2),
        stacked,
        Kernel("ONE dgrad dy = dP.stacked (cuBLAS)", read=z + st + ws, written=y, tensor_flops=2 * m * (co + k) * c),
        _library_wgrad("ONE wgrad dP^T.y (cuBLAS)", read=z + st + y, out_elems=(co + k) * c, e=e,
                       flops=2 * m * (co + k) * c),
        Kernel("dW_entry[:, :C], dW_out out of the stacked gradient (copies)", read=ws, written=ws, launches=2),
    ]
    return fwd, _bwd(bwd)


# ---------------------------------------------------------------------------------------------------
# triton: triton_kernels/concat_conv_bn_act.py, rla_update.py, gemm.py, batchnorm.py
# ---------------------------------------------------------------------------------------------------

def triton_splits(rows: int, tiles: int, dev: DeviceSpec) -> int:
    """Pixel splits of a Triton weight gradient (common.split_rows): ~4 programs per SM."""
    want = max(1, (4 * dev.sms) // max(tiles, 1)) if dev.sms else 2
    chunk = _cdiv(_cdiv(rows, want), TRITON_SPLIT_GRAIN) * TRITON_SPLIT_GRAIN
    return _cdiv(rows, chunk)


def _triton_wgrad_reduce(name: str, splits: int, out_elems: int, e: int) -> list[Kernel]:
    """wpart.sum(dim=0) (only with more than one split), then .to(activation dtype) (not for fp32)."""
    out = []
    if splits > 1:
        out.append(Kernel(f"{name}: partials sum (torch.sum)", read=splits * out_elems * STAT_BYTES,
                          written=out_elems * STAT_BYTES))
    if e != STAT_BYTES:
        out.append(Kernel(f"{name}: cast (.to)", read=out_elems * STAT_BYTES, written=out_elems * e))
    return out


def triton_concat_conv_bn_act(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """Forward: one GEMM over [x | h] writing z and BN partials, finalize, normalise + relu. Backward:
    the BN-backward reduction, finalize, then the dgrad and wgrad GEMMs rebuild dz on load.
    Grids put row tiles on program axis 0 (fastest), column tiles on axis 1: every column tile is a
    sweep over all rows, which re-reads the row operand (x and h; grad_out and z) from DRAM."""
    e = _elem(dtype)
    m, c, k, co = s.m, s.c, s.k, s.width
    x, h, z = m * c * e, m * k * e, m * co * e
    w = co * (c + k) * e
    v = co * STAT_BYTES
    gemm = 2 * m * co * (c + k)
    part = 2 * _cdiv(m, TRITON_STAT_ROWS) * co * STAT_BYTES
    fwd_sweeps = _cdiv(co, TRITON_GEMM_BLOCK_N)
    dgrad_sweeps = _cdiv(c, TRITON_DGRAD_BLOCK_N) + _cdiv(k, TRITON_DGRAD_BLOCK_N)
    wgrad_cols = _cdiv(c, TRITON_WGRAD_BLOCK_N) + _cdiv(k, TRITON_WGRAD_BLOCK_N)
    splits = triton_splits(m, _cdiv(co, 64) * _cdiv(c + k, 64), dev)
    fwd = [
        Kernel("GEMM [x|h].W^T -> z, BN partials in the epilogue",
               read=_rereads(x + h, fwd_sweeps, _cdiv(m, TRITON_STAT_ROWS), dev) + w,
               written=z + part, tensor_flops=gemm, fp32_flops=m * co * 4,
               note=f"{fwd_sweeps} column sweep(s) over x and h"),
        Kernel("finalize statistics", read=part, written=2 * v),
        Kernel("normalise + relu", read=z + 4 * v, written=z, fp32_flops=m * co * (BN_OPS + RELU_OPS + 1)),
        _running_stats(co),
    ]
    bwd = [
        Kernel("BN backward partials (relu mask)", read=2 * z, written=part,
               fp32_flops=m * co * (BN_OPS + RELU_OPS + BN_BWD_SUM_OPS)),
        Kernel("finalize sums", read=part, written=2 * v),
        Kernel("dgrad dz.W -> dx | dh, dz rebuilt on load",
               read=_rereads(2 * z, dgrad_sweeps, _cdiv(m, TRITON_DGRAD_BLOCK_M), dev) + w,
               written=x + h, tensor_flops=gemm, fp32_flops=m * co * dgrad_sweeps * LOAD_DZ_OPS,
               note=f"{dgrad_sweeps} column sweeps over grad_out and z"),
        Kernel("wgrad dz^T.[x|h], split over pixels", read=2 * z + x + h, written=splits * co * (c + k) * STAT_BYTES,
               tensor_flops=gemm, fp32_flops=m * co * wgrad_cols * LOAD_DZ_OPS, note=f"{splits} splits"),
        *_triton_wgrad_reduce("wgrad", splits, co * (c + k), e),
    ]
    return fwd, _bwd(bwd)


def triton_rla_update(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """Forward: GEMM y.Wout^T with pool(h) + add in the epilogue (s and BN partials), finalize, the 3x3
    implicit GEMM with tanh(bn(s)) recomputed per tap. Backward: the transposed 3x3 with the tanh' and
    BN-gradient partials in its epilogue, finalize, dgrad and wgrad GEMMs rebuilding dz, the 3x3
    weight gradient (tanh recomputed per tap), the dh pass."""
    e, m, c, k, y, st, hin, wo, wr, g1, g3 = _update_sizes(s, dtype)
    v = k * STAT_BYTES
    part = 2 * _cdiv(m, TRITON_STAT_ROWS) * k * STAT_BYTES
    state_sweeps = _cdiv(k, TRITON_STATE_BLOCK_N)
    conv_cols = _cdiv(k, TRITON_CONV3X3_BLOCK_N)
    dgrad_sweeps = _cdiv(c, TRITON_DGRAD_BLOCK_N)
    wgrad_cols = _cdiv(c, TRITON_WGRAD_BLOCK_N)
    splits1 = triton_splits(m, _cdiv(k, 64) * _cdiv(c, 64), dev)
    splits3 = triton_splits(m, 9 * _cdiv(k, TRITON_WGRAD3X3_BLOCK) ** 2, dev)
    fwd = [
        Kernel("GEMM y.Wout^T + pool(h) -> s, BN partials",
               read=_rereads(y, state_sweeps, _cdiv(m, TRITON_STAT_ROWS), dev) + hin + wo,
               written=st + part, tensor_flops=g1, fp32_flops=m * k * (4 + (4 if s.pool else 1))),
        Kernel("finalize statistics", read=part, written=2 * v),
        Kernel("conv3x3 implicit GEMM, tanh(bn(s)) per tap", read=st + wr, written=st, tensor_flops=g3,
               fp32_flops=9 * m * k * conv_cols * (BN_OPS + TANH_OPS)),
        _running_stats(k),
    ]
    bwd = [
        Kernel("conv3x3^T implicit GEMM -> g = da*tanh', grad partials", read=2 * st + wr, written=st + part,
               tensor_flops=g3, fp32_flops=m * k * (BN_OPS + TANH_OPS + BN_BWD_SUM_OPS + 3)),
        Kernel("finalize sums", read=part, written=2 * v),
        Kernel("dgrad dz.Wout -> dy, dz rebuilt on load",
               read=_rereads(2 * st, dgrad_sweeps, _cdiv(m, TRITON_DGRAD_BLOCK_M), dev) + wo, written=y,
               tensor_flops=g1, fp32_flops=m * k * dgrad_sweeps * LOAD_DZ_OPS,
               note=f"{dgrad_sweeps} column sweeps over g and s"),
        Kernel("wgrad dz^T.y, split over pixels", read=2 * st + y, written=splits1 * k * c * STAT_BYTES,
               tensor_flops=g1, fp32_flops=m * k * wgrad_cols * LOAD_DZ_OPS, note=f"{splits1} splits"),
        *_triton_wgrad_reduce("wgrad", splits1, k * c, e),
        Kernel("wgrad3x3 (9 taps), split over pixels, tanh(bn(s)) per tap", read=2 * st,
               written=splits3 * 9 * k * k * STAT_BYTES, tensor_flops=g3,
               fp32_flops=9 * m * k * _cdiv(k, TRITON_WGRAD3X3_BLOCK) * (BN_OPS + TANH_OPS),
               note=f"{splits3} splits"),
        *_triton_wgrad_reduce("wgrad3x3", splits3, 9 * k * k, e),
        Kernel("dh = dz (un-pooled), dz rebuilt", read=2 * st, written=hin, fp32_flops=m * k * LOAD_DZ_OPS),
    ]
    return fwd, _bwd(bwd)


def triton_rla_update_and_entry(s: OpShape, dtype: torch.dtype,
                                dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """triton_kernels/rla_update_and_entry.py. Forward: the stacked weight (torch.cat); ONE state GEMM over
    y whose epilogue stores the entry's Ce columns unrounded (zx, fp32) and the update's k columns as
    s = pool(h) + t with BN partials; the update tail (finalize, 3x3 implicit GEMM); op A's GEMM with its
    accumulator started from zx, reducing over h_next's k channels, writing z and partials; finalize;
    normalise + relu. Backward: the entry's BN sums; go_u = dz.Wh (dz rebuilt on load) then += grad_h_next;
    dWh; the update tail's backward and the dh pass; dP = [dz ; ds] stored by two dz passes; ONE dgrad
    GEMM into y and ONE weight-gradient GEMM over y (dP materialised)."""
    e, m, c, k, y, st, hin, wo, wr, g1, g3 = _update_sizes(s, dtype)
    co = s.width
    z, ws, zx = m * co * e, (co + k) * c * e, m * co * STAT_BYTES
    ve, vk = co * STAT_BYTES, k * STAT_BYTES
    part_e, part_k = 2 * _cdiv(m, TRITON_STAT_ROWS) * co * STAT_BYTES, 2 * _cdiv(m, TRITON_STAT_ROWS) * k * STAT_BYTES
    state_sweeps = _cdiv(co, TRITON_SPLIT_BLOCK_N) + _cdiv(k, TRITON_SPLIT_BLOCK_N)  # segment-aligned tiles
    entry_sweeps = _cdiv(co, TRITON_GEMM_BLOCK_N)
    conv_cols = _cdiv(k, TRITON_CONV3X3_BLOCK_N)
    dgrad_sweeps = _cdiv(c, TRITON_DGRAD_BLOCK_N)
    splits_h = triton_splits(m, _cdiv(co, 64) * _cdiv(k, 64), dev)
    splits_y = triton_splits(m, _cdiv(co + k, 64) * _cdiv(c, 64), dev)
    splits3 = triton_splits(m, 9 * _cdiv(k, TRITON_WGRAD3X3_BLOCK) ** 2, dev)
    stacked = Kernel("stacked weight [W_entry[:, :C] ; W_out] (torch.cat)", read=ws, written=ws)
    fwd = [
        stacked,
        Kernel("ONE GEMM y.stacked^T: zx (fp32) | s = pool(h) + t, BN partials",
               read=_rereads(y, state_sweeps, _cdiv(m, TRITON_STAT_ROWS), dev) + hin + ws,
               written=zx + st + part_k, tensor_flops=2 * m * (co + k) * c,
               fp32_flops=m * k * (4 + (4 if s.pool else 1)), note=f"{state_sweeps} column sweeps over y"),
        Kernel("finalize statistics", read=part_k, written=2 * vk),
        Kernel("conv3x3 implicit GEMM, tanh(bn(s)) per tap", read=st + wr, written=st, tensor_flops=g3,
               fp32_flops=9 * m * k * conv_cols * (BN_OPS + TANH_OPS)),
        _running_stats(k),
        Kernel("W_entry[:, C:] (contiguous copy)", read=co * k * e, written=co * k * e),
        Kernel("GEMM zx + h_next.Wh^T -> z, BN partials",
               read=zx + _rereads(st, entry_sweeps, _cdiv(m, TRITON_STAT_ROWS), dev) + co * k * e,
               written=z + part_e, tensor_flops=2 * m * co * k, fp32_flops=m * co * 4),
        Kernel("finalize statistics", read=part_e, written=2 * ve),
        Kernel("normalise + relu", read=z + 4 * ve, written=z, fp32_flops=m * co * (BN_OPS + RELU_OPS + 1)),
        _running_stats(co),
    ]
    bwd = [
        Kernel("entry: BN backward partials (relu mask)", read=2 * z, written=part_e,
               fp32_flops=m * co * (BN_OPS + RELU_OPS + BN_BWD_SUM_OPS)),
        Kernel("entry: finalize sums", read=part_e, written=2 * ve),
        Kernel("dgrad dz.Wh -> go_u, dz rebuilt on load", read=2 * z + co * k * e, written=st,
               tensor_flops=2 * m * co * k, fp32_flops=m * co * LOAD_DZ_OPS),
        Kernel("go_u += grad_h_next", read=2 * st, written=st, fp32_flops=m * k),
        Kernel("wgrad dz^T.h_next, split over pixels", read=2 * z + st, written=splits_h * co * k * STAT_BYTES,
               tensor_flops=2 * m * co * k, fp32_flops=m * co * LOAD_DZ_OPS, note=f"{splits_h} splits"),
        *_triton_wgrad_reduce("wgrad Wh", splits_h, co * k, e),
        Kernel("conv3x3^T implicit GEMM -> g = da*tanh', grad partials", read=2 * st + wr, written=st + part_k,
               tensor_flops=g3, fp32_flops=m * k * (BN_OPS + TANH_OPS + BN_BWD_SUM_OPS + 3)),
        Kernel("finalize sums", read=part_k, written=2 * vk),
        Kernel("wgrad3x3 (9 taps), split over pixels, tanh(bn(s)) per tap", read=2 * st,
               written=splits3 * 9 * k * k * STAT_BYTES, tensor_flops=g3,
               fp32_flops=9 * m * k * _cdiv(k, TRITON_WGRAD3X3_BLOCK) * (BN_OPS + TANH_OPS),
               note=f"{splits3} splits"),
        *_triton_wgrad_reduce("wgrad3x3", splits3, 9 * k * k, e),
        Kernel("dh = dz (un-pooled), dz rebuilt", read=2 * st, written=hin, fp32_flops=m * k * LOAD_DZ_OPS),
        Kernel("dP[:, :Ce] = dz (rebuilt from grad_out, z)", read=2 * z, written=z, fp32_flops=m * co * LOAD_DZ_OPS),
        Kernel("dP[:, Ce:] = ds (rebuilt from g, s)", read=2 * st, written=st, fp32_flops=m * k * LOAD_DZ_OPS),
        stacked,
        Kernel("ONE dgrad dP.stacked -> dy",
               read=_rereads(z + st, dgrad_sweeps, _cdiv(m, TRITON_DGRAD_BLOCK_M), dev) + ws, written=y,
               tensor_flops=2 * m * (co + k) * c, note=f"{dgrad_sweeps} column sweeps over dP"),
        Kernel("ONE wgrad dP^T.y, split over pixels", read=z + st + y, written=splits_y * (co + k) * c * STAT_BYTES,
               tensor_flops=2 * m * (co + k) * c, note=f"{splits_y} splits"),
        *_triton_wgrad_reduce("wgrad stacked", splits_y, (co + k) * c, e),
        Kernel("dW_entry = cat(dW[:Ce], dWh), dW_out (copies)", read=ws + co * k * e, written=ws + co * k * e,
               launches=2),
    ]
    return fwd, _bwd(bwd)


# ---------------------------------------------------------------------------------------------------
# floor: compulsory traffic, one pass per pass, tensor cores
# ---------------------------------------------------------------------------------------------------

def _floor(traffic: Callable[[str], bytes_model.Traffic], fwd_flops: int) -> tuple[list[Kernel], list[Kernel]]:
    f, both = traffic("fwd"), traffic("fwd+bwd")
    # The backward's GEMMs are the forward's twice over: input gradient and weight gradient.
    return ([Kernel("forward in one pass", read=f.read, written=f.written, tensor_flops=fwd_flops)],
            [Kernel("backward in one pass", read=both.read - f.read, written=both.written - f.written,
                    tensor_flops=2 * fwd_flops, phase="bwd")])


def floor_concat_conv_bn_act(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """Read x, h, W once, write out and z once (forward); the bytes of benchmarks/bytes_model.py."""
    return _floor(lambda p: bytes_model.concat_conv_bn_act_traffic(s.n, s.c, s.k, s.width, s.size * s.size, dtype, p),
                  2 * s.m * s.width * (s.c + s.k))


def floor_rla_update(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """Read h, y and the weights once, write out and s once (forward); bytes_model.py's bytes."""
    return _floor(lambda p: bytes_model.rla_update_traffic(s.n, s.c, s.k, s.size * s.size, dtype, p, pool=s.pool),
                  2 * s.m * s.k * s.c + 2 * s.m * s.k * s.k * 9)


def floor_rla_update_and_entry(s: OpShape, dtype: torch.dtype,
                               dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
    """The boundary's compulsory bytes (y read once each way; h_next and dh_next internal) in one pass."""
    return _floor(lambda p: bytes_model.rla_update_and_entry_traffic(s.n, s.c, s.k, s.width, s.size * s.size, dtype,
                                                                     p, pool=s.pool),
                  2 * s.m * s.k * s.c + 2 * s.m * s.k * s.k * 9 + 2 * s.m * s.width * (s.c + s.k))


# ---------------------------------------------------------------------------------------------------
# The block boundary as two ops (what every design without a boundary kernel runs)
# ---------------------------------------------------------------------------------------------------

Builder = Callable[[OpShape, torch.dtype, DeviceSpec], tuple[list[Kernel], list[Kernel]]]


def consumer_sums(s: OpShape, dtype: torch.dtype) -> list[Kernel]:
    """The adds autograd runs when the boundary is two ops: y feeds the update and the entry, and h_next
    feeds the entry and the next step, so each gets its gradient summed from two tensors (a fused
    boundary forms both sums inside its kernels)."""
    e = _elem(dtype)
    y, h_next = s.m * s.c * e, s.m * s.k * e
    return _bwd([Kernel("autograd: dy = entry's + update's", read=2 * y, written=y, fp32_flops=s.m * s.c),
                 Kernel("autograd: dh_next = entry's + next step's", read=2 * h_next, written=h_next,
                        fp32_flops=s.m * s.k)])


def two_op_boundary(update: Builder, entry: Builder) -> Builder:
    """The boundary as `update` then `entry` on (y, h_next): their kernels (backward in autograd's
    order, the entry's first) and the consumer sums."""
    def build(s: OpShape, dtype: torch.dtype, dev: DeviceSpec) -> tuple[list[Kernel], list[Kernel]]:
        uf, ub = update(s, dtype, dev)
        ef, eb = entry(s, dtype, dev)
        return uf + ef, eb + ub + consumer_sums(s, dtype)
    return build


BUILDERS: dict[str, dict[str, Builder]] = {
    "eager": {ENTRY: eager_concat_conv_bn_act, UPDATE: eager_rla_update,
              BOUNDARY: two_op_boundary(eager_rla_update, eager_concat_conv_bn_act)},
    "cuda": {ENTRY: cuda_concat_conv_bn_act, UPDATE: cuda_rla_update, BOUNDARY: cuda_rla_update_and_entry},
    "triton": {ENTRY: triton_concat_conv_bn_act, UPDATE: triton_rla_update, BOUNDARY: triton_rla_update_and_entry},
    "floor": {ENTRY: floor_concat_conv_bn_act, UPDATE: floor_rla_update, BOUNDARY: floor_rla_update_and_entry},
}


def has_design(op: str, design: str) -> bool:
    """Whether `design` has a kernel list for `op` (every design has the two single ops)."""
    return op in BUILDERS.get(design, {})


# ---------------------------------------------------------------------------------------------------
# Time, rows
# ---------------------------------------------------------------------------------------------------

def kernel_terms_s(kernel: Kernel, dev: DeviceSpec, dtype: torch.dtype) -> dict[str, float]:
    """The roofline terms of one kernel, in seconds: bytes, tensor FLOPs, FP32 FLOPs and launches."""
    return {"memory": kernel.bytes / (dev.bandwidth_gbps * 1e9),
            "tensor": kernel.tensor_flops / dev.gemm_rate(dtype),
            "fp32": kernel.fp32_flops / (dev.fp32_tflops * 1e12),
            "launch": kernel.launches * dev.launch_us * 1e-6}


def kernel_time_ms(kernel: Kernel, dev: DeviceSpec, dtype: torch.dtype) -> float:
    """max(bytes / bandwidth, tensor FLOPs / tensor rate, FP32 FLOPs / FP32 rate) + launches * overhead."""
    t = kernel_terms_s(kernel, dev, dtype)
    return 1e3 * (max(t["memory"], t["tensor"], t["fp32"]) + t["launch"])


def kernel_bound(kernel: Kernel, dev: DeviceSpec, dtype: torch.dtype) -> str:
    """The term that decides the kernel's time ("launch" when launches cost more than the work)."""
    t = kernel_terms_s(kernel, dev, dtype)
    work = max(("memory", "tensor", "fp32"), key=lambda name: t[name])
    return "launch" if t["launch"] > t[work] else work


def op_kernels(op: str, design: str, shape: OpShape, dtype: torch.dtype, dev: DeviceSpec,
               pass_: str = "fwd+bwd") -> tuple[Kernel, ...]:
    """The kernels `design` launches for one call of `op`, in order (forward, then backward)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {PASSES}, got {pass_!r}")
    if op in UNMODELLED:
        raise ValueError(f"op {op!r}: {UNMODELLED[op]}")
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if design not in BUILDERS:
        raise ValueError(f"design: expected one of {DESIGNS}, got {design!r}")
    if not has_design(op, design):
        raise ValueError(f"design {design!r} has no {op} kernels to model")
    fwd, bwd = BUILDERS[design][op](shape, dtype, dev)
    return tuple(fwd) if pass_ == "fwd" else tuple(fwd + bwd)


def _kernel_total(name: str) -> property:
    """A property summing one Kernel field over a row's kernels."""
    return property(lambda self: sum(getattr(kn, name) for kn in self.kernels))


@dataclass(frozen=True)
class OpRow:
    """One (op, pass, shape, design) on one device: its kernels and modelled times."""

    op: str
    pass_: str
    shape: OpShape
    design: str
    device: str
    dtype: str
    kernels: tuple[Kernel, ...]
    kernel_ms: tuple[float, ...]  # modelled time of each kernel
    floor_ms: float  # the floor design's modelled time for the same call

    @property
    def time_ms(self) -> float:
        return sum(self.kernel_ms)

    # Totals over the kernels: bytes read / written, tensor-core and FP32 FLOPs, launches.
    read = _kernel_total("read")
    written = _kernel_total("written")
    tensor_flops = _kernel_total("tensor_flops")
    fp32_flops = _kernel_total("fp32_flops")
    launches = _kernel_total("launches")

    @property
    def vs_floor(self) -> float:
        return self.time_ms / self.floor_ms


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _time_ms(kernels: Sequence[Kernel], dev: DeviceSpec, dtype: torch.dtype) -> tuple[float, ...]:
    return tuple(kernel_time_ms(kn, dev, dtype) for kn in kernels)


def model_op(op: str, pass_: str, shape: OpShape, design: str, dev: DeviceSpec,
             dtype: torch.dtype = torch.bfloat16) -> OpRow:
    """One op call under one design, with the floor beside it."""
    kernels = op_kernels(op, design, shape, dtype, dev, pass_)
    floor = sum(_time_ms(op_kernels(op, "floor", shape, dtype, dev, pass_), dev, dtype))
    return OpRow(op=op, pass_=pass_, shape=shape, design=design, device=dev.key, dtype=_dtype_name(dtype),
                 kernels=kernels, kernel_ms=_time_ms(kernels, dev, dtype), floor_ms=floor)


def designs_for(dev: DeviceSpec) -> tuple[str, ...]:
    return DESIGNS if dev.gpu else CPU_DESIGNS


def model_ops(dev: DeviceSpec, batch: int = 256, dtype: torch.dtype = torch.bfloat16,
              stages: Sequence[Stage] = STAGES, ops: Sequence[str] = OPS, passes: Sequence[str] = PASSES,
              designs: Sequence[str] | None = None) -> list[OpRow]:
    """Every (op, pass, stage shape, design) at `batch`, in the benchmarks' shapes (the boundary at a
    stage shape: y of the stage, the next block's entry of the stage's width), less the designs without
    kernels for an op."""
    designs = designs_for(dev) if designs is None else tuple(designs)
    return [model_op(op, pass_, OpShape.from_stage(stage, batch), design, dev, dtype)
            for op in ops for pass_ in passes for stage in stages for design in designs if has_design(op, design)]


# ---------------------------------------------------------------------------------------------------
# The whole network: the 16 RLA steps of RLA-ResNet-50
# ---------------------------------------------------------------------------------------------------

def rla_resnet50_steps(batch: int, k: int = RLA_CHANNELS) -> tuple[tuple[OpShape, OpShape], ...]:
    """(op A, op B) of each of RLA-ResNet-50's 16 blocks at 224x224.

    A stage's first block takes the previous stage's output (the stem's 64 channels for stage 1) at
    the previous resolution: its conv1 (op A) runs there (the stride is on the 3x3 conv), and its RLA
    update pools h 2x2 when the resolution halves. The other blocks are shapes.STAGES' shapes.
    """
    steps = []
    in_c, in_size = STEM_CHANNELS, STEM_SIZE
    for stage, blocks in zip(STAGES, RESNET50_BLOCKS):
        for b in range(blocks):
            entry = OpShape(n=batch, c=in_c, size=in_size, width=stage.width, k=k,
                            label=f"{stage.label} block {b}")
            update = OpShape(n=batch, c=stage.channels, size=stage.size, k=k, pool=in_size != stage.size,
                             label=f"{stage.label} block {b}")
            steps.append((entry, update))
            in_c, in_size = stage.channels, stage.size
    return tuple(steps)


def rla_resnet50_boundaries(batch: int, k: int = RLA_CHANNELS) -> tuple[OpShape, ...]:
    """The 15 block boundaries of RLA-ResNet-50: block t's update (on y = block t's output) with block
    t + 1's entry (on the same y, at its own width), for t = 0..14."""
    steps = rla_resnet50_steps(batch, k)
    out = []
    for (_, update), (entry, _) in zip(steps, steps[1:]):
        assert (entry.c, entry.size) == (update.c, update.size)
        out.append(replace(update, width=entry.width, label=f"{update.label} -> {entry.label}"))
    return tuple(out)


@dataclass(frozen=True)
class NetworkRow:
    """One design over all RLA steps of the network (both ops, one pass each); `boundary`: the 15 block
    boundaries run as the design's fused boundary op, else as two ops each (plus autograd's sums)."""

    design: str
    device: str
    batch: int
    dtype: str
    pass_: str
    steps: int
    time_ms: float
    launches: int
    boundary: bool = False

    @property
    def launches_per_step(self) -> float:
        return self.launches / self.steps

    @property
    def label(self) -> str:
        return f"{self.design}, fused boundary" if self.boundary else self.design


def network_calls(batch: int, boundary: bool, k: int = RLA_CHANNELS) -> list[tuple[str, OpShape]]:
    """The op calls of one RLA-ResNet-50 pass: (op, shape) per call, in order. Two ops per step; with
    `boundary`, block 0's entry, the 15 boundaries and block 15's update."""
    steps = rla_resnet50_steps(batch, k)
    if boundary:
        return ([(ENTRY, steps[0][0])] + [(BOUNDARY, b) for b in rla_resnet50_boundaries(batch, k)]
                + [(UPDATE, steps[-1][1])])
    return [(op, shape) for entry, update in steps for op, shape in ((ENTRY, entry), (UPDATE, update))]


def model_network(dev: DeviceSpec, batch: int = 256, dtype: torch.dtype = torch.bfloat16, pass_: str = "fwd+bwd",
                  designs: Sequence[str] | None = None) -> list[NetworkRow]:
    """The RLA ops of RLA-ResNet-50 (16 steps, both ops) per design: the sum of their op rows. Each design
    once with two ops per step (autograd's sums of dy and dh_next at the 15 boundaries included in the
    backward) and, when it has a fused boundary kernel other than its two-op composition (not eager),
    once with the boundaries fused."""
    designs = designs_for(dev) if designs is None else tuple(designs)
    rows = []
    for design in designs:
        for boundary in (False, True):
            if boundary and (design == "eager" or not has_design(BOUNDARY, design)):
                continue
            calls = [model_op(op, pass_, shape, design, dev, dtype) for op, shape in network_calls(batch, boundary)]
            time_ms = sum(r.time_ms for r in calls)
            launches = sum(r.launches for r in calls)
            if not boundary and pass_ == "fwd+bwd":
                sums = [kn for b in rla_resnet50_boundaries(batch) for kn in consumer_sums(b, dtype)]
                time_ms += sum(_time_ms(sums, dev, dtype))
                launches += sum(kn.launches for kn in sums)
            rows.append(NetworkRow(design=design, device=dev.key, batch=batch, dtype=_dtype_name(dtype), pass_=pass_,
                                   steps=RESNET50_STEPS, time_ms=time_ms, launches=launches, boundary=boundary))
    return rows


# ---------------------------------------------------------------------------------------------------
# Measured times beside modelled ones
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasuredRow:
    """A measured op row of a results.json beside the model of the same call."""

    op: str
    pass_: str
    shape: str
    provider: str
    batch: int
    dtype: str
    measured_ms: float
    modelled_ms: float | None  # None: no design models this provider (compile, cpp)
    floor_ms: float

    @property
    def ratio(self) -> float | None:
        """measured / modelled."""
        return None if self.modelled_ms is None else self.measured_ms / self.modelled_ms


def device_from_results(results: dict[str, Any]) -> DeviceSpec | None:
    """The named device a results.json was measured on, when the model knows it."""
    name = str(results.get("device_name", "")).upper()
    for key in ("H200", "H100"):
        if key in name:
            return DEVICES[key.lower()]
    return DEVICES["cpu"] if results.get("device_type") == "cpu" else None


def unmodelled_ops(results: dict[str, Any]) -> dict[str, int]:
    """The ops of a results dict that the model skips (UNMODELLED), with how many successful op rows each has."""
    counts: dict[str, int] = {}
    for r in results.get("rows", []):
        if r.get("kind") == "op" and r.get("status") == "ok" and r.get("op") in UNMODELLED:
            counts[r["op"]] = counts.get(r["op"], 0) + 1
    return counts


def join_measured(results: dict[str, Any], dev: DeviceSpec) -> list[MeasuredRow]:
    """Every successful op row of a `python -m benchmarks` results dict, modelled at its own batch,
    dtype and stage shape (k from the row, default 32). Rows of ops the model does not cover (UNMODELLED,
    reported by unmodelled_ops) are left out."""
    rows = []
    for r in results.get("rows", []):
        if r.get("kind") != "op" or r.get("status") != "ok" or not r.get("time_ms"):
            continue
        median = r["time_ms"].get("median")
        if median is None or r.get("op") not in OPS or r.get("pass") not in PASSES:
            continue
        try:
            stage = stage_by_label(r["shape"], r["op"])
        except (KeyError, ValueError):
            continue
        batch = int(r.get("batch", results.get("batch")))
        dtype = DTYPES.get(r.get("dtype", results.get("dtype", "bfloat16")))
        if dtype is None:  # float64: not modelled
            continue
        shape = OpShape.from_stage(stage, batch, k=int(r.get("k", RLA_CHANNELS)))
        design = PROVIDER_DESIGN.get(r["provider"])
        if design is not None and (design not in designs_for(dev) or not has_design(r["op"], design)):
            design = None
        floor = model_op(r["op"], r["pass"], shape, "floor", dev, dtype)
        modelled = None if design is None else model_op(r["op"], r["pass"], shape, design, dev, dtype).time_ms
        rows.append(MeasuredRow(op=r["op"], pass_=r["pass"], shape=r["shape"], provider=r["provider"], batch=batch,
                                dtype=_dtype_name(dtype), measured_ms=float(median), modelled_ms=modelled,
                                floor_ms=floor.time_ms))
    return rows


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------

def _md(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def format_device(dev: DeviceSpec, dtype: torch.dtype) -> str:
    rate = dev.gemm_rate(dtype) / 1e12
    return (f"{dev.name}: {dev.bandwidth_gbps:.0f} GB/s, GEMMs {rate:.3g} TFLOP/s ({_dtype_name(dtype)}), "
            f"FP32 {dev.fp32_tflops:.3g} TFLOP/s, {dev.launch_us:g} us per launch, L2 {dev.l2_mb:g} MB "
            f"({dev.source})")


def format_network(rows: Sequence[NetworkRow]) -> str:
    """design | modelled ms | vs eager | x floor | launches per RLA step; the floor is the lowest floor row
    (the fused boundary's when present)."""
    eager = next((r for r in rows if r.design == "eager" and not r.boundary), None)
    floor = min((r for r in rows if r.design == "floor"), key=lambda r: r.time_ms, default=None)
    table = [[r.label, _f(r.time_ms, 2),
              _f(r.time_ms / eager.time_ms, 2) if eager else "",
              _f(r.time_ms / floor.time_ms, 2) if floor else "",
              f"{r.launches_per_step:.1f}"] for r in rows]
    return _md(["design", "modelled ms", "x eager", "x floor", "launches per RLA step"], table,
               [False, True, True, True, True])


def format_ops(rows: Sequence[OpRow]) -> str:
    """One line per (op, pass, shape, design)."""
    table = [[r.op, r.pass_, r.shape.label, r.design, str(r.launches), _f(r.read / 1e6, 1), _f(r.written / 1e6, 1),
              _f(r.tensor_flops / 1e9, 1), _f(r.fp32_flops / 1e9, 1), _f(r.time_ms), _f(r.vs_floor, 2)]
             for r in rows]
    return _md(["op", "pass", "shape", "design", "launches", "MB read", "MB written", "GFLOP tensor",
                "GFLOP fp32", "modelled ms", "x floor"], table, [False] * 4 + [True] * 7)


def format_kernels(row: OpRow, dev: DeviceSpec, dtype: torch.dtype) -> str:
    """Every kernel of one op row, in launch order, with the term that bounds it."""
    table = [[str(i), kn.phase, kn.name, str(kn.launches), _f(kn.read / 1e6, 2), _f(kn.written / 1e6, 2),
              _f(kn.tensor_flops / 1e9, 2), _f(kn.fp32_flops / 1e9, 2), _f(ms, 4), kernel_bound(kn, dev, dtype),
              kn.note]
             for i, (kn, ms) in enumerate(zip(row.kernels, row.kernel_ms), 1)]
    head = (f"{row.op} {row.pass_} {row.shape.label} batch {row.shape.n}, design {row.design}: "
            f"{row.launches} launches, {_f(row.time_ms)} ms modelled ({_f(row.vs_floor, 2)}x floor)")
    return head + "\n\n" + _md(["#", "phase", "kernel", "launches", "MB read", "MB written", "GFLOP tensor",
                                 "GFLOP fp32", "modelled ms", "bound", "note"], table,
                                [True, False, False] + [True] * 6 + [False, False])


def format_measured(rows: Sequence[MeasuredRow]) -> str:
    table = [[r.op, r.pass_, r.shape, r.provider, str(r.batch), _f(r.modelled_ms), _f(r.measured_ms),
              _f(r.ratio, 2), _f(r.floor_ms)] for r in rows]
    return _md(["op", "pass", "shape", "provider", "batch", "modelled ms", "measured ms", "measured / modelled",
                "floor ms (modelled)"], table, [False] * 4 + [True] * 5)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks model",
                                description="Modelled time of every design of the fused RLA ops (no GPU needed).")
    p.add_argument("--device", choices=sorted(DEVICES),
                   help="default: the device of --measured when the model knows it, else h100")
    p.add_argument("--batch", type=int, default=256, help="batch of the op and network tables (default 256; the "
                   "measured table uses each row's own batch)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--measured", type=Path, help="a results.json of `python -m benchmarks` to put beside the model")
    p.add_argument("--kernels", action="store_true", help="also list each design's kernels at --shape")
    p.add_argument("--shape", default=STAGES[0].label, help="stage shape of --kernels (default %(default)s)")
    p.add_argument("--launch-us", type=float, help="override the device's launch overhead, microseconds")
    p.add_argument("--cpu-bandwidth-gbps", type=float, default=20.0, help="cpu device: memory bandwidth, GB/s")
    p.add_argument("--cpu-gflops", type=float, default=400.0, help="cpu device: GEMM rate, GFLOP/s")
    return p.parse_args(argv)


def resolve_device(args: argparse.Namespace, results: dict[str, Any] | None) -> DeviceSpec:
    """--device, else the results' device, else H100; CPU parameters and --launch-us applied."""
    if args.device:
        dev = DEVICES[args.device]
    else:
        dev = (device_from_results(results) if results else None) or H100
    if dev.key == "cpu":
        dev = cpu_device(bandwidth_gbps=args.cpu_bandwidth_gbps, gflops=args.cpu_gflops)
    if args.launch_us is not None:
        dev = replace(dev, launch_us=args.launch_us)
    return dev


def report(args: argparse.Namespace) -> str:
    """The whole markdown report for parsed arguments."""
    results = json.loads(args.measured.read_text()) if args.measured else None
    dev = resolve_device(args, results)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if dev.gpu else torch.float32)
    out = [
        "# rla_ext performance model: MODELLED times, not measurements",
        "",
        f"Device: {format_device(dev, dtype)}.",
        f"Activations {_dtype_name(dtype)}, channels_last, training mode. Time of a kernel = max(bytes / "
        "bandwidth, tensor FLOPs / tensor rate, FP32 FLOPs / FP32 rate) + launches x launch overhead; a design = "
        "the sum of its kernels. Host (Python) time per call is not modelled. Kernel lists and assumptions: "
        "benchmarks/perf_model.py.",
        "",
        f"## RLA-ResNet-50: the RLA ops of one training step (16 RLA steps, fwd+bwd, batch {args.batch}), modelled",
        "",
        format_network(model_network(dev, args.batch, dtype)),
        "",
        f"## Ops at the stage shapes (batch {args.batch}), modelled",
        "",
        format_ops(model_ops(dev, args.batch, dtype)),
    ]
    if args.kernels:
        shape = OpShape.from_stage(stage_by_label(args.shape), args.batch)
        out += ["", f"## Kernels at {shape.label}, batch {args.batch}, fwd+bwd (modelled)"]
        for op in OPS:
            for design in designs_for(dev):
                if has_design(op, design):
                    out += ["", format_kernels(model_op(op, "fwd+bwd", shape, design, dev, dtype), dev, dtype)]
    if results is not None:
        where = f"{results.get('device_name', '?')}, {results.get('date', '?')}, commit " \
                f"{str(results.get('git_commit', '?'))[:12]}"
        out += ["", f"## Modelled ({dev.name}) vs measured ({where}: {args.measured.name})", ""]
        if results.get("channels_last") is False:
            out += ["The run used NCHW activations; the model assumes channels_last.", ""]
        out.append(format_measured(join_measured(results, dev)))
        for op, count in unmodelled_ops(results).items():
            out += ["", f"Skipped {count} measured {op} rows: {UNMODELLED[op]}."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    print(report(parse_args(argv)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
