"""Direct tests of the Triton kernel pairs (rla_ext.triton_kernels.<op>.forward / backward).

They run on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is
imported) or on a CUDA GPU. References are written here in plain PyTorch, in float64, from the
formulas in docs/ARCHITECTURE.md; gradients come from torch.autograd on that composition.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no GPU: run with TRITON_INTERPRET=1 to test the kernels on CPU", allow_module_level=True)

from rla_ext.triton_kernels import concat_conv_bn_act as op_a  # noqa: E402
from rla_ext.triton_kernels import rla_update as op_b  # noqa: E402
from rla_ext.triton_kernels import rla_update_and_entry as op_c  # noqa: E402

EPS = 1e-5
# (atol, rtol) against the float64 reference, per activation dtype.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2)}
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def grid(flag_name, shapes):
    """Every (dtype, format, mode, flag) on the first shape; the others in float32 with the flag on
    (the interpreter is slow, and the other shapes are there for tiling edges, not dtypes)."""
    cases = []
    for dtype in (torch.float32, torch.float64):
        for fmt in FORMATS:
            for training in (True, False):
                for flag in (True, False):
                    for i, shape in enumerate(shapes):
                        if i and (dtype != torch.float32 or not flag):
                            continue
                        mode = "train" if training else "eval"
                        flag_id = flag_name if flag else "no" + flag_name
                        name = f"{str(dtype)[6:]}-{fmt}-{mode}-{flag_id}-{shape}"
                        cases.append(pytest.param(dtype, fmt, training, flag, shape, id=name))
    return cases


def stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def act(shape, dtype, fmt, scale=1.0, offset=0.0, gen=None):
    t = torch.randn(shape, dtype=torch.float64, generator=gen) * scale + offset
    return t.to(device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)


def close(got, want, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=atol * scale, rtol=rtol,
                               msg=what)


def fmt_of(t):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format


def bn(z, mean, var, gamma, beta):
    c = (None, slice(None), None, None)
    return (z - mean[c]) * torch.rsqrt(var[c] + EPS) * gamma[c] + beta[c]


def batch_stats(z):
    return z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)


# ---------------------------------------------------------------- op A: concat_conv_bn_act

def ref_a(x, h, w, gamma, beta, mean, var, relu):
    z = F.conv2d(torch.cat((x, h), dim=1), w[:, :, None, None])
    m, v = batch_stats(z) if mean is None else (mean, var)
    out = bn(z, m, v, gamma, beta)
    return (out.clamp_min(0) if relu else out), z, m, v


def case_a(n, c, k, co, hh, ww, dtype, fmt, training, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = act((n, c, hh, ww), dtype, fmt, offset=offset, gen=g)
    h = act((n, k, hh, ww), dtype, fmt, gen=g)
    w = (torch.randn(co, c + k, generator=g, dtype=torch.float64) / (c + k) ** 0.5).to(DEVICE, dtype)
    sd = stat(dtype)
    gamma = (torch.rand(co, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, sd)
    beta = (torch.randn(co, generator=g, dtype=torch.float64) * 0.3).to(DEVICE, sd)
    mean = var = None
    if not training:
        mean = (torch.randn(co, generator=g, dtype=torch.float64) * 0.2).to(DEVICE, sd)
        var = (torch.rand(co, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, sd)
    return x, h, w, gamma, beta, mean, var


@pytest.mark.parametrize("dtype,fmt,training,relu,shape", grid("relu", [(2, 5, 3, 7, 3, 5), (1, 24, 8, 17, 7,
                                                                                             1)]))
def test_concat_conv_bn_act(dtype, fmt, training, relu, shape):
    fmt = FORMATS[fmt]
    x, h, w, gamma, beta, mean, var = case_a(*shape, dtype, fmt, training)
    out, z, m, v = op_a.forward(x, h, w, gamma, beta, mean, var, EPS, relu)
    for t in (out, z):
        assert t.dtype == dtype and t.shape == (shape[0], shape[3], shape[4],
                                                shape[5]) and fmt_of(t) == fmt_of(x)
    assert m.dtype == stat(dtype) and v.dtype == stat(dtype)
    if not training:
        assert m.data_ptr() != mean.data_ptr() and v.data_ptr() != var.data_ptr()

    d = [t.double().requires_grad_() for t in (x, h, w, gamma, beta)]
    r_out, r_z, r_m, r_v = ref_a(*d, None if training else mean.double(), None if training else var.double(),
                                 relu)
    close(z, r_z, dtype, "z")
    close(m, r_m, dtype, "mean")
    close(v, r_v, dtype, "biased var")
    close(out, r_out, dtype, "out")

    go = act(out.shape, dtype, fmt, gen=torch.Generator().manual_seed(7))
    grads = op_a.backward(go, x, h, w, gamma, beta, z, m, v, EPS, relu, training)
    want = torch.autograd.grad(r_out, d, go.double())
    names = ("dx", "dh", "dweight", "dgamma", "dbeta")
    for name, got, ref, like in zip(names, grads, want, (x, h, w, gamma, beta)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        close(got, ref, dtype, name, scale=10.0)
    assert fmt_of(grads[0]) == fmt_of(x) and fmt_of(grads[1]) == fmt_of(x)


# ---------------------------------------------------------------- op B: rla_update

def ref_b(h, y, wo, gamma, beta, mean, var, wr, pool):
    s = (F.avg_pool2d(h, 2, 2) if pool else h) + F.conv2d(y, wo[:, :, None, None])
    m, v = batch_stats(s) if mean is None else (mean, var)
    return F.conv2d(torch.tanh(bn(s, m, v, gamma, beta)), wr, padding=1), s, m, v


def case_b(n, c, k, hh, ww, pool, dtype, fmt, training, seed=0):
    g = torch.Generator().manual_seed(seed)
    hy, wy = (hh // 2, ww // 2) if pool else (hh, ww)
    h = act((n, k, hh, ww), dtype, fmt, gen=g)
    y = act((n, c, hy, wy), dtype, fmt, gen=g)
    wo = (torch.randn(k, c, generator=g, dtype=torch.float64) / c ** 0.5).to(DEVICE, dtype)
    wr = (torch.randn(k, k, 3, 3, generator=g, dtype=torch.float64) / (3 * k ** 0.5)).to(DEVICE, dtype)
    sd = stat(dtype)
    gamma = (torch.rand(k, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, sd)
    beta = (torch.randn(k, generator=g, dtype=torch.float64) * 0.3).to(DEVICE, sd)
    mean = var = None
    if not training:
        mean = (torch.randn(k, generator=g, dtype=torch.float64) * 0.2).to(DEVICE, sd)
        var = (torch.rand(k, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, sd)
    return h, y, wo, gamma, beta, mean, var, wr


@pytest.mark.parametrize("dtype,fmt,training,pool,shape", grid("pool", [(2, 6, 4, 7, 5), (1, 19, 8, 3, 6)]))
def test_rla_update(dtype, fmt, training, pool, shape):
    fmt = FORMATS[fmt]
    n, c, k, hh, ww = shape
    h, y, wo, gamma, beta, mean, var, wr = case_b(*shape, pool, dtype, fmt, training)
    out, s, m, v = op_b.forward(h, y, wo, gamma, beta, mean, var, wr, pool, EPS)
    for t in (out, s):
        assert t.dtype == dtype and t.shape == (n, k, y.shape[2], y.shape[3]) and fmt_of(t) == fmt_of(y)
    assert m.dtype == stat(dtype) and v.dtype == stat(dtype)

    d = [t.double().requires_grad_() for t in (h, y, wo, gamma, beta, wr)]
    r_out, r_s, r_m, r_v = ref_b(*d[:5], None if training else mean.double(),
                                 None if training else var.double(),
                                 d[5], pool)
    close(s, r_s, dtype, "s")
    close(m, r_m, dtype, "mean")
    close(v, r_v, dtype, "biased var")
    close(out, r_out, dtype, "out")

    go = act(out.shape, dtype, fmt, gen=torch.Generator().manual_seed(7))
    grads = op_b.backward(go, h, y, wo, gamma, beta, wr, s, m, v, pool, EPS, training)
    want = torch.autograd.grad(r_out, d, go.double())
    want = (want[0], want[1], want[2], want[5], want[3], want[4])
    names = ("dh", "dy", "dout_weight", "drec_weight", "dgamma", "dbeta")
    for name, got, ref, like in zip(names, grads, want, (h, y, wo, wr, gamma, beta)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        close(got, ref, dtype, name, scale=10.0)
    assert fmt_of(grads[0]) == fmt_of(y) and fmt_of(grads[1]) == fmt_of(y)
    if pool and hh % 2:
        assert torch.all(grads[0][:, :, -1] == 0), "rows of h beyond 2H get zero gradient"


# ---------------------------------------------------------------- op C: rla_update_and_entry
# The block boundary equals op B then op A on (y, h_next): checked against that composition of the
# two Triton ops and against the float64 torch reference, values, batch statistics and every gradient.

def case_c(n, c, k, ce, hh, ww, pool, dtype, fmt, training, seed=0):
    h, y, wo, gamma, beta, mean, var, wr = case_b(n, c, k, hh, ww, pool, dtype, fmt, training, seed)
    _, _, we, e_gamma, e_beta, e_mean, e_var = case_a(n, c, k, ce, y.shape[2], y.shape[3], dtype, fmt,
                                                      training, seed + 1)
    return h, y, wo, gamma, beta, mean, var, wr, we, e_gamma, e_beta, e_mean, e_var


C_GRADS = ("dh", "dy", "dout_weight", "drec_weight", "dgamma", "dbeta", "dentry_weight", "dentry_gamma",
           "dentry_beta")


def _c_upstream(h_next, out, dtype, fmt):
    gen = torch.Generator().manual_seed(7)
    return act(h_next.shape, dtype, fmt, gen=gen), act(out.shape, dtype, fmt, gen=gen)


# (N, C, k, Ce, Hh, Wh): h's odd sides make pooling drop its last row / column; k = 19, Ce = 17 are
# not multiples of the interpreter's 16-wide tiles.
@pytest.mark.parametrize("dtype,fmt,training,pool,shape",
                         grid("pool", [(2, 5, 3, 7, 7, 5), (1, 18, 19, 17, 5, 6)]))
def test_rla_update_and_entry(dtype, fmt, training, pool, shape):
    fmt = FORMATS[fmt]
    n, c, k, ce, hh, ww = shape
    relu = training != pool
    args = case_c(*shape, pool, dtype, fmt, training)
    h, y, wo, gamma, beta, mean, var, wr, we, e_gamma, e_beta, e_mean, e_var = args
    res = op_c.forward(*args, pool, EPS, EPS, relu)
    h_next, s, m, v, out, z, em, ev = res
    hy, wy = y.shape[2], y.shape[3]
    for t, ch in ((h_next, k), (s, k), (out, ce), (z, ce)):
        assert t.dtype == dtype and t.shape == (n, ch, hy, wy) and fmt_of(t) == fmt_of(y)
    for t in (m, v, em, ev):
        assert t.dtype == stat(dtype)

    # The two Triton ops it fuses.
    b_out, b_s, b_m, b_v = op_b.forward(h, y, wo, gamma, beta, mean, var, wr, pool, EPS)
    a_out, a_z, a_m, a_v = op_a.forward(y, b_out, we, e_gamma, e_beta, e_mean, e_var, EPS, relu)
    for name, got, want in zip(("h_next", "s", "mean", "var", "out", "z", "entry_mean", "entry_var"), res,
                               (b_out, b_s, b_m, b_v, a_out, a_z, a_m, a_v)):
        close(got, want, dtype, f"{name} vs the two triton ops")

    # The float64 torch reference, and autograd through it for both outputs.
    d = [t.double().requires_grad_() for t in (h, y, wo, gamma, beta, wr, we, e_gamma, e_beta)]
    r_hn, r_s, r_m, r_v = ref_b(*d[:5], None if training else mean.double(),
                                None if training else var.double(), d[5], pool)
    r_out, r_z, r_em, r_ev = ref_a(d[1], r_hn, *d[6:], None if training else e_mean.double(),
                                   None if training else e_var.double(), relu)
    for name, got, want in zip(("h_next", "s", "mean", "var", "out", "z", "entry_mean", "entry_var"), res,
                               (r_hn, r_s, r_m, r_v, r_out, r_z, r_em, r_ev)):
        close(got, want, dtype, name)

    gh, go = _c_upstream(h_next, out, dtype, fmt)
    grads = op_c.backward(gh, go, h, y, wo, gamma, beta, wr, s, m, v, h_next, we, e_gamma, e_beta, z, em, ev,
                          pool, EPS, EPS, relu, training)
    want = torch.autograd.grad((r_hn, r_out), d, (gh.double(), go.double()))
    want = (want[0], want[1], want[2], want[5], want[3], want[4], want[6], want[7], want[8])
    likes = (h, y, wo, wr, gamma, beta, we, e_gamma, e_beta)
    for name, got, ref, like in zip(C_GRADS, grads, want, likes):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        close(got, ref, dtype, name, scale=10.0)
    assert fmt_of(grads[0]) == fmt_of(y) and fmt_of(grads[1]) == fmt_of(y)
    if pool and hh % 2:
        assert torch.all(grads[0][:, :, -1] == 0), "rows of h beyond 2H get zero gradient"

    # Backward of the two Triton ops: autograd would sum h_next's two gradients, and y's.
    a_g = op_a.backward(go, y, b_out, we, e_gamma, e_beta, a_z, a_m, a_v, EPS, relu, training)
    b_g = op_b.backward(gh + a_g[1], h, y, wo, gamma, beta, wr, b_s, b_m, b_v, pool, EPS, training)
    two = (b_g[0], b_g[1] + a_g[0], *b_g[2:], *a_g[2:])
    for name, got, ref in zip(C_GRADS, grads, two):
        close(got, ref, dtype, f"{name} vs the two triton ops", scale=10.0)


def test_rla_update_and_entry_half_precision():
    """float16 (bfloat16 on a GPU only, as above) against the float64 reference: forward values and
    finite gradients of the right dtypes."""
    dtypes = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    for dtype in dtypes:
        args = case_c(2, 5, 3, 7, 7, 5, True, dtype, torch.channels_last, True)
        h_next, s, m, v, out, z, em, ev = op_c.forward(*args, True, EPS, EPS, True)
        d = [t if t is None else t.double() for t in args]
        r_hn, *_ = ref_b(*d[:5], None, None, d[7], True)
        r_out, *_ = ref_a(d[1], r_hn, d[8], d[9], d[10], None, None, True)
        atol = 2e-2 if dtype == torch.float16 else 8e-2
        torch.testing.assert_close(h_next.double(), r_hn, atol=atol, rtol=atol)
        torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=atol)
        h, y, wo, gamma, beta, _, _, wr, we, e_gamma, e_beta, _, _ = args
        gh, go = _c_upstream(h_next, out, dtype, torch.channels_last)
        grads = op_c.backward(gh, go, h, y, wo, gamma, beta, wr, s, m, v, h_next, we, e_gamma, e_beta, z, em,
                              ev, True, EPS, EPS, True, True)
        for name, g, like in zip(C_GRADS, grads, (h, y, wo, wr, gamma, beta, we, e_gamma, e_beta)):
            assert g.dtype == like.dtype and torch.isfinite(g).all(), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rla_update_and_entry_aten_fallback(training):
    """The ATen composition float64 takes on a GPU, run here on CPU against the kernels."""
    from rla_ext.triton_kernels import _aten

    args = [t if t is None else t.cpu() for t in case_c(2, 5, 3, 7, 7, 5, True, torch.float64,
                                                        torch.channels_last, training)]
    if DEVICE == "cuda":
        pytest.skip("the kernels run fp64 through this fallback on a GPU: compared on CPU only")
    got = _aten.rla_update_and_entry_forward(*args, True, EPS, EPS, True)
    want = op_c.forward(*args, True, EPS, EPS, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    h, y, wo, gamma, beta, _, _, wr, we, e_gamma, e_beta, _, _ = args
    h_next, s, m, v, out, z, em, ev = want
    gh, go = _c_upstream(h_next, out, torch.float64, torch.channels_last)
    bwd = (gh, go, h, y, wo, gamma, beta, wr, s, m, v, h_next, we, e_gamma, e_beta, z, em, ev, True, EPS, EPS,
           True, training)
    for name, a, b in zip(C_GRADS, _aten.rla_update_and_entry_backward(*bwd), op_c.backward(*bwd)):
        torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------- statistics and determinism

def test_statistics_shifted_data_many_partials():
    """Many partial tiles (M = 2*13*11 rows) and a large common offset: the centred partials keep
    the fp32 variance accurate where E[z^2] - E[z]^2 would cancel."""
    x, h, w, gamma, beta, _, _ = case_a(2, 3, 2, 3, 13, 11, torch.float32, torch.channels_last, True,
                                        offset=300.0)
    _, z, m, v = op_a.forward(x, h, w, gamma, beta, None, None, EPS, False)
    r_m, r_v = batch_stats(z.double())
    torch.testing.assert_close(m.double(), r_m, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(v.double(), r_v, atol=1e-6, rtol=1e-4)


def test_deterministic():
    args = case_b(2, 6, 4, 7, 5, True, torch.float32, torch.channels_last, True)
    h, y, wo, gamma, beta, mean, var, wr = args
    first = op_b.forward(h, y, wo, gamma, beta, None, None, wr, True, EPS)
    again = op_b.forward(h, y, wo, gamma, beta, None, None, wr, True, EPS)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    go = torch.ones_like(first[0])
    g1 = op_b.backward(go, h, y, wo, gamma, beta, wr, first[1], first[2], first[3], True, EPS, True)
    g2 = op_b.backward(go, h, y, wo, gamma, beta, wr, first[1], first[2], first[3], True, EPS, True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    """Half precisions against the float64 reference. The interpreter emulates bfloat16 wrongly
    (numpy has no bfloat16), so bfloat16 is only checked on a GPU."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter has no bfloat16 arithmetic; checked on GPU only")
    x, h, w, gamma, beta, _, _ = case_a(2, 5, 3, 7, 3, 5, dtype, torch.channels_last, True)
    out, z, m, v = op_a.forward(x, h, w, gamma, beta, None, None, EPS, True)
    r_out, r_z, _, _ = ref_a(x.double(), h.double(), w.double(), gamma.double(), beta.double(), None, None,
                             True)
    atol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(z.double(), r_z, atol=atol, rtol=atol)
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=atol)
    go = torch.randn_like(out)
    dx, dh, dw, dg, db = op_a.backward(go, x, h, w, gamma, beta, z, m, v, EPS, True, True)
    assert dx.dtype == dtype and dw.dtype == dtype and dg.dtype == torch.float32
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aten_fallback_for_fp64_on_gpu(training):
    """The plain-ATen path that float64 takes on a GPU, run here on CPU against the same references."""
    from rla_ext.triton_kernels import _aten

    cpu = torch.device("cpu")
    x, h, w, gamma, beta, mean, var = (t if t is None else t.to(cpu)
                                       for t in case_a(2, 5, 3, 7, 3, 5, torch.float64, torch.channels_last,
                                                       training))
    out, z, m, v = _aten.concat_conv_bn_act_forward(x, h, w, gamma, beta, mean, var, EPS, True)
    d = [t.clone().requires_grad_() for t in (x, h, w, gamma, beta)]
    r_out, r_z, r_m, r_v = ref_a(*d, mean, var, True)
    for got, want in ((out, r_out), (z, r_z), (m, r_m), (v, r_v)):
        torch.testing.assert_close(got, want.detach())
    assert fmt_of(out) == torch.channels_last
    go = torch.randn_like(out)
    got = _aten.concat_conv_bn_act_backward(go, x, h, w, gamma, beta, z, m, v, EPS, True, training)
    for a, b in zip(got, torch.autograd.grad(r_out, d, go)):
        torch.testing.assert_close(a, b)

    h, y, wo, gamma, beta, mean, var, wr = (t if t is None else t.to(cpu)
                                            for t in case_b(2, 6, 4, 7, 5, True, torch.float64,
                                                            torch.contiguous_format, training))
    out, s, m, v = _aten.rla_update_forward(h, y, wo, gamma, beta, mean, var, wr, True, EPS)
    d = [t.clone().requires_grad_() for t in (h, y, wo, gamma, beta, wr)]
    r_out, r_s, r_m, r_v = ref_b(*d[:5], mean, var, d[5], True)
    for a, b in ((out, r_out), (s, r_s), (m, r_m), (v, r_v)):
        torch.testing.assert_close(a, b.detach())
    go = torch.randn_like(out)
    got = _aten.rla_update_backward(go, h, y, wo, gamma, beta, wr, s, m, v, True, EPS, training)
    want = torch.autograd.grad(r_out, d, go)
    for a, b in zip(got, (want[0], want[1], want[2], want[5], want[3], want[4])):
        torch.testing.assert_close(a, b)
