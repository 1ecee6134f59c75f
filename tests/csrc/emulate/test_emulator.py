"""The emulator itself (csrc/cuda/emulate/): each check it makes fires on a deliberately broken kernel
(csrc/cuda/emulate/selftest.cpp), schedules really reorder threads, outputs start poisoned, and the
launches the real kernels make are within the GPU's limits."""
from __future__ import annotations

import re

import pytest
import torch

import kernel_cases as kc

ALL_SCHEDULES = ["inorder", "shuffled", "threaded"]

# selftest case -> what the error must say
REPORTED = {
    "exit_before_barrier": "while others returned",
    "divergent_barrier": "while others waited at the __syncthreads() of line",
    "shared_overflow": "wrote outside the shared array 'sh' (252 bytes): 0 byte(s) before it, 4 byte(s) past",
    "dynamic_overflow": "wrote outside the dynamic shared memory (252 bytes)",
    "big_static_smem": "static shared memory of 49600 bytes exceeds the 48 KiB limit",
    "too_many_threads": "has 1025 threads (1..1024 allowed",
    "grid_y_too_big": "grid (1, 65536, 1) exceeds (2^31-1, 65535, 65535)",
    "empty_grid": "with an empty grid (0, 1, 1)",
    "dynamic_smem_over_48k": "more than 48 KiB needs an opt-in",
}


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, indirect=True)
@pytest.mark.parametrize("case", sorted(REPORTED))
def test_emulator_reports(emulated, schedule, case):
    with pytest.raises(RuntimeError, match=re.escape(REPORTED[case])):
        emulated.selftest(case)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, indirect=True)
def test_correct_block_reduction(emulated, schedule):
    out = emulated.selftest("block_sum").view(3, 64)
    expected = torch.arange(192, dtype=torch.float32).view(3, 64).sum(1, keepdim=True).expand(3, 64)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("schedule", ["inorder", "shuffled", ("shuffled", 1)], indirect=True,
                         ids=lambda s: s if isinstance(s, str) else f"{s[0]}{s[1]}")
def test_missing_barrier_shows(emulated, schedule):
    """Without the barrier after the stores, threads read neighbours' poisoned (NaN) shared memory."""
    out = emulated.selftest("missing_barrier").view(3, 64)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, indirect=True)
def test_unwritten_output_is_nan(emulated, schedule):
    out = emulated.selftest("unwritten_output")
    assert torch.equal(out[:32], torch.ones(32)) and torch.isnan(out[32:]).all()


def test_schedules_reorder_threads(emulated):
    orders = {}
    for sched in (("inorder", 0), ("shuffled", 0), ("shuffled", 1)):
        emulated.configure(*sched)
        orders[sched] = emulated.selftest("arrival_order").tolist()
    emulated.configure("inorder", 0)
    assert orders[("inorder", 0)] == list(range(64))
    for sched in (("shuffled", 0), ("shuffled", 1)):
        assert sorted(orders[sched]) == list(range(64)) and orders[sched] != list(range(64))
    assert orders[("shuffled", 0)] != orders[("shuffled", 1)]


def test_configure_validates(emulated):
    with pytest.raises(ValueError, match="schedule"):
        emulated.configure("sideways")
    with pytest.raises(ValueError, match="multiprocessor_count"):
        emulated.configure("inorder", 0, 0)
    assert emulated.settings() == {"schedule": "inorder", "seed": 0, "multiprocessor_count": 2}


def test_sanitizer_cases_need_a_sanitized_build(emulated):
    if emulated.sanitized:
        pytest.skip("this build is sanitized")
    with pytest.raises(ValueError, match="only in a sanitized build"):
        emulated.selftest("global_overflow")


@pytest.mark.parametrize("fmt", kc.FORMATS)
def test_real_launches_are_within_limits(emulated, fmt):
    """What the kernels launch: every kernel of both ops runs, barriers happen, and the configuration
    (threads, static + dynamic shared memory) fits an sm_90 GPU."""
    emulated.clear_launch_log()
    ks = kc.module_kernels(emulated)
    for training in (True, False):
        kc.check_ccba(5, 48, 8, 40, (13, 17), torch.float32, fmt, training, True, device="cpu", kernels=ks)
        kc.check_update(3, 24, 20, (5, 6), True, torch.float64, fmt, training, odd_h=True, device="cpu", kernels=ks)
    log = emulated.launch_log()
    kernels = {r["kernel"].split("<")[0] for r in log}
    assert kernels == {"channel_partials_kernel", "channel_finalize_kernel", "bn_params_kernel", "bn_act_kernel",
                       "bn_backward_elementwise_kernel", "pointwise_kernel", "conv3x3_direct_kernel"}
    for r in log:
        threads = r["block"][0] * r["block"][1] * r["block"][2]
        assert 1 <= threads <= 1024
        assert r["static_smem"] <= 48 * 1024 and r["static_smem"] + r["dynamic_smem"] <= 232448
        assert r["grid"][1] <= 65535 and r["grid"][2] <= 65535
    # The reductions and the 3x3 conv synchronise; several chunks per channel block at this size.
    assert all(r["barriers"] > 0 for r in log if r["kernel"].startswith(("channel_", "conv3x3")))
    assert any(r["grid"][1] > 1 for r in log if r["kernel"].startswith("channel_partials"))
    assert any(r["dynamic_smem"] > 0 for r in log if r["kernel"].startswith("conv3x3"))
