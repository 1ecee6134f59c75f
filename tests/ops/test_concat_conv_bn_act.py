"""concat_conv_bn_act: every fused backend against the `torch` reference, the reference against the
formula written here, BatchNorm semantics against nn.BatchNorm2d, and gradcheck in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rla_ext
from rla_ext.ops import concat_conv_bn_act
from rla_testing import (backend_device_params, clone_inputs, compare_with_reference, dtype_supported,
                         is_interpreted, make_ccba_inputs)

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

# (N, C, k, C_out, (H, W)): odd sizes, N=1, H=W=1, primes.
CASES = [(2, 8, 4, 6, (5, 5)), (1, 3, 2, 5, (7, 3)), (3, 5, 1, 7, (1, 1)), (2, 13, 3, 11, (2, 5))]
FORMATS = ["contiguous", "channels_last"]


def formula(x, h, w, gamma, beta, mean, var, eps, relu):
    """The op written out: per-pixel matrix product over [x; h], then affine normalisation."""
    z = torch.einsum("oc,nchw->nohw", w[:, : x.shape[1]], x) + torch.einsum("ok,nkhw->nohw", w[:, x.shape[1]:], h)
    out = (z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    out = out * gamma[None, :, None, None] + beta[None, :, None, None]
    return out.clamp_min(0) if relu else out


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_matches_reference(backend, device, dtype, fmt, training, case):
    if not dtype_supported(backend, device, dtype):
        pytest.skip(f"{dtype} is not run for {backend} on {device} (see rla_testing.dtype_supported)")
    n, c, k, co, hw = case
    inputs = make_ccba_inputs(n, c, k, co, hw, dtype, device, fmt, seed=n * 31 + c)
    out = compare_with_reference(concat_conv_bn_act, inputs, backend, dtype, training=training, momentum=0.1,
                                 eps=1e-5, activation="relu")
    assert out.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("weight_2d", [True, False])
def test_fused_activation_none_affine_and_2d_weight(backend, device, affine, weight_2d):
    inputs = make_ccba_inputs(2, 6, 3, 5, (3, 4), torch.float64, device, "contiguous", affine=affine,
                              weight_2d=weight_2d)
    compare_with_reference(concat_conv_bn_act, inputs, backend, torch.float64, training=True, momentum=0.3,
                           eps=1e-3, activation="none")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_fused_without_running_stats_and_mixed_layouts(backend, device):
    inputs = make_ccba_inputs(2, 6, 3, 5, (4, 4), torch.float64, device, "channels_last")
    inputs["running_mean"] = inputs["running_var"] = None
    inputs["h"] = inputs["h"].contiguous()  # h in another layout than x: the op conforms it to x
    compare_with_reference(concat_conv_bn_act, inputs, backend, torch.float64, training=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_matches_formula(fmt, training):
    inp = make_ccba_inputs(2, 5, 3, 4, (3, 3), torch.float64, "cpu", fmt)
    rm0, rv0 = inp["running_mean"].clone(), inp["running_var"].clone()
    out = concat_conv_bn_act(**inp, training=training, eps=1e-5, backend="torch")
    x, h, w = inp["x"], inp["h"], inp["weight"][:, :, 0, 0]
    if training:
        z = formula(x, h, w, torch.ones(4, dtype=x.dtype), torch.zeros(4, dtype=x.dtype), 0 * rm0, 1 + 0 * rv0, 0, 0)
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
        m = z.numel() / z.shape[1]
        torch.testing.assert_close(inp["running_mean"], 0.9 * rm0 + 0.1 * mean)
        torch.testing.assert_close(inp["running_var"], 0.9 * rv0 + 0.1 * var * m / (m - 1))
    else:
        mean, var = rm0, rv0
    torch.testing.assert_close(out, formula(x, h, w, inp["bn_weight"], inp["bn_bias"], mean, var, 1e-5, True))


@pytest.mark.parametrize("backend", ["torch"] + [b for b in rla_ext.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_batchnorm_semantics_match_nn_batchnorm(backend, momentum):
    """Running statistics and eval output equal nn.BatchNorm2d's over a few steps (fp64)."""
    inp = make_ccba_inputs(3, 4, 2, 5, (3, 3), torch.float64, "cpu", "contiguous")
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).double()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    w4 = inp["weight"]
    for step in range(3):
        x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
        h = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        expected = F.relu(bn(F.conv2d(torch.cat((x, h), 1), w4)))
        got = concat_conv_bn_act(x, h, w4, bn.weight, bn.bias, rm, rv, training=True, momentum=momentum,
                                 backend=backend)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    bn.eval()
    expected = F.relu(bn(F.conv2d(torch.cat((x, h), 1), w4)))
    torch.testing.assert_close(concat_conv_bn_act(x, h, w4, bn.weight, bn.bias, rm, rv, training=False,
                                                  backend=backend), expected)


@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + backend_device_params())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [(1, 3, 2, 3, (3, 1)), (2, 2, 3, 5, (1, 3))], ids=str)
def test_gradcheck_float64(backend, device, fmt, training, case):
    n, c, k, co, hw = case
    inp = clone_inputs(make_ccba_inputs(n, c, k, co, hw, torch.float64, device, fmt))
    names = ["x", "h", "weight", "bn_weight", "bn_bias"]

    def fn(*args):
        kw = dict(zip(names, args))
        # Fresh running stats per call: gradcheck re-runs forward many times.
        return concat_conv_bn_act(**kw, running_mean=inp["running_mean"].detach().clone(),
                                  running_var=inp["running_var"].detach().clone(), training=training,
                                  backend=backend, activation="none")

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names), fast_mode=is_interpreted(backend, device))
