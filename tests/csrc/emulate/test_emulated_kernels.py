"""The CUDA kernels of csrc/cuda/, run on the CPU under the emulator (tests/cuda_emulation.py), against
the plain-PyTorch compositions of tests/kernel_cases.py: the checks tests/csrc/test_cuda_kernels.py makes
on a GPU, at small odd shapes, in every dtype, both memory formats, training and eval, forward and
backward, under the in-order, shuffled and threaded schedules.

Quick tier by default (part of `make test`); RLA_EXT_EMULATE_FULL=1 (`make emulate-cuda`) runs the full
tier: more shapes and seeds, every schedule for every case.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cuda_emulation
import kernel_cases as kc
from rla_testing import HALF, TOLERANCES

FULL = cuda_emulation.full_tier()
full_only = pytest.mark.skipif(not FULL, reason="full tier only (RLA_EXT_EMULATE_FULL=1, `make emulate-cuda`)")

# (N, C, k, C_out, (H, W)): odd channel counts everywhere; N*H*W is not a multiple of any block size.
CCBA_SHAPES = [
    (3, 40, 5, 37, (9, 7)),    # M = 189, C_out not a multiple of 32 (partial channel blocks)
    (2, 24, 3, 33, (1, 1)),    # 1x1 spatial, M = 2
    (5, 48, 8, 40, (13, 17)),  # M = 1105: several reduction chunks; grid-stride loops take several turns
    (1, 17, 70, 9, (3, 5)),    # k > 64: the h-part goes through a GEMM in the accumulation dtype
]
FULL_CCBA_SHAPES = [
    (8, 96, 32, 64, (14, 14)),  # RLA-ResNet-like (k = 32), M = 1568
    (2, 33, 1, 1, (6, 5)),      # one output channel, k = 1
    (4, 7, 64, 130, (5, 3)),    # k at the direct limit, C_out > 128
]
# (N, C, k, (H, W) of y, pool, odd h)
UPDATE_CASES = [
    (3, 24, 20, (5, 6), True, True),      # k not a multiple of 8, floor-mode pooling of an odd h
    (2, 16, 32, (1, 1), True, True),      # 1x1 output from a 3x3 h
    (2, 40, 64, (9, 7), False, False),    # k at the direct 3x3 kernel's limit (8 channel groups)
    (4, 12, 1, (7, 7), True, False),      # k = 1
    (5, 48, 9, (13, 17), False, False),   # several reduction chunks and conv tiles per image
    (2, 24, 96, (4, 5), False, False),    # k > 64: the 3x3 conv falls back to ATen's
]
FULL_UPDATE_CASES = [
    (8, 64, 32, (14, 14), True, False),   # RLA-ResNet-like
    (3, 20, 8, (11, 3), True, True),      # k = one channel group, thin images
    (2, 9, 33, (2, 9), False, False),     # k just above a multiple of 8
]

# Real threads cost seconds per case (256 OS threads meeting at every barrier on 2 cores): they run a
# bounded set of their own below, the fibers run the whole matrix.
SCHEDULES = ["shuffled"] + (["inorder", ("shuffled", 1)] if FULL else [])
ccba_shapes = CCBA_SHAPES + (FULL_CCBA_SHAPES if FULL else [])
update_cases = UPDATE_CASES + (FULL_UPDATE_CASES if FULL else [])
dtypes = pytest.mark.parametrize("dtype", kc.ALL_DTYPES, ids=str)
formats = pytest.mark.parametrize("fmt", kc.FORMATS)
trainings = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def ids(case) -> str:
    return "-".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in case)


def sched_id(s) -> str:
    return s if isinstance(s, str) else f"{s[0]}{s[1]}"


# ------------------------------------------------------------------------------ the case matrix
@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True, ids=sched_id)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "none"])
@pytest.mark.parametrize("shape", ccba_shapes, ids=ids)
@dtypes
@formats
@trainings
def test_ccba(emulated, schedule, shape, dtype, fmt, training, relu):
    kc.check_ccba(*shape, dtype, fmt, training, relu, device="cpu", kernels=kc.module_kernels(emulated))


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True, ids=sched_id)
@pytest.mark.parametrize("case", update_cases, ids=ids)
@dtypes
@formats
@trainings
def test_update(emulated, schedule, case, dtype, fmt, training):
    n, c, k, hw, pool, odd_h = case
    kc.check_update(n, c, k, hw, pool, dtype, fmt, training, odd_h=odd_h, device="cpu",
                    kernels=kc.module_kernels(emulated))


# The in-order schedule on the quick tier too (the full tier runs it over the whole matrix above).
@pytest.mark.parametrize("schedule", ["inorder"], indirect=True)
@dtypes
@formats
@trainings
def test_inorder_schedule(emulated, schedule, dtype, fmt, training):
    ks = kc.module_kernels(emulated)
    kc.check_ccba(*CCBA_SHAPES[0], dtype, fmt, training, True, device="cpu", kernels=ks)
    n, c, k, hw, pool, odd_h = UPDATE_CASES[0]
    kc.check_update(n, c, k, hw, pool, dtype, fmt, training, odd_h=odd_h, device="cpu", kernels=ks)


# Real threads (a real barrier, racing blocks' threads): slow, so a few cases on the quick tier.
@pytest.mark.parametrize("schedule", ["threaded"], indirect=True)
@formats
def test_threaded_schedule(emulated, schedule, fmt):
    ks = kc.module_kernels(emulated)
    kc.check_ccba(*CCBA_SHAPES[0], torch.float32, fmt, True, True, device="cpu", kernels=ks)
    n, c, k, hw, pool, odd_h = UPDATE_CASES[0]
    kc.check_update(n, c, k, hw, pool, torch.bfloat16, fmt, True, odd_h=odd_h, device="cpu", kernels=ks)


@full_only
@pytest.mark.parametrize("schedule", ["threaded"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@formats
def test_threaded_all_shapes(emulated, schedule, dtype, fmt):
    ks = kc.module_kernels(emulated)
    for shape in ccba_shapes:
        kc.check_ccba(*shape, dtype, fmt, True, True, device="cpu", kernels=ks)
    for n, c, k, hw, pool, odd_h in update_cases:
        kc.check_update(n, c, k, hw, pool, dtype, fmt, True, odd_h=odd_h, device="cpu", kernels=ks)


@full_only
@pytest.mark.parametrize("seed", range(1, 6))
@formats
def test_more_seeds(emulated, seed, fmt):
    """Other random data and other shuffled orders."""
    emulated.configure("shuffled", 100 + seed)
    try:
        ks = kc.module_kernels(emulated)
        for training in (True, False):
            kc.check_ccba(*CCBA_SHAPES[2], torch.float32, fmt, training, True, device="cpu", kernels=ks, seed=seed)
            n, c, k, hw, pool, odd_h = UPDATE_CASES[4]
            kc.check_update(n, c, k, hw, pool, torch.bfloat16, fmt, training, odd_h=odd_h, device="cpu", kernels=ks,
                            seed=seed)
    finally:
        emulated.configure("inorder", 0)


def test_probe_cases_pass(emulated):
    """The probe the mutation tests run on every mutant passes on the real kernels."""
    failures, cases = cuda_emulation.probe(emulated, stop_at_first=False)
    assert cases > 0 and not failures, failures


# ------------------------------------------------------------------------------ empty batch (defect 5)
def assert_same(actual, expected, dtype, what):
    """Shapes equal, NaN exactly where the reference has NaN, the rest within the dtype's tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.sum()} places, the reference at {nan_e.sum()}"
    tol = TOLERANCES.get(dtype, dict(rtol=3e-2, atol=3e-2))
    torch.testing.assert_close(a[~nan_a], e[~nan_e], **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom")
@dtypes
@formats
@trainings
def test_ccba_empty_batch(emulated, dtype, fmt, training):
    """N = 0 used to divide by zero while planning the statistics reduction (SIGFPE). Now: empty
    activations, NaN batch statistics in training (torch's mean/var of nothing), zero parameter grads."""
    inp = kc.ccba_inputs(0, 40, 5, 37, (9, 7), dtype, fmt, device="cpu")
    gout = torch.zeros(0, 37, 9, 7, dtype=dtype).contiguous(memory_format=kc.fmt_of(fmt))
    fwd, bwd = kc.ccba_kernels(inp, training, True, gout, "cpu", kc.module_kernels(emulated))
    ref_fwd, ref_bwd = kc.ccba_reference(inp, training, True, gout, dtype)
    for got, ref, name in zip(fwd + bwd, ref_fwd + ref_bwd, kc.FWD_NAMES + kc.CCBA_GRADS):
        assert_same(got, ref, dtype, name)
    assert torch.isnan(fwd[2]).all() == training
    assert torch.count_nonzero(bwd[2]) == 0 and torch.count_nonzero(bwd[3]) == 0


@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom")
@dtypes
@formats
@trainings
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "nopool"])
def test_update_empty_batch(emulated, dtype, fmt, training, pool):
    inp = kc.update_inputs(0, 24, 20, (5, 6), pool, dtype, fmt, odd_h=True, device="cpu")
    gout = torch.zeros(0, 20, 5, 6, dtype=dtype).contiguous(memory_format=kc.fmt_of(fmt))
    fwd, bwd = kc.update_kernels(inp, pool, training, gout, "cpu", kc.module_kernels(emulated))
    ref_fwd, ref_bwd = kc.update_reference(inp, pool, training, gout, dtype)
    for got, ref, name in zip(fwd + bwd, ref_fwd + ref_bwd, kc.FWD_NAMES + kc.UPDATE_GRADS):
        assert_same(got, ref, dtype, name)


# ------------------------------------------------------------------------ NaN through ReLU (defect 1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@formats
@trainings
def test_relu_propagates_nan(emulated, dtype, fmt, training):
    """A NaN input gives NaN exactly where torch.relu gives NaN, and the backward passes the gradient
    through NaN outputs as torch.relu's does (a `bn > 0 ? g : 0` mask dropped it: dh differed)."""
    inp = kc.ccba_inputs(2, 12, 4, 9, (3, 5), dtype, fmt, device="cpu")
    inp["x"][1, :, 2, 3] = float("nan")
    gout = kc.randn(torch.Generator().manual_seed(3), 2, 9, 3, 5, dtype=dtype, device="cpu", fmt=kc.fmt_of(fmt))
    fwd, bwd = kc.ccba_kernels(inp, training, True, gout, "cpu", kc.module_kernels(emulated))
    ref_fwd, ref_bwd = kc.ccba_reference(inp, training, True, gout, dtype)
    assert torch.isnan(fwd[0]).any()
    for got, ref, name in zip(fwd + bwd, ref_fwd + ref_bwd, kc.FWD_NAMES + kc.CCBA_GRADS):
        assert_same(got, ref, dtype, name)


# ----------------------------------------------------------------- z rounds once in half types (defect 8)
def integer_case(dtype, fmt):
    """Integer data: every product and partial sum is exact in float32, so a kernel that rounds z once
    gives exactly the float64 result rounded to `dtype`, whatever its summation order."""
    g = torch.Generator().manual_seed(11)
    n, c, k, co, hw = 2, 40, 6, 9, (5, 6)
    ri = lambda lo, hi, *s: torch.randint(lo, hi + 1, s, generator=g).to(dtype)  # noqa: E731
    f = kc.fmt_of(fmt)
    sd = kc.stat_dtype(dtype)
    # |z| up to 46 * 32 * 16 = 23552 (finite in float16), mostly above 2048 where float16 stops
    # representing every integer (bfloat16: above 256).
    return dict(x=ri(0, 32, n, c, *hw).contiguous(memory_format=f), h=ri(0, 32, n, k, *hw).contiguous(memory_format=f),
                weight=ri(-4, 16, co, c + k), gamma=torch.ones(co, dtype=sd), beta=torch.zeros(co, dtype=sd),
                mean=torch.zeros(co, dtype=sd), var=torch.full((co,), 1e4, dtype=sd))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@formats
@trainings
def test_ccba_z_rounds_once(emulated, dtype, fmt, training):
    inp = integer_case(dtype, fmt)
    x, h, w = inp["x"], inp["h"], inp["weight"]
    exact = F.conv2d(torch.cat((x, h), 1).double(), w.double()[:, :, None, None])
    once = exact.to(dtype)
    # The torch backend (one conv over cat(x, h)) rounds once...
    assert torch.equal(F.conv2d(torch.cat((x, h), 1), w[:, :, None, None]), once)
    # ...and rounding the x-part first (the old mm_out + addmm_) differs on these inputs.
    c = x.shape[1]
    xpart = F.conv2d(x.double(), w.double()[:, :c, None, None]).to(dtype)
    twice = (xpart.double() + F.conv2d(h.double(), w.double()[:, c:, None, None])).to(dtype)
    assert not torch.equal(twice, once)
    gout = torch.zeros_like(once).contiguous(memory_format=kc.fmt_of(fmt))
    (out, z, _, _), _ = kc.ccba_kernels(inp, training, False, gout, "cpu", kc.module_kernels(emulated))
    assert torch.equal(z, once), f"z differs from the single rounding at {(z != once).sum()} of {z.numel()} places"


@pytest.mark.parametrize("fmt", kc.FORMATS)
@trainings
def test_ccba_fp16_intermediate_does_not_overflow(emulated, fmt, training):
    """x-part 65536 (inf in float16) plus h-part -20000: z = 45536 is finite; rounding the x-part to
    float16 first made it inf."""
    f = kc.fmt_of(fmt)
    half = torch.float16
    x = torch.tensor([256.0, 1.0], dtype=half).view(1, 2, 1, 1).repeat(2, 1, 1, 1).contiguous(memory_format=f)
    h = torch.full((2, 1, 1, 1), -1.0, dtype=half).contiguous(memory_format=f)
    w = torch.tensor([[256.0, 0.0, 20000.0], [1.0, 1.0, 1.0]], dtype=half)
    inp = dict(x=x, h=h, weight=w, gamma=torch.ones(2), beta=torch.zeros(2), mean=torch.zeros(2),
               var=torch.ones(2))
    gout = torch.zeros(2, 2, 1, 1, dtype=half).contiguous(memory_format=f)
    (out, z, mean, _), _ = kc.ccba_kernels(inp, training, False, gout, "cpu", kc.module_kernels(emulated))
    assert z[:, 0].flatten().tolist() == [45536.0, 45536.0]
    assert torch.isfinite(z).all() and torch.isfinite(out).all() and torch.isfinite(mean).all()
