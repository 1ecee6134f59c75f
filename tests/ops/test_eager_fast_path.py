"""Plain eager calls skip the custom-op dispatcher; anything that traces sees operators with fake kernels.

The fused backends' autograd Functions call the Python bodies of rla_ext::<op>_fwd / _bwd directly in
plain eager execution (rla_ext.ops._kernels.eager_fast_path). While something traces, a backend whose
kernels are C++ operators (cpp: TRACED_KERNEL_BACKENDS) still runs the bodies, so dispatch modes, fake
tensors and torch.compile see the kernel ops rla_ext::<op>_kernel_fwd / _bwd and the BatchNorm
bookkeeping as ordinary ops; a Python-kernel backend (triton) is seen as the custom ops. These tests
pin every side.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import rla_ext
import rla_ext._backend
from rla_ext import ops
from rla_testing import make_ccba_inputs, make_update_inputs

CASES = {
    "concat_conv_bn_act": (ops.concat_conv_bn_act,
                           lambda: make_ccba_inputs(2, 6, 4, 5, (3, 4), torch.float32, "cpu", "channels_last")),
    "rla_update": (lambda **kw: ops.rla_update(**kw, pool=True),
                   lambda: make_update_inputs(2, 6, 4, (3, 4), True, torch.float32, "cpu", "channels_last")),
}


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


def _grad_inputs(inputs: dict) -> dict:
    out = {}
    for k, t in inputs.items():
        if isinstance(t, torch.Tensor) and k not in ("running_mean", "running_var"):
            t = t.detach().requires_grad_()
        out[k] = t
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_eager_skips_the_custom_op_but_runs_the_kernel(name):
    op, make = CASES[name]
    inputs = _grad_inputs(make())
    with torch.profiler.profile() as prof:
        op(**inputs, training=True, backend="cpp").sum().backward()
    events = {e.name for e in prof.events()}
    assert f"rla_ext::{name}_kernel_fwd" in events and f"rla_ext::{name}_kernel_bwd" in events
    assert f"rla_ext::{name}_fwd" not in events and f"rla_ext::{name}_bwd" not in events


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatch_modes_see_the_cpp_kernel_ops_and_the_running_update(name):
    op, make = CASES[name]
    inputs = _grad_inputs(make())
    log = _OpLog()
    with log:
        op(**inputs, training=True, backend="cpp").sum().backward()
    assert f"rla_ext::{name}_kernel_fwd" in log.names and f"rla_ext::{name}_kernel_bwd" in log.names
    assert f"rla_ext::{name}_fwd" not in log.names and f"rla_ext::{name}_bwd" not in log.names
    assert "aten::lerp_.Scalar" in log.names  # the running mean's update, visible to the tracer


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatch_modes_see_the_custom_ops_of_python_kernels(name):
    if rla_ext._backend.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("triton is not available on CPU here")
    op, make = CASES[name]
    inputs = _grad_inputs(make())
    log = _OpLog()
    with log:
        op(**inputs, training=True, backend="triton").sum().backward()
    assert f"rla_ext::{name}_fwd" in log.names and f"rla_ext::{name}_bwd" in log.names


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_tensors_go_through_the_fake_kernels(name):
    op, make = CASES[name]
    real = make()
    expected = op(**{k: (t.clone() if isinstance(t, torch.Tensor) else t) for k, t in real.items()},
                  training=True, backend="cpp")
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for k, t in real.items()}
        out = op(**fake, training=True, backend="cpp")
        assert out.shape == expected.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
