"""The C++ autograd path (csrc/autograd.cpp) is the Python Function path, bitwise, wherever it is taken.

Plain eager calls on a backend in rla_ext.ops._kernels.CPP_AUTOGRAD_BACKENDS run the kernels under a
C++ torch::autograd::Function (rla_ext::<op>_autograd) instead of the Python autograd.Function. Both
call the same kernels with the same arguments, so outputs, every gradient and the running statistics
must be identical; these tests run each case both ways (the Python path by emptying
CPP_AUTOGRAD_BACKENDS) and check which path ran.
"""
from __future__ import annotations

import pytest
import torch

from rla_ext import ops
from rla_ext.ops import _kernels
from rla_testing import clone_inputs, make_ccba_inputs, make_entry3x3_inputs, make_update_inputs, run_op

# name -> (op, its C++ autograd op, inputs(dtype, fmt), extra kwargs)
CASES = {
    "concat_conv_bn_act": (ops.concat_conv_bn_act, "concat_conv_bn_act_autograd",
                           lambda dt, fmt: make_ccba_inputs(3, 6, 4, 5, (5, 3), dt, "cpu", fmt), {}),
    "concat_conv3x3_bn_act": (ops.concat_conv3x3_bn_act, "concat_conv3x3_bn_act_autograd",
                              lambda dt, fmt: make_entry3x3_inputs(2, 5, 3, 4, (7, 5), dt, fmt), dict(stride=2)),
    "rla_update": (ops.rla_update, "rla_update_autograd",
                   lambda dt, fmt: make_update_inputs(2, 6, 4, (3, 5), True, dt, "cpu", fmt), dict(pool=True)),
}


def _both_ways(monkeypatch, fn):
    """fn() on the C++ path, then on the Python Function path; asserts which one ran each time."""
    with torch.profiler.profile() as prof:
        got = fn()
    got_events = {e.name for e in prof.events()}
    monkeypatch.setattr(_kernels, "CPP_AUTOGRAD_BACKENDS", ())
    with torch.profiler.profile() as prof:
        ref = fn()
    ref_events = {e.name for e in prof.events()}
    monkeypatch.undo()
    return got, got_events, ref, ref_events


def _assert_identical(got, ref) -> None:
    out, grads, stats = got
    ref_out, ref_grads, ref_stats = ref
    assert torch.equal(out, ref_out)
    assert out.stride() == ref_out.stride()
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
        assert grads[name].dtype == ref_grads[name].dtype, name
    for name in ref_stats:
        assert torch.equal(stats[name], ref_stats[name]), name


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "contiguous"), (torch.float32, "channels_last"),
                                       (torch.float64, "contiguous"), (torch.bfloat16, "channels_last")])
def test_cpp_autograd_is_the_python_path_bitwise(monkeypatch, name, training, dtype, fmt):
    op, autograd_op, make, kw = CASES[name]
    inputs = make(dtype, fmt)
    got, got_events, ref, ref_events = _both_ways(
        monkeypatch, lambda: run_op(op, clone_inputs(inputs), backend="cpp", training=training, **kw))
    assert f"rla_ext::{autograd_op}" in got_events
    assert f"rla_ext::{autograd_op}" not in ref_events and f"rla_ext::{name}_kernel_bwd" in ref_events
    _assert_identical(got, ref)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpp_autograd_under_autocast_no_grad_and_inference_mode(monkeypatch, name):
    op, autograd_op, make, kw = CASES[name]
    inputs = make(torch.float32, "channels_last")

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_op(op, clone_inputs(inputs), backend="cpp", training=True, **kw)

    got, got_events, ref, _ = _both_ways(monkeypatch, autocast)
    assert f"rla_ext::{autograd_op}" in got_events
    assert got[0].dtype == torch.bfloat16
    _assert_identical(got, ref)
    for context in (torch.no_grad, torch.inference_mode):
        def forward_only():
            with context():
                fresh = clone_inputs(inputs)
                return op(**fresh, backend="cpp", training=True, **kw), fresh["running_mean"]
        (out, rm), events, (ref_out, ref_rm), _ = _both_ways(monkeypatch, forward_only)
        assert f"rla_ext::{autograd_op}" in events
        assert out.grad_fn is None
        assert torch.equal(out, ref_out) and torch.equal(rm, ref_rm)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpp_autograd_backward_edge_cases(name):
    """A non-contiguous, other-dtype upstream gradient; only some inputs needing grad; backward twice with
    retain_graph (gradients accumulate); an output that takes no part in the loss."""
    op, _, make, kw = CASES[name]
    inputs = make(torch.float64, "channels_last")
    fresh = clone_inputs(inputs)
    ref = clone_inputs(inputs)
    out = op(**fresh, backend="cpp", training=True, **kw)
    ref_out = op(**ref, backend="torch", training=True, **kw)
    upstream = torch.randn(out.shape[::-1], dtype=torch.float64).permute(3, 2, 1, 0)  # not contiguous
    (out * upstream).sum().backward(retain_graph=True)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward(retain_graph=True)
    (ref_out * upstream).sum().backward()
    for key, t in fresh.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            torch.testing.assert_close(t.grad, ref[key].grad, rtol=1e-9, atol=1e-9, msg=key)
    # Only the weight needs a gradient; nothing needs one (the op still runs, records nothing).
    frozen = {k: (t.detach() if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()}
    weight_key = "out_weight" if name == "rla_update" else "weight"
    frozen[weight_key] = frozen[weight_key].clone().requires_grad_()
    op(**frozen, backend="cpp", training=True, **kw).sum().backward()
    assert frozen[weight_key].grad is not None and torch.isfinite(frozen[weight_key].grad).all()
    frozen[weight_key] = frozen[weight_key].detach()
    assert op(**frozen, backend="cpp", training=True, **kw).grad_fn is None
