"""The CUDA kernels (csrc/cuda/) against a plain-PyTorch composition and against the CPU kernels.

The four ops torch.ops.rla_ext.*_kernel_{fwd,bwd} are called directly on CUDA tensors, at RLA-ResNet
shapes, in every dtype and both memory formats: forward values, the saved pre-BN tensor (z / s), the
batch mean and BIASED variance, and every gradient. Tolerances come from tests/rla_testing.py (half
precision: at most twice the error of eager PyTorch in the same dtype against a float64 reference).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rla_ext
from rla_ext import _extension
from rla_testing import HALF, assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
    pytest.mark.skipif(torch.cuda.is_available() and not _extension.cuda_compiled(),
                       reason="rla_ext._C was built without the CUDA kernels (RLA_EXT_NO_CUDA or no toolkit)"),
]

OPS = torch.ops.rla_ext
EPS = 1e-5
FORMATS = ("contiguous", "channels_last")
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """The composition uses cuDNN convs; TF32 there would make the fp32 reference the less accurate side."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fmt_of(name):
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def randn(gen, *shape, dtype, device="cuda", fmt=torch.contiguous_format, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return t.to(dtype).to(device).contiguous(memory_format=fmt)


def channel(v):
    return v.view(1, -1, 1, 1)


def bn_composition(pre, gamma, beta, mean, var, act):
    """BatchNorm (+activation) as plain ops in the stat dtype; batch stats when mean is None."""
    p = pre.to(gamma.dtype)
    if mean is None:
        mean = p.mean((0, 2, 3))
        var = p.var((0, 2, 3), unbiased=False)
    bn = (p - channel(mean)) * channel(torch.rsqrt(var + EPS)) * channel(gamma) + channel(beta)
    return act(bn).to(pre.dtype), mean, var


# ------------------------------------------------------------------------------------------ op A
def ccba_composition(x, h, w, gamma, beta, mean, var, relu):
    z = F.conv2d(torch.cat((x, h), 1), w[:, :, None, None])
    out, m, v = bn_composition(z, gamma, beta, mean, var, torch.relu if relu else (lambda t: t))
    return out, z, m, v


def ccba_inputs(n, c, k, co, hw, dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = stat_dtype(dtype)
    f = fmt_of(fmt)
    return dict(
        x=randn(g, n, c, hw, hw, dtype=dtype, fmt=f), h=randn(g, n, k, hw, hw, dtype=dtype, fmt=f),
        weight=randn(g, co, c + k, dtype=dtype, scale=(c + k) ** -0.5),
        gamma=1 + randn(g, co, dtype=sd, scale=0.3), beta=randn(g, co, dtype=sd, scale=0.2),
        mean=randn(g, co, dtype=sd, scale=0.1), var=0.5 + torch.rand(co, generator=g, dtype=torch.float64).to(sd).cuda())


def ccba_reference(inp, training, relu, grad_out, dtype):
    """(out, z, mean, var) and (dx, dh, dweight, dgamma, dbeta) of the composition in `dtype`."""
    leaves = {k: inp[k].detach().to(dtype if k in ("x", "h", "weight") else stat_dtype(dtype)).requires_grad_(
        k in ("x", "h", "weight", "gamma", "beta")) for k in ("x", "h", "weight", "gamma", "beta")}
    mean = None if training else inp["mean"].to(stat_dtype(dtype))
    var = None if training else inp["var"].to(stat_dtype(dtype))
    out, z, m, v = ccba_composition(leaves["x"], leaves["h"], leaves["weight"], leaves["gamma"], leaves["beta"],
                                    mean, var, relu)
    grads = torch.autograd.grad(out, [leaves[k] for k in ("x", "h", "weight", "gamma", "beta")],
                                grad_out.to(dtype))
    return (out.detach(), z.detach(), m.detach(), v.detach()), grads


def ccba_kernels(inp, training, relu, grad_out, device="cuda"):
    t = {k: v.to(device) for k, v in inp.items()}
    mean, var = (None, None) if training else (t["mean"], t["var"])
    fwd = OPS.concat_conv_bn_act_kernel_fwd(t["x"], t["h"], t["weight"], t["gamma"], t["beta"], mean, var, EPS, relu)
    out, z, m, v = fwd
    bwd = OPS.concat_conv_bn_act_kernel_bwd(grad_out.to(device), t["x"], t["h"], t["weight"], t["gamma"],
                                            t["beta"], z, m, v, EPS, relu, training)
    return fwd, bwd


FWD_NAMES = ("out", "pre-BN", "mean", "var")
CCBA_GRADS = ("dx", "dh", "dweight", "dgamma", "dbeta")

# (N, C, k, C_out, H=W): RLA-ResNet-50 block entries (C = block input, C_out = bottleneck width).
CCBA_SHAPES = [(8, 256, 32, 64, 56), (16, 512, 32, 128, 28), (32, 256, 32, 256, 14), (32, 512, 32, 512, 7)]


def compare(got, ref, ref64, dtype, names):
    for i, name in enumerate(names):
        assert_close(got[i], ref[i], dtype, name, ref64[i] if ref64 is not None else None)


@pytest.mark.parametrize("shape", CCBA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ccba_matches_composition(shape, dtype, fmt, training):
    n, c, k, co, hw = shape
    relu = True
    inp = ccba_inputs(n, c, k, co, hw, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), n, co, hw, hw, dtype=dtype, fmt=fmt_of(fmt))
    fwd, bwd = ccba_kernels(inp, training, relu, gout)
    ref_fwd, ref_bwd = ccba_reference(inp, training, relu, gout, dtype)
    r64 = ccba_reference(inp, training, relu, gout, torch.float64) if dtype in HALF else (None, None)
    compare(fwd, ref_fwd, r64[0], dtype, FWD_NAMES)
    compare(bwd, ref_bwd, r64[1], dtype, CCBA_GRADS)
    # Activations come back in the input's memory format.
    for t in (fwd[0], fwd[1], bwd[0], bwd[1]):
        assert t.is_contiguous(memory_format=fmt_of(fmt))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_ccba_no_activation_and_odd_sizes(dtype, fmt):
    # C_out not a multiple of 32 (partial channel blocks), odd spatial size, no ReLU.
    n, c, k, co, hw = 3, 40, 5, 37, 9
    inp = ccba_inputs(n, c, k, co, hw, dtype, fmt, seed=3)
    gout = randn(torch.Generator().manual_seed(8), n, co, hw, hw, dtype=dtype, fmt=fmt_of(fmt))
    for training in (True, False):
        fwd, bwd = ccba_kernels(inp, training, False, gout)
        ref_fwd, ref_bwd = ccba_reference(inp, training, False, gout, dtype)
        r64 = ccba_reference(inp, training, False, gout, torch.float64) if dtype in HALF else (None, None)
        compare(fwd, ref_fwd, r64[0], dtype, FWD_NAMES)
        compare(bwd, ref_bwd, r64[1], dtype, CCBA_GRADS)


# ------------------------------------------------------------------------------------------ op B
def update_composition(h, y, wo, gamma, beta, mean, var, wr, pool):
    hp = F.avg_pool2d(h, 2, 2) if pool else h
    s = hp + F.conv2d(y, wo[:, :, None, None])
    a, m, v = bn_composition(s, gamma, beta, mean, var, torch.tanh)
    return F.conv2d(a, wr, padding=1), s, m, v


def update_inputs(n, c, k, hw, pool, dtype, fmt, seed=0, odd_h=False):
    g = torch.Generator().manual_seed(seed)
    sd = stat_dtype(dtype)
    f = fmt_of(fmt)
    hh = 2 * hw + (1 if odd_h else 0) if pool else hw
    return dict(
        h=randn(g, n, k, hh, hh, dtype=dtype, fmt=f), y=randn(g, n, c, hw, hw, dtype=dtype, fmt=f),
        out_weight=randn(g, k, c, dtype=dtype, scale=c ** -0.5),
        gamma=1 + randn(g, k, dtype=sd, scale=0.3), beta=randn(g, k, dtype=sd, scale=0.2),
        mean=randn(g, k, dtype=sd, scale=0.1), var=0.5 + torch.rand(k, generator=g, dtype=torch.float64).to(sd).cuda(),
        rec_weight=randn(g, k, k, 3, 3, dtype=dtype, scale=(9 * k) ** -0.5))


UPDATE_DIFF = ("h", "y", "out_weight", "rec_weight", "gamma", "beta")
UPDATE_GRADS = ("dh", "dy", "dout_weight", "drec_weight", "dgamma", "dbeta")


def update_reference(inp, pool, training, grad_out, dtype):
    sd = stat_dtype(dtype)
    leaves = {k: inp[k].detach().to(sd if k in ("gamma", "beta") else dtype).requires_grad_() for k in UPDATE_DIFF}
    mean = None if training else inp["mean"].to(sd)
    var = None if training else inp["var"].to(sd)
    out, s, m, v = update_composition(leaves["h"], leaves["y"], leaves["out_weight"], leaves["gamma"],
                                      leaves["beta"], mean, var, leaves["rec_weight"], pool)
    grads = torch.autograd.grad(out, [leaves[k] for k in UPDATE_DIFF], grad_out.to(dtype))
    return (out.detach(), s.detach(), m.detach(), v.detach()), grads


def update_kernels(inp, pool, training, grad_out, device="cuda"):
    t = {k: v.to(device) for k, v in inp.items()}
    mean, var = (None, None) if training else (t["mean"], t["var"])
    fwd = OPS.rla_update_kernel_fwd(t["h"], t["y"], t["out_weight"], t["gamma"], t["beta"], mean, var,
                                    t["rec_weight"], pool, EPS)
    out, s, m, v = fwd
    bwd = OPS.rla_update_kernel_bwd(grad_out.to(device), t["h"], t["y"], t["out_weight"], t["gamma"], t["beta"],
                                    t["rec_weight"], s, m, v, pool, EPS, training)
    return fwd, bwd


# (N, C, k, H=W of y, pool): the RLA updates of RLA-ResNet-50 (pool where the stage downsamples).
UPDATE_SHAPES = [(8, 256, 32, 56, False), (16, 512, 32, 28, True), (32, 512, 32, 14, True),
                 (32, 512, 32, 7, True), (16, 256, 32, 7, False)]


@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_update_matches_composition(shape, dtype, fmt, training):
    n, c, k, hw, pool = shape
    inp = update_inputs(n, c, k, hw, pool, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), n, k, hw, hw, dtype=dtype, fmt=fmt_of(fmt))
    fwd, bwd = update_kernels(inp, pool, training, gout)
    ref_fwd, ref_bwd = update_reference(inp, pool, training, gout, dtype)
    r64 = update_reference(inp, pool, training, gout, torch.float64) if dtype in HALF else (None, None)
    compare(fwd, ref_fwd, r64[0], dtype, FWD_NAMES)
    compare(bwd, ref_bwd, r64[1], dtype, UPDATE_GRADS)
    for t in (fwd[0], fwd[1], bwd[0], bwd[1]):
        assert t.is_contiguous(memory_format=fmt_of(fmt))


# k not a multiple of the 8 output channels a thread owns, k at the direct kernel's limit (64), k above
# it (cuDNN fallback), and odd h sizes for floor-mode pooling.
@pytest.mark.parametrize("k,pool,odd_h", [(20, True, True), (64, True, False), (96, False, False), (1, True, True)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_update_k_and_pool_edges(k, pool, odd_h, dtype, fmt):
    n, c, hw = 4, 48, 11
    inp = update_inputs(n, c, k, hw, pool, dtype, fmt, seed=5, odd_h=odd_h)
    gout = randn(torch.Generator().manual_seed(9), n, k, hw, hw, dtype=dtype, fmt=fmt_of(fmt))
    for training in (True, False):
        fwd, bwd = update_kernels(inp, pool, training, gout)
        ref_fwd, ref_bwd = update_reference(inp, pool, training, gout, dtype)
        r64 = update_reference(inp, pool, training, gout, torch.float64) if dtype in HALF else (None, None)
        compare(fwd, ref_fwd, r64[0], dtype, FWD_NAMES)
        compare(bwd, ref_bwd, r64[1], dtype, UPDATE_GRADS)
    if pool and odd_h:
        # Floor mode: the last row/column of h never reaches the output, so its gradient is exactly zero.
        dh = bwd[0]
        assert torch.all(dh[:, :, -1, :] == 0) and torch.all(dh[:, :, :, -1] == 0)


# ------------------------------------------------------------------------------------ CUDA vs CPU
needs_cpu_kernels = pytest.mark.skipif(not _extension.cpp_compiled(), reason="rla_ext._C has no CPU kernels")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_cpu_kernels(dtype, fmt, training):
    n, c, k, co, hw = 8, 256, 32, 64, 28
    inp = ccba_inputs(n, c, k, co, hw, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), n, co, hw, hw, dtype=dtype, fmt=fmt_of(fmt))
    cu = ccba_kernels(inp, training, True, gout)
    cpu = ccba_kernels(inp, training, True, gout, device="cpu")
    r64 = ccba_reference(inp, training, True, gout, torch.float64) if dtype in HALF else (None, None)
    compare([t.cpu() for t in cu[0]], cpu[0], [t.cpu() for t in r64[0]] if r64[0] else None, dtype, FWD_NAMES)
    compare([t.cpu() for t in cu[1]], cpu[1], [t.cpu() for t in r64[1]] if r64[1] else None, dtype, CCBA_GRADS)

    inp = update_inputs(8, 256, 32, 14, True, dtype, fmt)
    gout = randn(torch.Generator().manual_seed(7), 8, 32, 14, 14, dtype=dtype, fmt=fmt_of(fmt))
    cu = update_kernels(inp, True, training, gout)
    cpu = update_kernels(inp, True, training, gout, device="cpu")
    r64 = update_reference(inp, True, training, gout, torch.float64) if dtype in HALF else (None, None)
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
        torch.testing.assert_close(bwd[4] / reps, ref_bwd[4], rtol=2e-2, atol=2e-2)  # dgamma
        torch.testing.assert_close(bwd[5] / reps, ref_bwd[5], rtol=2e-2, atol=2e-2)  # dbeta
        del out, s, bwd
        torch.cuda.empty_cache()

