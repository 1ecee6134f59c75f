"""rla_update(pool=True, pool_mode="ceil"): h pooled to the stride-2 convolutions' size, ceil(Hh / 2),
at any input size, on every backend. Checked against an update written out here (ceil-mode pooling as
explicit zero-padded window sums over explicit window counts), in values, every gradient and the
running statistics; float64 gradcheck; the published default ("floor") still refusing odd sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rla_ext
from rla_ext.ops import rla_update
from rla_ext.ops import _validation as v
from rla_testing import (backend_device_params, compare_with_reference, dtype_supported, is_interpreted,
                         param_dtype, to_format)

ALL = [("torch", "cpu")] + backend_device_params()
# h's (Hh, Wh): both odd, odd x even, even x odd, 1x1, and both even (where ceil equals floor).
SIZES = [(5, 7), (3, 4), (4, 5), (1, 1), (6, 4)]
FORMATS = ["contiguous", "channels_last"]


def ceil_side(n: int) -> int:
    return -(-n // 2)


def make_inputs(n, c, k, hh_wh, dtype, device, fmt, seed=0):
    """Inputs of rla_update with h of size hh_wh and y of the ceil-pooled size."""
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype(dtype)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    hy, wy = ceil_side(hh_wh[0]), ceil_side(hh_wh[1])
    return dict(
        h=to_format(rnd(n, k, *hh_wh), fmt).to(device), y=to_format(rnd(n, c, hy, wy), fmt).to(device),
        out_weight=(rnd(k, c, 1, 1) * c ** -0.5).to(device),
        bn_weight=(1 + 0.3 * rnd(k, dt=pd)).to(device), bn_bias=(0.2 * rnd(k, dt=pd)).to(device),
        running_mean=(0.1 * rnd(k, dt=pd)).to(device),
        running_var=(0.5 + torch.rand(k, generator=g, dtype=torch.float64)).to(pd).to(device),
        rec_weight=(rnd(k, k, 3, 3) * (9 * k) ** -0.5).to(device))


def explicit_ceil_pool(h):
    """2x2 / stride-2 average in ceil mode, written out: zero-pad odd sides, sum every window, divide by
    the number of real (unpadded) values in it."""
    n, k, hh, wh = h.shape
    ph, pw = hh % 2, wh % 2
    ones = torch.ones(1, 1, hh, wh, dtype=h.dtype, device=h.device)
    win = lambda t: F.pad(t, (0, pw, 0, ph)).reshape(t.shape[0], t.shape[1], (hh + ph) // 2, 2,  # noqa: E731
                                                      (wh + pw) // 2, 2).sum((3, 5))
    return win(h) / win(ones)


def explicit_update(h, y, w_out, gamma, beta, rm, rv, w_rec, training, momentum=0.1, eps=1e-5):
    s = explicit_ceil_pool(h) + torch.einsum("kc,nchw->nkhw", w_out.reshape(w_out.shape[0], -1), y)
    a = torch.tanh(F.batch_norm(s, rm, rv, gamma, beta, training, momentum, eps))
    return F.conv2d(a, w_rec, padding=1)


NAMES = ("h", "y", "out_weight", "bn_weight", "bn_bias", "rec_weight")


def run(fn, inp, dtype=None):
    """fn forward + backward (fixed upstream gradient) on fresh leaves -> (out, grads, running stats)."""
    leaves = {}
    for name, t in inp.items():
        t = t.detach().clone(memory_format=torch.preserve_format)
        if dtype is not None:
            t = t.to(dtype)
        leaves[name] = t.requires_grad_(name in NAMES)
    out = fn(**leaves)
    g = torch.Generator().manual_seed(3)
    (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)).sum().backward()
    return out.detach(), {n: leaves[n].grad for n in NAMES}, (leaves["running_mean"], leaves["running_var"])


def test_explicit_pool_is_pytorchs_ceil_mode():
    h = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(explicit_ceil_pool(h), F.avg_pool2d(h, 2, 2, ceil_mode=True), rtol=0, atol=1e-15)
    torch.testing.assert_close(v.pool_state(h, "ceil"), F.avg_pool2d(h, 2, 2, ceil_mode=True), rtol=0, atol=0)
    torch.testing.assert_close(v.pool_state(h, "floor"), F.avg_pool2d(h, 2, 2), rtol=0, atol=0)
    # the edge values are the means of what the windows cover
    torch.testing.assert_close(v.pool_state(h, "ceil")[:, :, 2, 3], h[:, :, 4, 6])
    torch.testing.assert_close(v.pool_state(h, "ceil")[:, :, 0, 3], h[:, :, 0:2, 6].mean(2))


def test_size_arithmetic():
    """Ceil mode gives a stride-2 conv's size (3x3 padding 1, and the 1x1 downsample) at every side."""
    for n in range(1, 40):
        conv3x3 = (n + 2 - 3) // 2 + 1
        conv1x1 = (n - 1) // 2 + 1
        pooled = F.avg_pool2d(torch.zeros(1, 1, n, 2), 2, 2, ceil_mode=True).shape[2]
        assert v.pooled_side(n, "ceil") == conv3x3 == conv1x1 == pooled
        assert v.pooled_side(n, "floor") == n // 2
    assert v.state_size(5, 7, True, "ceil") == (3, 4)
    assert v.state_size(5, 7, True, "floor") == (2, 3)
    assert v.state_size(5, 7, False, "ceil") == (5, 7)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_explicit_update(backend, device, dtype, fmt, training, size):
    n = 2 if size != (1, 1) else 3
    inp = make_inputs(n, 5, 3, size, dtype, device, fmt, seed=size[0] * 7 + size[1])
    got = run(lambda **kw: rla_update(**kw, pool=True, pool_mode="ceil", training=training, backend=backend), inp)
    ref = run(lambda h, y, out_weight, bn_weight, bn_bias, running_mean, running_var, rec_weight: explicit_update(
        h, y, out_weight, bn_weight, bn_bias, running_mean, running_var, rec_weight, training), inp, torch.float64)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=3e-5)
    assert got[0].shape == (n, 3, ceil_side(size[0]), ceil_side(size[1]))
    torch.testing.assert_close(got[0].double(), ref[0], **tol)
    for name in NAMES:
        torch.testing.assert_close(got[1][name].double(), ref[1][name], **tol, msg=lambda m: f"grad of {name}: {m}")
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a.double(), b, **tol)
    want_fmt = torch.channels_last if fmt == "channels_last" and got[0].shape[2:] != (1, 1) else None
    if want_fmt is not None:
        assert got[0].is_contiguous(memory_format=want_fmt)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_matches_reference_backend(backend, device, dtype, fmt):
    """Every fused backend against the torch backend in ceil mode, half precision included (the
    shared tolerances of the op suite)."""
    if not dtype_supported(backend, device, dtype):
        pytest.skip(f"{dtype} is not run for {backend} on {device}")
    inp = make_inputs(2, 6, 4, (5, 6), dtype, device, fmt, seed=11)
    compare_with_reference(rla_update, inp, backend, dtype, pool=True, pool_mode="ceil", training=True,
                           momentum=0.1, eps=1e-5)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("size", [(6, 4), (2, 2)], ids=str)
def test_even_sizes_equal_floor_mode(backend, device, size):
    """Where the published pooling runs, ceil mode gives the same numbers (bit for bit)."""
    inp = make_inputs(2, 4, 3, size, torch.float32, device, "contiguous", seed=5)
    outs = [run(lambda **kw: rla_update(**kw, pool=True, pool_mode=m, training=True, backend=backend), inp)
            for m in ("floor", "ceil")]
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for name in NAMES:
        torch.testing.assert_close(outs[0][1][name], outs[1][1][name], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(backend, device, training):
    inp = make_inputs(1, 3, 2, (3, 5), torch.float64, device, "contiguous", seed=2)
    leaves = [inp[n].clone().requires_grad_() for n in NAMES]

    def fn(*args):
        kw = dict(zip(NAMES, args))
        return rla_update(**kw, running_mean=inp["running_mean"].clone(), running_var=inp["running_var"].clone(),
                          pool=True, pool_mode="ceil", training=training, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=is_interpreted(backend, device))


@pytest.mark.parametrize("backend", rla_ext.available_backends("cpu"))
def test_default_still_refuses_odd_sizes(backend):
    """The published behaviour is the default: the same ValueError as before, now with a hint."""
    inp = make_inputs(2, 4, 3, (5, 7), torch.float32, "cpu", "contiguous")
    with pytest.raises(ValueError, match=r"h: shape \(2, 3, 5, 7\) does not match y \(2, 4, 3, 4\) .*2x2-pooled "
                                         r"spatial size of h, \(2, 3\), must equal y's \(3, 4\)\).*pool_mode='ceil'"):
        rla_update(**inp, pool=True, training=True, backend=backend)
    with pytest.raises(ValueError, match="pool_mode='ceil'"):
        rla_update(**inp, pool=True, pool_mode="floor", training=True, backend=backend)
    # ceil mode checks its own size: a floor-sized y is refused
    inp["y"] = inp["y"][:, :, :2, :3].contiguous()
    with pytest.raises(ValueError, match=r"\(ceil mode\) of h, \(3, 4\), must equal y's \(2, 3\)"):
        rla_update(**inp, pool=True, pool_mode="ceil", training=True, backend=backend)


@pytest.mark.parametrize("bad", ["round", "CEIL", True, None, 1])
def test_pool_mode_validated(bad):
    inp = make_inputs(2, 4, 3, (4, 4), torch.float32, "cpu", "contiguous")
    with pytest.raises(ValueError, match="pool_mode"):
        rla_update(**inp, pool=True, pool_mode=bad, training=True)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_pool_mode_ignored_without_pool(backend, device):
    inp = make_inputs(2, 4, 3, (3, 5), torch.float32, device, "contiguous")
    inp["y"] = torch.randn(2, 4, 3, 5, device=device)
    outs = [rla_update(**inp, pool=False, pool_mode=m, training=False, backend=backend) for m in ("floor", "ceil")]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
