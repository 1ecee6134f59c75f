"""rla_update: every fused backend against the `torch` reference, the reference against the formula
written here, BatchNorm semantics, odd pooled sizes, and gradcheck in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rla_ext
from rla_ext.ops import rla_update
from rla_testing import (backend_device_params, clone_inputs, compare_with_reference, dtype_supported,
                         is_interpreted, make_update_inputs)

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

# (N, C, k, (H, W) of y): odd sizes (pooling then drops h's last row/col), N=1, H=W=1, primes.
CASES = [(2, 8, 4, (4, 4)), (1, 5, 3, (3, 5)), (3, 7, 2, (1, 1)), (2, 12, 5, (2, 3))]
FORMATS = ["contiguous", "channels_last"]


def formula(h, y, w_out, gamma, beta, mean, var, w_rec, pool, eps):
    """The update written out with explicit pooling, per-pixel products and a padded 3x3 sum."""
    if pool:
        hh, ww = y.shape[2], y.shape[3]
        h = h[:, :, : 2 * hh, : 2 * ww].reshape(h.shape[0], h.shape[1], hh, 2, ww, 2).mean((3, 5))
    s = h + torch.einsum("kc,nchw->nkhw", w_out, y)
    a = torch.tanh((s - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps) * gamma[:, None, None]
                   + beta[:, None, None])
    ap = F.pad(a, (1, 1, 1, 1))
    out = torch.zeros_like(a)
    for i in range(3):
        for j in range(3):
            out += torch.einsum("ok,nkhw->nohw", w_rec[:, :, i, j], ap[:, :, i:i + a.shape[2], j:j + a.shape[3]])
    return out


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_matches_reference(backend, device, dtype, fmt, training, pool, case):
    if not dtype_supported(backend, device, dtype):
        pytest.skip(f"{dtype} is not run for {backend} on {device} (see rla_testing.dtype_supported)")
    n, c, k, hw = case
    inputs = make_update_inputs(n, c, k, hw, pool, dtype, device, fmt, seed=n * 17 + c)
    out = compare_with_reference(rla_update, inputs, backend, dtype, pool=pool, training=training, momentum=0.1,
                                 eps=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("affine", [True, False])
def test_fused_without_affine_or_running_stats(backend, device, affine):
    inputs = make_update_inputs(2, 6, 3, (3, 3), True, torch.float64, device, "channels_last", affine=affine)
    inputs["running_mean"] = inputs["running_var"] = None
    inputs["h"] = inputs["h"].contiguous()  # h in another layout than y: the op conforms it to y
    inputs["out_weight"] = inputs["out_weight"][:, :, 0, 0]  # the 2-D form
    compare_with_reference(rla_update, inputs, backend, torch.float64, pool=True, training=True, momentum=0.2,
                           eps=1e-3)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_matches_formula(pool, training):
    inp = make_update_inputs(2, 5, 3, (3, 5), pool, torch.float64, "cpu", "contiguous")
    rm0, rv0 = inp["running_mean"].clone(), inp["running_var"].clone()
    out = rla_update(**inp, pool=pool, training=training, backend="torch")
    args = (inp["h"], inp["y"], inp["out_weight"][:, :, 0, 0])
    if training:
        h = args[0]
        if pool:
            h = F.avg_pool2d(h, 2)
        s = h + torch.einsum("kc,nchw->nkhw", args[2], args[1])
        mean, var = s.mean((0, 2, 3)), s.var((0, 2, 3), unbiased=False)
        m = s.numel() / s.shape[1]
        torch.testing.assert_close(inp["running_mean"], 0.9 * rm0 + 0.1 * mean)
        torch.testing.assert_close(inp["running_var"], 0.9 * rv0 + 0.1 * var * m / (m - 1))
    else:
        mean, var = rm0, rv0
    expected = formula(*args, inp["bn_weight"], inp["bn_bias"], mean, var, inp["rec_weight"], pool, 1e-5)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in rla_ext.available_backends("cpu") if b != "torch"])
def test_batchnorm_semantics_match_nn_batchnorm(backend):
    k, c = 4, 6
    bn = torch.nn.BatchNorm2d(k, momentum=0.3).double()
    w_out = torch.randn(k, c, 1, 1, dtype=torch.float64)
    w_rec = torch.randn(k, k, 3, 3, dtype=torch.float64)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        h, y = torch.randn(2, k, 6, 6, dtype=torch.float64), torch.randn(2, c, 3, 3, dtype=torch.float64)
        expected = F.conv2d(torch.tanh(bn(F.avg_pool2d(h, 2) + F.conv2d(y, w_out))), w_rec, padding=1)
        got = rla_update(h, y, w_out, bn.weight, bn.bias, rm, rv, w_rec, pool=True, training=True, momentum=0.3,
                         backend=backend)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    bn.eval()
    expected = F.conv2d(torch.tanh(bn(F.avg_pool2d(h, 2) + F.conv2d(y, w_out))), w_rec, padding=1)
    got = rla_update(h, y, w_out, bn.weight, bn.bias, rm, rv, w_rec, pool=True, training=False, backend=backend)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + backend_device_params())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
def test_gradcheck_float64(backend, device, fmt, training, pool):
    inp = clone_inputs(make_update_inputs(1, 3, 2, (3, 1) if pool else (3, 2), pool, torch.float64, device, fmt))
    names = ["h", "y", "out_weight", "bn_weight", "bn_bias", "rec_weight"]

    def fn(*args):
        kw = dict(zip(names, args))
        return rla_update(**kw, running_mean=inp["running_mean"].detach().clone(),
                          running_var=inp["running_var"].detach().clone(), pool=pool, training=training,
                          backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names), fast_mode=is_interpreted(backend, device))
