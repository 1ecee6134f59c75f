"""The fused paths as torch.library custom ops: opcheck, and torch.compile(fullgraph=True) tracing a
function that calls both ops with no graph break, matching eager in values and gradients."""
from __future__ import annotations

import functools

import pytest
import torch

import rla_ext
from rla_ext.ops import concat_conv_bn_act, rla_update
from rla_testing import (backend_device_params, clone_inputs, make_ccba_inputs, make_update_inputs,
                          opcheck_kernel_calls)


def _canonical_ccba(device, fmt):
    inp = make_ccba_inputs(2, 5, 3, 4, (3, 3), torch.float32, device, fmt)
    return (inp["x"], inp["h"], inp["weight"][:, :, 0, 0].contiguous(), inp["bn_weight"], inp["bn_bias"],
            inp["running_mean"], inp["running_var"])


def _canonical_update(device, fmt):
    inp = make_update_inputs(2, 5, 3, (3, 3), True, torch.float32, device, fmt)
    return (inp["h"], inp["y"], inp["out_weight"][:, :, 0, 0].contiguous(), inp["bn_weight"], inp["bn_bias"],
            inp["running_mean"], inp["running_var"], inp["rec_weight"])


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_forward_ops(backend, device, fmt, training):
    x, h, w, g, b, rm, rv = _canonical_ccba(device, fmt)
    torch.library.opcheck(torch.ops.rla_ext.concat_conv_bn_act_fwd.default,
                          (x, h, w, g, b, rm, rv, training, 0.1, 1e-5, True, backend))
    hh, y, wo, g, b, rm, rv, wr = _canonical_update(device, fmt)
    torch.library.opcheck(torch.ops.rla_ext.rla_update_fwd.default,
                          (hh, y, wo, g, b, rm, rv, wr, True, training, 0.1, 1e-5, backend))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["concat_conv_bn_act", "rla_update"])
def test_opcheck_cpp_kernel_ops(name, fmt, training):
    """The C++ kernel ops that torch.compile records on cpp (their fake kernels), as the op calls them."""
    if "cpp" not in rla_ext.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    if name == "concat_conv_bn_act":
        inp = clone_inputs(make_ccba_inputs(2, 5, 3, 4, (3, 3), torch.float32, "cpu", fmt))
    else:
        inp = clone_inputs(make_update_inputs(2, 5, 3, (3, 3), True, torch.float32, "cpu", fmt))
    op = concat_conv_bn_act if name == "concat_conv_bn_act" else functools.partial(rla_update, pool=True)
    with opcheck_kernel_calls(name):
        op(**inp, training=training, backend="cpp").sum().backward()


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_opcheck_backward_ops(backend, device, fmt):
    x, h, w, g, b, rm, rv = _canonical_ccba(device, fmt)
    out, z, mean, var = torch.ops.rla_ext.concat_conv_bn_act_fwd(x, h, w, g, b, rm, rv, True, 0.1, 1e-5, True,
                                                                  backend)
    torch.library.opcheck(torch.ops.rla_ext.concat_conv_bn_act_bwd.default,
                          (torch.randn_like(out), x, h, w, g, b, z, mean, var, 1e-5, True, True, backend))
    hh, y, wo, g, b, rm, rv, wr = _canonical_update(device, fmt)
    out, s, mean, var = torch.ops.rla_ext.rla_update_fwd(hh, y, wo, g, b, rm, rv, wr, True, True, 0.1, 1e-5, backend)
    torch.library.opcheck(torch.ops.rla_ext.rla_update_bwd.default,
                          (torch.randn_like(out), hh, y, wo, g, b, wr, s, mean, var, True, 1e-5, True, backend))


def _block(x, h, a, u, backend):
    """Block entry then the state update, the way an RLA bottleneck chains the two ops."""
    z = concat_conv_bn_act(x, h, a["weight"], a["bn_weight"], a["bn_bias"], a["running_mean"], a["running_var"],
                           training=True, backend=backend)
    h2 = rla_update(h, z, u["out_weight"], u["bn_weight"], u["bn_bias"], u["running_mean"], u["running_var"],
                    u["rec_weight"], training=True, backend=backend)
    return z.sum((2, 3)).mean() + h2.square().mean()


@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + backend_device_params())
def test_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    a0 = make_ccba_inputs(2, 5, 3, 6, (4, 4), torch.float32, device, "channels_last")
    u0 = make_update_inputs(2, 6, 3, (4, 4), False, torch.float32, device, "channels_last")
    results = []
    for compiled in (False, True):
        a, u = clone_inputs(a0), clone_inputs(u0)
        x, h = a.pop("x"), a.pop("h")
        u.pop("y")
        u.pop("h")
        fn = torch.compile(_block, fullgraph=True, backend="aot_eager") if compiled else _block
        loss = fn(x, h, a, u, backend)
        loss.backward()
        results.append((loss.detach(), x.grad, h.grad, a["weight"].grad, u["rec_weight"].grad,
                        a["running_mean"], u["running_var"]))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
