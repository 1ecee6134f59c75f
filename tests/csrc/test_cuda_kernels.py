"""The CUDA kernels (csrc/cuda/) against a plain-PyTorch composition and against the CPU kernels.

The four ops torch.ops.rla_ext.*_kernel_{fwd,bwd} are called directly on CUDA tensors, at RLA-ResNet
shapes, in every dtype and both memory formats: forward values, the saved pre-BN tensor (z / s), the
batch mean and BIASED variance, and every gradient. Tolerances come from tests/rla_testing.py (half
precision: at most twice the error of eager PyTorch in the same dtype against a float64 reference).
"""
from __future__ import annotations

import pytest
import torch

import rla_ext
from kernel_cases import (ALL_DTYPES, CCBA_GRADS, FORMATS, FWD_NAMES, UPDATE_GRADS, ccba_inputs, ccba_kernels,
                          ccba_reference, check_boundary, check_ccba, check_update, compare, fmt_of, randn,
                          update_inputs, update_kernels, update_reference)
from rla_ext import _extension

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
    pytest.mark.skipif(torch.cuda.is_available() and not _extension.cuda_compiled(),
                       reason="rla_ext._C was built without the CUDA kernels (RLA_EXT_NO_CUDA or no toolkit)"),
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """The composition uses cuDNN convs; TF32 there would make the fp32 reference the less accurate side."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# (N, C, k, C_out, H=W): RLA-ResNet-50 block entries (C = block input, C_out = bottleneck width).
CCBA_SHAPES = [(8, 256, 32, 64, 56), (16, 512, 32, 128, 28), (32, 256, 32, 256, 14), (32, 512, 32, 512, 7)]


@pytest.mark.parametrize("shape", CCBA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ccba_matches_composition(shape, dtype, fmt, training):
    n, c, k, co, hw = shape
    check_ccba(n, c, k, co, hw, dtype, fmt, training, relu=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_ccba_no_activation_and_odd_sizes(dtype, fmt):
    # C_out not a multiple of 32 (partial channel blocks), odd spatial size, no ReLU.
    for training in (True, False):
        check_ccba(3, 40, 5, 37, 9, dtype, fmt, training, relu=False, seed=3)


# ------------------------------------------------------------------------------------------ op B
# (N, C, k, H=W of y, pool): the RLA updates of RLA-ResNet-50 (pool where the stage downsamples).
UPDATE_SHAPES = [(8, 256, 32, 56, False), (16, 512, 32, 28, True), (32, 512, 32, 14, True),
                 (32, 512, 32, 7, True), (16, 256, 32, 7, False)]


@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_update_matches_composition(shape, dtype, fmt, training):
    n, c, k, hw, pool = shape
    check_update(n, c, k, hw, pool, dtype, fmt, training)


# k not a multiple of the 8 output channels a thread owns, k at the direct kernel's limit (64), k above
# it (cuDNN fallback), and odd h sizes for floor-mode pooling.
@pytest.mark.parametrize("k,pool,odd_h", [(20, True, True), (64, True, False), (96, False, False), (1, True, True)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_update_k_and_pool_edges(k, pool, odd_h, dtype, fmt):
    for training in (True, False):
        check_update(4, 48, k, 11, pool, dtype, fmt, training, odd_h=odd_h, seed=5)


# ------------------------------------------------------------------------------------------ op C
# (N, C, k, C_entry, H=W of y, pool): RLA-ResNet-50 block boundaries (y = block output, C_entry = the
# next bottleneck's width), then k and pool edges as op B's (k = 96: cuDNN 3x3 and the h-part GEMM).
BOUNDARY_SHAPES = [(8, 256, 32, 64, 56, False), (16, 512, 32, 128, 28, True), (32, 1024, 32, 256, 14, True),
                   (4, 48, 20, 37, 11, True), (4, 48, 96, 40, 11, False)]


@pytest.mark.parametrize("shape", BOUNDARY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_boundary_matches_composition(shape, dtype, fmt, training):
    n, c, k, ce, hw, pool = shape
    check_boundary(n, c, k, ce, hw, pool, dtype, fmt, training, relu=training, odd_h=k == 20)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_boundary(fmt, training):
    g = torch.Generator().manual_seed(0)
    f = fmt_of(fmt)
    k, c, ce, hw = 3, 5, 4, 4
    h = randn(g, 2, k, 2 * hw + 1, 2 * hw + 1, dtype=torch.float64, fmt=f).requires_grad_()
    y = randn(g, 2, c, hw, hw, dtype=torch.float64, fmt=f).requires_grad_()
    wo = randn(g, k, c, dtype=torch.float64, scale=0.5).requires_grad_()
    wr = randn(g, k, k, 3, 3, dtype=torch.float64, scale=0.3).requires_grad_()
    we = randn(g, ce, c + k, dtype=torch.float64, scale=0.5).requires_grad_()
    stats = [(None, None) if training else (randn(g, m, dtype=torch.float64, scale=0.1),
                                            0.5 + torch.rand(m, generator=g, dtype=torch.float64).cuda())
             for m in (k, ce)]

    def fn(h, y, wo, wr, we):
        return rla_ext.ops.rla_update_and_entry(h, y, wo, None, None, *stats[0], wr, we, None, None, *stats[1],
                                                pool=True, training=training, backend="cuda")

    assert torch.autograd.gradcheck(fn, (h, y, wo, wr, we), nondet_tol=1e-10)


# ------------------------------------------------------------------------------------ CUDA vs CPU
needs_cpu_kernels = pytest.mark.skipif(not _extension.cpp_compiled(), reason="rla_ext._C has no CPU kernels")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_cpu_kernels(dtype, fmt, training):
    # Below float64 both sides are held to the float64 reference, not to each other: the weight
    # gradients sum over N*H*W pixels in a different order on each device (float32 on an H200:
    # 12 of 18432 dweight elements 1.5e-4 apart, beyond a fixed tolerance, both equally right).
    n, c, k, co, hw = 8, 256, 32, 64, 28
    inp = ccba_inputs(n, c, k, co, hw, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), n, co, hw, hw, dtype=dtype, fmt=fmt_of(fmt))
    cu = ccba_kernels(inp, training, True, gout)
    cpu = ccba_kernels(inp, training, True, gout, device="cpu")
    r64 = ccba_reference(inp, training, True, gout, torch.float64) if dtype != torch.float64 else (None, None)
    compare([t.cpu() for t in cu[0]], cpu[0], [t.cpu() for t in r64[0]] if r64[0] else None, dtype, FWD_NAMES)
    compare([t.cpu() for t in cu[1]], cpu[1], [t.cpu() for t in r64[1]] if r64[1] else None, dtype, CCBA_GRADS)

    inp = update_inputs(8, 256, 32, 14, True, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), 8, 32, 14, 14, dtype=dtype, fmt=fmt_of(fmt))
    cu = update_kernels(inp, True, training, gout)
    cpu = update_kernels(inp, True, training, gout, device="cpu")
    r64 = update_reference(inp, True, training, gout, torch.float64) if dtype != torch.float64 else (None, None)
    compare([t.cpu() for t in cu[0]], cpu[0], [t.cpu() for t in r64[0]] if r64[0] else None, dtype, FWD_NAMES)
    compare([t.cpu() for t in cu[1]], cpu[1], [t.cpu() for t in r64[1]] if r64[1] else None, dtype, UPDATE_GRADS)


# -------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("fmt", FORMATS)
def test_bitwise_deterministic(fmt):
    """No float atomics: the same inputs give bit-identical statistics, outputs and gradients."""
    dtype = torch.bfloat16
    inp = ccba_inputs(16, 256, 32, 128, 28, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), 16, 128, 28, 28, dtype=dtype, fmt=fmt_of(fmt))
    a, b = ccba_kernels(inp, True, True, gout), ccba_kernels(inp, True, True, gout)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    inp = update_inputs(16, 256, 32, 28, True, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), 16, 32, 28, 28, dtype=dtype, fmt=fmt_of(fmt))
    a, b = update_kernels(inp, True, True, gout), update_kernels(inp, True, True, gout)
    for x, y in zip(a[0] + a[1][:3] + a[1][4:], b[0] + b[1][:3] + b[1][4:]):  # drec_weight is cuDNN's
        assert torch.equal(x, y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_host_synchronisation(fmt):
    """Forward and backward only enqueue work: a synchronising call (.item(), a blocking copy) raises here."""
    inp = ccba_inputs(4, 64, 32, 64, 14, torch.float16, fmt)
    gout = randn(torch.Generator().manual_seed(7), 4, 64, 14, 14, dtype=torch.float16, fmt=fmt_of(fmt))
    uinp = update_inputs(4, 64, 32, 7, True, torch.float16, fmt)
    ugout = randn(torch.Generator().manual_seed(7), 4, 32, 7, 7, dtype=torch.float16, fmt=fmt_of(fmt))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for training in (True, False):
            ccba_kernels(inp, training, True, gout)
            update_kernels(uinp, True, training, ugout)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_ccba(fmt, training):
    g = torch.Generator().manual_seed(0)
    f = fmt_of(fmt)
    x = randn(g, 2, 3, 3, 4, dtype=torch.float64, fmt=f).requires_grad_()
    h = randn(g, 2, 2, 3, 4, dtype=torch.float64, fmt=f).requires_grad_()
    w = randn(g, 4, 5, dtype=torch.float64).requires_grad_()
    gamma = (1 + randn(g, 4, dtype=torch.float64, scale=0.3)).requires_grad_()
    beta = randn(g, 4, dtype=torch.float64, scale=0.2).requires_grad_()
    rm = None if training else randn(g, 4, dtype=torch.float64, scale=0.1)
    rv = None if training else 0.5 + torch.rand(4, generator=g, dtype=torch.float64).cuda()

    def fn(x, h, w, gamma, beta):
        return rla_ext.ops.concat_conv_bn_act(x, h, w, gamma, beta, rm, rv, training=training, backend="cuda")

    assert torch.autograd.gradcheck(fn, (x, h, w, gamma, beta))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "nopool"])
def test_gradcheck_update(fmt, training, pool):
    g = torch.Generator().manual_seed(0)
    f = fmt_of(fmt)
    k, hw = 3, 4
    hh = 2 * hw + 1 if pool else hw
    h = randn(g, 2, k, hh, hh, dtype=torch.float64, fmt=f).requires_grad_()
    y = randn(g, 2, 5, hw, hw, dtype=torch.float64, fmt=f).requires_grad_()
    wo = randn(g, k, 5, dtype=torch.float64, scale=0.5).requires_grad_()
    gamma = (1 + randn(g, k, dtype=torch.float64, scale=0.3)).requires_grad_()
    beta = randn(g, k, dtype=torch.float64, scale=0.2).requires_grad_()
    wr = randn(g, k, k, 3, 3, dtype=torch.float64, scale=0.3).requires_grad_()
    rm = None if training else randn(g, k, dtype=torch.float64, scale=0.1)
    rv = None if training else 0.5 + torch.rand(k, generator=g, dtype=torch.float64).cuda()

    def fn(h, y, wo, gamma, beta, wr):
        return rla_ext.ops.rla_update(h, y, wo, gamma, beta, rm, rv, wr, pool=pool, training=training, backend="cuda")

    # nondet_tol: drec_weight comes from cuDNN's weight-gradient, which may reduce in varying order.
    assert torch.autograd.gradcheck(fn, (h, y, wo, gamma, beta, wr), nondet_tol=1e-10)


# ------------------------------------------------------------------------ > 2^31 elements (slow)
def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
def test_int64_indexing_beyond_2_31_elements():
    """Activations with more than 2^31 elements. The batch repeats a small base batch R times, so the
    batch statistics equal the base batch's (same values, R times each) and the LAST images, whose
    elements lie beyond index 2^31, must match the composition on the base batch."""
    dtype = torch.bfloat16
    base, k, hw, c = 4, 32, 56, 8
    per_image = k * hw * hw
    reps = -(-(2 ** 31 + per_image) // (per_image * base))
    n = base * reps
    assert n * per_image > 2 ** 31
    if _free_gpu_bytes() < 12 * n * per_image * 2:  # ~12 bf16 k-channel tensors live at the peak
        pytest.skip("not enough free GPU memory for the >2^31-element test")
    for fmt in FORMATS:
        f = fmt_of(fmt)
        inp = update_inputs(base, c, k, hw, False, dtype, fmt)
        gout = randn(torch.Generator().manual_seed(7), base, k, hw, hw, dtype=dtype, fmt=f)
        big = {key: (v.repeat(reps, 1, 1, 1).contiguous(memory_format=f) if v.dim() == 4 and key != "rec_weight"
                     else v) for key, v in inp.items()}
        gbig = gout.repeat(reps, 1, 1, 1).contiguous(memory_format=f)
        (out, s, m, v), bwd = update_kernels(big, False, True, gbig)
        del big, gbig
        ref_fwd, ref_bwd = update_reference(inp, False, True, gout, torch.float32)
        tail = slice(n - base, n)
        tol = dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(out[tail].float(), ref_fwd[0], **tol)
        torch.testing.assert_close(s[tail].float(), ref_fwd[1], **tol)
        torch.testing.assert_close(m, ref_fwd[2], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(v, ref_fwd[3], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(bwd[0][tail].float(), ref_bwd[0], **tol)  # dh
        # dgamma and dbeta sum over every pixel, so they check the whole batch, not only its tail. Their
        # error against the float32 composition is bf16's (the saved pre-BN tensor is bf16): on an H200
        # 0.31 at a largest value of 97, the same as the CPU kernels' on the base batch alone; so they
        # are held to that scale, and to the same kernels on the base batch by a tighter one.
        _, base_bwd = update_kernels(inp, False, True, gout)
        for i, name in ((4, "dgamma"), (5, "dbeta")):
            scale = ref_bwd[i].abs().max().item()
            label = lambda m, n=name: f"{n}: {m}"  # noqa: E731
            torch.testing.assert_close(bwd[i] / reps, ref_bwd[i], rtol=0, atol=1e-2 * scale, msg=label)
            torch.testing.assert_close(bwd[i] / reps, base_bwd[i], rtol=0, atol=2e-3 * scale, msg=label)
        del out, s, bwd
        torch.cuda.empty_cache()

