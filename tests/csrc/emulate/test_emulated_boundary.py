"""The CUDA kernels of the block boundary (csrc/cuda/rla_update_and_entry.cu) under the CPU emulator,
against the plain-PyTorch composition of op B then op A on (y, h_next) (tests/kernel_cases.py): every
dtype, both memory formats, training and eval, forward and backward, in-order, shuffled and threaded
schedules. Quick tier by default; RLA_EXT_EMULATE_FULL=1 adds shapes, seeds and schedules.
"""
from __future__ import annotations

import pytest
import torch

import cuda_emulation
import kernel_cases as kc

FULL = cuda_emulation.full_tier()

# (N, C, k, C_entry, (H, W) of y, pool, odd h, relu): odd channel counts; N*H*W no multiple of a block size.
CASES = [
    (3, 24, 20, 13, (5, 6), True, True, True),       # k not a multiple of 8, floor-mode pooling of an odd h
    (2, 40, 64, 37, (9, 7), False, False, False),    # k at the direct 3x3 / per-element h-part limit
    (5, 48, 9, 40, (13, 17), False, False, True),    # several reduction chunks and conv tiles per image
    (2, 24, 96, 9, (4, 5), False, False, True),      # k > 64: ATen's 3x3 conv, the entry's h-part by GEMM
    (2, 16, 5, 33, (1, 1), True, True, False),       # 1x1 output from a 3x3 h
]
FULL_CASES = [
    (8, 64, 32, 64, (14, 14), True, False, True),    # RLA-ResNet-like
    (3, 20, 8, 1, (11, 3), True, True, True),        # one entry channel, thin images
    (2, 9, 33, 130, (2, 9), False, False, False),    # k just above a multiple of 8, C_entry > 128
]
SCHEDULES = ["shuffled"] + (["inorder", ("shuffled", 1)] if FULL else [])
cases = CASES + (FULL_CASES if FULL else [])
formats = pytest.mark.parametrize("fmt", kc.FORMATS)
trainings = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def ids(case) -> str:
    return "-".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in case)


def run(emulated, case, dtype, fmt, training, seed=0):
    n, c, k, ce, hw, pool, odd_h, relu = case
    return kc.check_boundary(n, c, k, ce, hw, pool, dtype, fmt, training, relu=relu, odd_h=odd_h, device="cpu",
                             kernels=kc.module_kernels(emulated), seed=seed)


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True, ids=lambda s: s if isinstance(s, str) else
                         f"{s[0]}{s[1]}")
@pytest.mark.parametrize("case", cases, ids=ids)
@pytest.mark.parametrize("dtype", kc.ALL_DTYPES, ids=str)
@formats
@trainings
def test_boundary(emulated, schedule, case, dtype, fmt, training):
    run(emulated, case, dtype, fmt, training)


@pytest.mark.parametrize("schedule", ["inorder"], indirect=True)
@pytest.mark.parametrize("dtype", kc.ALL_DTYPES, ids=str)
@formats
@trainings
def test_boundary_inorder_schedule(emulated, schedule, dtype, fmt, training):
    run(emulated, CASES[0], dtype, fmt, training)


# Real threads are slow on a small machine: one case per format on the quick tier.
@pytest.mark.parametrize("schedule", ["threaded"], indirect=True)
@formats
def test_boundary_threaded_schedule(emulated, schedule, fmt):
    run(emulated, CASES[0], torch.bfloat16, fmt, True)
    if FULL:
        for case in cases[1:]:
            run(emulated, case, torch.float32, fmt, True)


@pytest.mark.skipif(not FULL, reason="full tier only (RLA_EXT_EMULATE_FULL=1, `make emulate-cuda`)")
@pytest.mark.parametrize("seed", range(1, 4))
@formats
def test_boundary_more_seeds(emulated, seed, fmt):
    emulated.configure("shuffled", 200 + seed)
    try:
        for training in (True, False):
            run(emulated, CASES[2], torch.float32, fmt, training, seed=seed)
            run(emulated, CASES[0], torch.float16, fmt, training, seed=seed)
    finally:
        emulated.configure("inorder", 0)


def test_boundary_equals_the_two_cuda_kernels_composed(emulated):
    """The same values as the two single CUDA kernels composed (op B, then op A on (y, h_next)), which
    is what the fused kernel stands for; float64 so only summation order can differ."""
    case = (3, 24, 20, 13, (5, 6), True, True)
    n, c, k, ce, hw, pool, odd_h = case
    inp = kc.boundary_inputs(n, c, k, ce, hw, pool, torch.float64, "channels_last", odd_h=odd_h, device="cpu")
    ks = kc.module_kernels(emulated)
    cl = torch.channels_last
    fwd, _ = kc.boundary_kernels(inp, pool, True, True, torch.zeros(n, k, *hw, dtype=torch.float64).contiguous(
        memory_format=cl), torch.zeros(n, ce, *hw, dtype=torch.float64).contiguous(memory_format=cl), "cpu", ks)
    h_next, s, m, v = ks.update_fwd(inp["h"], inp["y"], inp["out_weight"], inp["gamma"], inp["beta"], None, None,
                                    inp["rec_weight"], pool, kc.EPS)
    out, z, em, ev = ks.ccba_fwd(inp["y"], h_next, inp["entry_weight"], inp["entry_gamma"], inp["entry_beta"],
                                 None, None, kc.EPS, True)
    for got, ref in zip(fwd, (h_next, s, m, v, out, z, em, ev)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-11)
