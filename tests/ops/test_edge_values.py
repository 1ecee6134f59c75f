"""NaN and inf go through every fused backend exactly as through the reference: the same elements
are NaN in every output and gradient, and the finite ones agree. torch.relu keeps NaN (a `max(v, 0)`
that turns NaN into 0 is a silent wrong number) and its backward passes the gradient where the
output is NaN (threshold_backward blocks only where the output is <= 0).
"""
from __future__ import annotations

import pytest
import torch

from rla_ext.ops import concat_conv_bn_act, rla_update
from rla_testing import (backend_device_params, clone_inputs, make_ccba_inputs, make_update_inputs, run_op,
                         to_format)

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py


def poke(t: torch.Tensor, values: dict[tuple, float]) -> torch.Tensor:
    t = t.detach().clone(memory_format=torch.preserve_format)
    for idx, v in values.items():
        t[idx] = v
    return t


def assert_same_with_nan(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"{what}: NaN at {torch.isnan(got).sum().item()} elements, reference has {torch.isnan(want).sum().item()}"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got),
                                                                                    torch.isneginf(want)), \
        f"{what}: infinities differ from the reference"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-4, atol=2e-5, msg=lambda m: f"{what}: {m}")


def compare(op, inputs: dict, backend: str, **kwargs) -> None:
    got = run_op(op, clone_inputs(inputs), backend=backend, **kwargs)
    ref = run_op(op, clone_inputs(inputs), backend="torch", **kwargs)
    assert torch.isnan(ref[0]).any(), "the case must put a NaN in the reference output"
    assert_same_with_nan(got[0], ref[0], "output")
    for name in ref[1]:
        assert_same_with_nan(got[1][name], ref[1][name], f"grad of {name}")
    for name in ref[2]:
        assert_same_with_nan(got[2][name], ref[2][name], name)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("training", [False, True])
def test_concat_conv_bn_act_nan_inf(backend, device, fmt, activation, training):
    inp = make_ccba_inputs(2, 6, 3, 5, (4, 5), torch.float32, device, fmt, seed=2)
    # A NaN and both infinities in x, a NaN in h; in eval each only poisons its own pixel.
    inp["x"] = to_format(poke(inp["x"], {(0, 1, 2, 3): float("nan"), (1, 0, 0, 0): float("inf"),
                                         (1, 4, 3, 1): float("-inf")}), fmt)
    inp["h"] = to_format(poke(inp["h"], {(1, 2, 1, 4): float("nan")}), fmt)
    compare(concat_conv_bn_act, inp, backend, training=training, activation=activation)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_concat_conv_bn_act_nan_bias_eval(backend, device, activation):
    """A NaN BatchNorm bias: that channel's output is NaN everywhere, and the ReLU backward passes
    its gradient (the reference's rule), so the input gradients stay finite."""
    inp = make_ccba_inputs(2, 6, 3, 5, (3, 3), torch.float32, device, "contiguous", seed=3)
    inp["bn_bias"] = poke(inp["bn_bias"], {(2,): float("nan")})
    compare(concat_conv_bn_act, inp, backend, training=False, activation=activation)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_rla_update_nan_inf(backend, device, fmt, pool, training):
    inp = make_update_inputs(2, 6, 4, (4, 5), pool, torch.float32, device, fmt, seed=4)
    inp["y"] = to_format(poke(inp["y"], {(0, 1, 2, 3): float("nan"), (1, 3, 0, 0): float("inf")}), fmt)
    inp["h"] = to_format(poke(inp["h"], {(1, 2, 1, 4): float("nan")}), fmt)
    compare(rla_update, inp, backend, training=training, pool=pool)
