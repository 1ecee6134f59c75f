"""Under ``torch.use_deterministic_algorithms(True)`` every fused CPU path is bitwise repeatable: the
same call twice gives identical outputs, running statistics and gradients.

Why they can be: the cpp kernels reduce BatchNorm statistics over fixed-size row chunks combined
in chunk order (or one channel per task) and add GEMM batches in order; the Triton kernels combine
per-block BatchNorm partials in a fixed order (docs/ARCHITECTURE.md). No fused CPU path has a
nondeterministic variant, so none raises under the flag (the CUDA paths are checked on a GPU).
Repeats also run with 2 threads, where a racing reduction would show up.
"""
from __future__ import annotations

import pytest
import torch

from rla_ext.ops import concat_conv_bn_act, rla_update
from rla_testing import clone_inputs, dtype_supported, fused_backends, make_ccba_inputs, make_update_inputs, run_op


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _cases() -> list:
    params = []
    for b in fused_backends("cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            if dtype_supported(b, "cpu", dtype):
                for fmt in ("contiguous", "channels_last"):
                    params.append(pytest.param(b, dtype, fmt, id=f"{b}-{str(dtype)[6:]}-{fmt}"))
    return params or [pytest.param("none", None, None, marks=pytest.mark.skip(reason="no fused CPU backend"))]


def _assert_identical(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]), "output differs between two identical calls"
    for part in (1, 2):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            # equal() is value equality; NaN would differ too, which is intended (none are expected).
            assert torch.equal(a[part][name], b[part][name]), f"{name} differs between two identical calls"


def _repeat(op, inputs: dict, threads: int, **kw) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = run_op(op, clone_inputs(inputs), **kw)
        second = run_op(op, clone_inputs(inputs), **kw)
    finally:
        torch.set_num_threads(before)
    _assert_identical(first, second)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,dtype,fmt", _cases())
def test_concat_conv_bn_act_bitwise_repeatable(deterministic, backend, dtype, fmt, training, threads):
    small = backend == "triton"
    inputs = make_ccba_inputs(2, 5 if small else 24, 3, 4 if small else 20, (3, 5) if small else (9, 11), dtype,
                              "cpu", fmt, seed=2)
    _repeat(concat_conv_bn_act, inputs, threads, backend=backend, training=training)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,dtype,fmt", _cases())
def test_rla_update_bitwise_repeatable(deterministic, backend, dtype, fmt, training, threads):
    small = backend == "triton"
    inputs = make_update_inputs(2, 5 if small else 24, 3 if small else 8, (3, 4) if small else (9, 11), True,
                                dtype, "cpu", fmt, seed=3)
    _repeat(rla_update, inputs, threads, backend=backend, pool=True, training=training)
