"""The CPU kernels (csrc/cpu/) called directly as torch.ops.rla_ext.*_kernel_{fwd,bwd}.

Forward results (output, the saved pre-BN tensor z / s, batch mean and BIASED variance) are checked
against the formulas written out below; backward results against torch autograd through the same
formulas written as a plain PyTorch composition. float64 and float32 element-wise, float16 / bfloat16
against a float64 reference; both memory formats; odd sizes (N=1, H=W=1, primes, k not a multiple of 8);
every instruction-set variant of the hot loops that this CPU runs (baseline, AVX2, AVX-512).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rla_ext import _extension

pytestmark = [pytest.mark.skipif(not _extension.cpp_compiled(),
                                 reason=f"rla_ext._C has no CPU kernels ({_extension.load_error() or 'not built'})"),
              pytest.mark.isa_sensitive]  # rerun with torch on a lower ISA by scripts/test_lower_isa.py

OPS = torch.ops.rla_ext
EPS = 1e-5
ISAS = ("default", "avx2", "avx512")
FORMATS = ("contiguous", "channels_last")
# (rtol, atol) per dtype for element-wise comparison with the float64 formulas (inputs are O(1)).
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2),
       torch.bfloat16: (8e-2, 8e-2)}
# (N, C, k, C_out, H, W): batch of one, 1x1 images, primes, k not a multiple of 8. In channels_last
# the 1x1 convs take the BLAS route when there are fewer pixel rows than input channels and than 4x the
# outputs (conv1x1_by_gemm in csrc/cpu/common.h: (2, 8, 32, 16, 1, 1) here) and oneDNN otherwise.
# The last shapes are wide enough for full AVX-512 vectors plus a tail in both formats (37 output
# channels, 42-pixel planes).
CCBA_SHAPES = [(1, 3, 5, 7, 1, 3), (2, 13, 5, 11, 7, 5), (3, 17, 3, 8, 3, 7), (2, 8, 32, 16, 1, 1),
               (2, 40, 32, 37, 6, 7)]
# (N, C, k, H, W) of y; with pool h is (2H + H%2, 2W + W%2) so floor mode drops a row/column. The out
# conv's routes: the BLAS GEMM at (2, 8, 32, 1, 1), oneDNN with fewer pixel rows than C but at least 4k
# at (1, 40, 2, 3, 3), oneDNN with more rows than C at (2, 24, 35, 6, 7).
UPDATE_SHAPES = [(1, 3, 5, 1, 3), (2, 13, 5, 7, 5), (3, 17, 3, 3, 7), (2, 8, 32, 1, 1), (2, 24, 35, 6, 7),
                 (1, 40, 2, 3, 3)]


def runnable_isas() -> list[str]:
    """The instruction-set variants of the hot loops this CPU can run (csrc/cpu/isa.h)."""
    if not _extension.cpp_compiled():
        return ["unbuilt"]
    return list(ISAS[:ISAS.index(OPS.cpu_isa_supported()) + 1])


@pytest.fixture(autouse=True, scope="module", params=runnable_isas())
def isa(request):
    """Every test here runs once per variant the machine can run, not only the one picked at load."""
    if request.param == "unbuilt":
        yield request.param
        return
    previous = OPS.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        OPS.set_cpu_isa(previous)


def fmt_of(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(gen: torch.Generator, *shape, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset


def in_format(t: torch.Tensor, dtype: torch.dtype, fmt: str) -> torch.Tensor:
    """An activation in memory format `fmt`; matrices stay contiguous."""
    return t.to(dtype).contiguous(memory_format=fmt_of(fmt)) if t.dim() == 4 else t.to(dtype).contiguous()


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_forward_close(got: tuple, want: tuple, dtype: torch.dtype, saved_name: str) -> None:
    """A forward kernel's (out, saved, mean, var) against the formulas' tuple in the same order."""
    for i, what in ((1, saved_name), (2, "mean"), (3, "var (biased)"), (0, "out")):
        assert_close(got[i], want[i], dtype, what)


def batch_norm(z, mean, var, gamma, beta):
    return (z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + EPS) * gamma[None, :, None, None] \
        + beta[None, :, None, None]


def batch_moments(z):
    """Batch mean and BIASED variance per channel (differentiable)."""
    mean = z.mean(dim=(0, 2, 3))
    var = ((z - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    return mean, var


# ----------------------------------------------------------------------------------------------
# Op A: concat_conv_bn_act
# ----------------------------------------------------------------------------------------------

def ccba_formula(x, h, w, gamma, beta, mean, var, relu):
    """-> out, z, mean, var; batch statistics when mean is None."""
    c = x.shape[1]
    z = torch.einsum("oc,nchw->nohw", w[:, :c], x) + torch.einsum("ok,nkhw->nohw", w[:, c:], h)
    if mean is None:
        mean, var = batch_moments(z)
    out = batch_norm(z, mean, var, gamma, beta)
    return (F.relu(out) if relu else out), z, mean, var


def ccba_inputs(shape, seed=0):
    n, c, k, co, hh, ww = shape
    g = torch.Generator().manual_seed(seed)
    return dict(x=rand(g, n, c, hh, ww), h=rand(g, n, k, hh, ww), w=rand(g, co, c + k, scale=(c + k) ** -0.5),
                gamma=rand(g, co, scale=0.3, offset=1.0), beta=rand(g, co, scale=0.2),
                mean=rand(g, co, scale=0.1), var=torch.rand(co, generator=g, dtype=torch.float64) + 0.5,
                up=rand(g, n, co, hh, ww))


@pytest.mark.parametrize("shape", CCBA_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_ccba_forward_backward(shape, fmt, dtype, training, relu):
    p = ccba_inputs(shape)
    sd = stat_dtype(dtype)
    x, h, w = (in_format(p[n], dtype, fmt) for n in ("x", "h", "w"))
    gamma, beta = p["gamma"].to(sd), p["beta"].to(sd)
    mean_in = None if training else p["mean"].to(sd)
    var_in = None if training else p["var"].to(sd)
    out, z, mean, var = OPS.concat_conv_bn_act_kernel_fwd(x, h, w, gamma, beta, mean_in, var_in, EPS, relu)

    # Reference: the formulas in float64 with autograd.
    ref = {n: p[n].clone().requires_grad_(n in ("x", "h", "w", "gamma", "beta")) for n in p}
    r_out, r_z, r_mean, r_var = ccba_formula(ref["x"], ref["h"], ref["w"], ref["gamma"], ref["beta"],
                                             None if training else ref["mean"], None if training else ref["var"],
                                             relu)
    assert out.dtype == dtype and z.dtype == dtype and mean.dtype == sd and var.dtype == sd
    want_fmt = fmt_of(fmt) if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    assert out.is_contiguous(memory_format=want_fmt) and z.is_contiguous(memory_format=want_fmt)
    assert_forward_close((out, z, mean, var), (r_out, r_z, r_mean, r_var), dtype, "z")
    if not training:
        assert mean.data_ptr() != mean_in.data_ptr() and var.data_ptr() != var_in.data_ptr(), "eval stats must be copies"

    up = in_format(p["up"], dtype, fmt)
    dx, dh, dw, dgamma, dbeta = OPS.concat_conv_bn_act_kernel_bwd(up, x, h, w, gamma, beta, z, mean, var, EPS, relu,
                                                                  training)
    (r_out * p["up"]).sum().backward()
    assert dgamma.dtype == sd and dbeta.dtype == sd and dx.dtype == dtype and dw.dtype == dtype
    assert dx.is_contiguous(memory_format=want_fmt) and dh.is_contiguous(memory_format=want_fmt)
    for name, got in (("x", dx), ("h", dh), ("w", dw), ("gamma", dgamma), ("beta", dbeta)):
        assert_close(got, ref[name].grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ccba_half(dtype, fmt):
    p = ccba_inputs((2, 24, 32, 16, 5, 6), seed=3)
    x, h, w = (in_format(p[n], dtype, fmt) for n in ("x", "h", "w"))
    gamma, beta = p["gamma"].float(), p["beta"].float()
    out, z, mean, var = OPS.concat_conv_bn_act_kernel_fwd(x, h, w, gamma, beta, None, None, EPS, True)
    # Reference from the same rounded inputs, in float64.
    ref = {n: p[n].to(dtype).double().requires_grad_() for n in ("x", "h", "w")}
    r_out, r_z, r_mean, r_var = ccba_formula(ref["x"], ref["h"], ref["w"], p["gamma"], p["beta"], None, None, True)
    assert out.dtype == dtype and mean.dtype == torch.float32
    assert_forward_close((out, z, mean, var), (r_out, r_z, r_mean, r_var), dtype, "z")
    up = in_format(p["up"], dtype, fmt)
    dx, dh, dw, dgamma, dbeta = OPS.concat_conv_bn_act_kernel_bwd(up, x, h, w, gamma, beta, z, mean, var, EPS, True,
                                                                  True)
    (r_out * p["up"].to(dtype).double()).sum().backward()
    for name, got in (("x", dx), ("h", dh), ("w", dw)):
        assert torch.isfinite(got).all()
        assert_close(got, ref[name].grad, dtype, f"d{name}")


# ----------------------------------------------------------------------------------------------
# Op B: rla_update
# ----------------------------------------------------------------------------------------------

def update_formula(h, y, w_out, gamma, beta, mean, var, w_rec, pool):
    """-> out, s, mean, var; batch statistics when mean is None."""
    if pool:
        hy, wy = h.shape[2] // 2, h.shape[3] // 2
        hc = h[:, :, :2 * hy, :2 * wy]
        h = (hc[:, :, 0::2, 0::2] + hc[:, :, 0::2, 1::2] + hc[:, :, 1::2, 0::2] + hc[:, :, 1::2, 1::2]) / 4
    s = h + torch.einsum("kc,nchw->nkhw", w_out, y)
    if mean is None:
        mean, var = batch_moments(s)
    a = torch.tanh(batch_norm(s, mean, var, gamma, beta))
    return F.conv2d(a, w_rec, padding=1), s, mean, var


def update_inputs(shape, pool, seed=0):
    n, c, k, hy, wy = shape
    g = torch.Generator().manual_seed(seed)
    hh, hw = (2 * hy + hy % 2, 2 * wy + wy % 2) if pool else (hy, wy)
    return dict(h=rand(g, n, k, hh, hw), y=rand(g, n, c, hy, wy), w_out=rand(g, k, c, scale=c ** -0.5),
                gamma=rand(g, k, scale=0.3, offset=1.0), beta=rand(g, k, scale=0.2),
                mean=rand(g, k, scale=0.1), var=torch.rand(k, generator=g, dtype=torch.float64) + 0.5,
                w_rec=rand(g, k, k, 3, 3, scale=(9 * k) ** -0.5), up=rand(g, n, k, hy, wy))


@pytest.mark.parametrize("shape", UPDATE_SHAPES)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_update_forward_backward(shape, pool, fmt, dtype, training):
    p = update_inputs(shape, pool)
    sd = stat_dtype(dtype)
    h, y, w_out = (in_format(p[n], dtype, fmt) for n in ("h", "y", "w_out"))
    w_rec = p["w_rec"].to(dtype)
    gamma, beta = p["gamma"].to(sd), p["beta"].to(sd)
    mean_in = None if training else p["mean"].to(sd)
    var_in = None if training else p["var"].to(sd)
    out, s, mean, var = OPS.rla_update_kernel_fwd(h, y, w_out, gamma, beta, mean_in, var_in, w_rec, pool, EPS)

    ref = {n: p[n].clone().requires_grad_(n in ("h", "y", "w_out", "w_rec", "gamma", "beta")) for n in p}
    r_out, r_s, r_mean, r_var = update_formula(ref["h"], ref["y"], ref["w_out"], ref["gamma"], ref["beta"],
                                               None if training else ref["mean"], None if training else ref["var"],
                                               ref["w_rec"], pool)
    want_fmt = fmt_of(fmt) if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous() \
        else torch.contiguous_format
    assert out.dtype == dtype and s.dtype == dtype and mean.dtype == sd and var.dtype == sd
    assert out.is_contiguous(memory_format=want_fmt) and s.is_contiguous(memory_format=want_fmt)
    assert_forward_close((out, s, mean, var), (r_out, r_s, r_mean, r_var), dtype, "s")

    up = in_format(p["up"], dtype, fmt)
    dh, dy, dw_out, dw_rec, dgamma, dbeta = OPS.rla_update_kernel_bwd(up, h, y, w_out, gamma, beta, w_rec, s, mean,
                                                                      var, pool, EPS, training)
    (r_out * p["up"]).sum().backward()
    assert dh.shape == h.shape and dh.is_contiguous(memory_format=want_fmt)
    assert dy.is_contiguous(memory_format=want_fmt)
    assert dgamma.dtype == sd and dbeta.dtype == sd
    for name, got in (("h", dh), ("y", dy), ("w_out", dw_out), ("w_rec", dw_rec), ("gamma", dgamma),
                      ("beta", dbeta)):
        assert_close(got, ref[name].grad, dtype, f"d{name}")
    if pool and (h.shape[2] % 2 or h.shape[3] % 2):
        # Floor mode: the last odd row / column of h is outside every window.
        assert (dh[:, :, 2 * y.shape[2]:, :] == 0).all() and (dh[:, :, :, 2 * y.shape[3]:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool", [False, True])
def test_update_half(dtype, pool):
    p = update_inputs((2, 24, 32, 5, 6), pool, seed=4)
    fmt = "channels_last"
    h, y, w_out = (in_format(p[n], dtype, fmt) for n in ("h", "y", "w_out"))
    w_rec = p["w_rec"].to(dtype)
    gamma, beta = p["gamma"].float(), p["beta"].float()
    out, s, mean, var = OPS.rla_update_kernel_fwd(h, y, w_out, gamma, beta, None, None, w_rec, pool, EPS)
    ref = {n: p[n].to(dtype).double().requires_grad_() for n in ("h", "y", "w_out", "w_rec")}
    r_out, r_s, r_mean, r_var = update_formula(ref["h"], ref["y"], ref["w_out"], p["gamma"], p["beta"], None, None,
                                               ref["w_rec"], pool)
    assert out.dtype == dtype and mean.dtype == torch.float32
    assert_forward_close((out, s, mean, var), (r_out, r_s, r_mean, r_var), dtype, "s")
    up = in_format(p["up"], dtype, fmt)
    grads = OPS.rla_update_kernel_bwd(up, h, y, w_out, gamma, beta, w_rec, s, mean, var, pool, EPS, True)
    (r_out * p["up"].to(dtype).double()).sum().backward()
    for name, got in zip(("h", "y", "w_out", "w_rec"), grads[:4]):
        assert torch.isfinite(got).all()
        assert_close(got, ref[name].grad, dtype, f"d{name}")


# ----------------------------------------------------------------------------------------------
# Statistics robustness, determinism, argument checks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_variance_of_offset_data_float32(fmt):
    """A large common offset must not destroy the variance (no E[x^2] - E[x]^2 in float32)."""
    g = torch.Generator().manual_seed(5)
    n, k, hw = 4, 3, 9
    h = (torch.randn(n, k, hw, hw, generator=g, dtype=torch.float64) * 1e-2 + 1e3)
    y = torch.zeros(n, 2, hw, hw, dtype=torch.float64)
    w_out = torch.zeros(k, 2)
    args = [t.float().contiguous(memory_format=fmt_of(fmt)) for t in (h, y)]
    _, s, mean, var = OPS.rla_update_kernel_fwd(*args, w_out, torch.ones(k), torch.zeros(k), None, None,
                                                torch.zeros(k, k, 3, 3), False, EPS)
    h32 = h.float().double()
    torch.testing.assert_close(var.double(), h32.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), h32.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic(fmt):
    p = ccba_inputs((2, 13, 5, 11, 9, 8))
    x, h, w = (in_format(p[n], torch.float32, fmt) for n in ("x", "h", "w"))
    args = (x, h, w, p["gamma"].float(), p["beta"].float(), None, None, EPS, True)
    first = OPS.concat_conv_bn_act_kernel_fwd(*args)
    for _ in range(3):
        again = OPS.concat_conv_bn_act_kernel_fwd(*args)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    out, z, mean, var = first
    up = in_format(p["up"], torch.float32, fmt)
    g1 = OPS.concat_conv_bn_act_kernel_bwd(up, x, h, w, args[3], args[4], z, mean, var, EPS, True, True)
    g2 = OPS.concat_conv_bn_act_kernel_bwd(up, x, h, w, args[3], args[4], z, mean, var, EPS, True, True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_argument_errors_name_the_argument():
    p = ccba_inputs((2, 4, 3, 5, 3, 3))
    x, h, w = p["x"].float(), p["h"].float(), p["w"].float()
    gamma, beta = p["gamma"].float(), p["beta"].float()
    with pytest.raises(RuntimeError, match="gamma"):
        OPS.concat_conv_bn_act_kernel_fwd(x, h, w, gamma.double(), beta, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="weight"):
        OPS.concat_conv_bn_act_kernel_fwd(x, h, w[:, :-1], gamma, beta, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="h"):
        OPS.concat_conv_bn_act_kernel_fwd(x, h.double(), w, gamma, beta, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="mean and var"):
        OPS.concat_conv_bn_act_kernel_fwd(x, h, w, gamma, beta, p["mean"].float(), None, EPS, True)
    q = update_inputs((2, 4, 3, 3, 3), pool=True)
    hq, yq, wo, wr = q["h"].float(), q["y"].float(), q["w_out"].float(), q["w_rec"].float()
    gk, bk = q["gamma"].float(), q["beta"].float()
    with pytest.raises(RuntimeError, match="rec_weight"):
        OPS.rla_update_kernel_fwd(hq, yq, wo, gk, bk, None, None, wr[:, :, :2], True, EPS)
    with pytest.raises(RuntimeError, match="does not match y"):
        OPS.rla_update_kernel_fwd(hq, yq, wo, gk, bk, None, None, wr, False, EPS)
    with pytest.raises(RuntimeError, match="out_weight"):
        OPS.rla_update_kernel_fwd(hq, yq, wo.t().contiguous(), gk, bk, None, None, wr, True, EPS)
