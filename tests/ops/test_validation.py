"""Every validation error: the right exception type, naming the argument, before any backend runs."""
from __future__ import annotations

import pytest
import torch

import rla_ext
from rla_ext.ops import concat_conv_bn_act, rla_update
from rla_testing import make_ccba_inputs, make_update_inputs

BACKENDS = rla_ext.available_backends("cpu")


def ccba(**overrides):
    inp = make_ccba_inputs(2, 4, 2, 3, (3, 3), torch.float32, "cpu", "contiguous")
    kw = dict(training=True)
    for key, value in overrides.items():
        (inp if key in inp else kw)[key] = value
    return inp, kw


def upd(**overrides):
    inp = make_update_inputs(2, 4, 2, (3, 3), True, torch.float32, "cpu", "contiguous")
    kw = dict(training=True, pool=True)
    for key, value in overrides.items():
        (inp if key in inp else kw)[key] = value
    return inp, kw


CCBA_ERRORS = [
    (dict(x=[1.0]), TypeError, "x"),
    (dict(x=torch.randn(2, 4, 3)), ValueError, "x"),
    (dict(x=torch.randint(0, 3, (2, 4, 3, 3))), TypeError, "x"),
    (dict(h=torch.randn(2, 2, 3, 3, dtype=torch.float64)), TypeError, "h"),
    (dict(h=torch.randn(1, 2, 3, 3)), ValueError, "h"),  # batch 1 would broadcast: refused
    (dict(h=torch.randn(2, 2, 3, 4)), ValueError, "h"),
    (dict(weight=torch.randn(3, 5, 1, 1)), ValueError, "weight"),  # C + k mismatch
    (dict(weight=torch.randn(3, 6, 3, 3)), ValueError, "weight"),  # not 1x1
    (dict(weight=torch.randn(3, 6, 1)), ValueError, "weight"),
    (dict(weight=torch.randn(3, 6, dtype=torch.float64)), TypeError, "weight"),
    (dict(bn_weight=torch.randn(4)), ValueError, "bn_weight"),
    (dict(bn_bias=torch.randn(3, 1)), ValueError, "bn_bias"),
    (dict(running_mean=torch.randn(5)), ValueError, "running_mean"),
    (dict(running_var=None), ValueError, "running_var"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "running_mean"),
    (dict(training=1), TypeError, "training"),
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(backend="numba"), ValueError, "backend"),
    (dict(x=torch.randn(1, 4, 1, 1), h=torch.randn(1, 2, 1, 1)), ValueError, "more than 1 value per channel"),
    (dict(x=torch.randn(2, 4, 0, 3), h=torch.randn(2, 2, 0, 3)), ValueError, "non-empty"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,exc,needle", CCBA_ERRORS, ids=[f"{e.__name__}-{n}" for _, e, n in CCBA_ERRORS])
def test_concat_conv_bn_act_errors(backend, overrides, exc, needle):
    inp, kw = ccba(**overrides)
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=needle):
        concat_conv_bn_act(**inp, **kw)


UPD_ERRORS = [
    (dict(y=torch.randn(2, 4, 3)), ValueError, "y"),
    (dict(h=torch.randn(2, 2, 6, 6).half()), TypeError, "h"),
    (dict(h=torch.randn(2, 2, 3, 3)), ValueError, "h"),  # not pooled to y's size
    (dict(h=torch.randn(1, 2, 6, 6)), ValueError, "h"),
    (dict(out_weight=torch.randn(2, 5, 1, 1)), ValueError, "out_weight"),
    (dict(out_weight=torch.randn(3, 4, 1, 1)), ValueError, "out_weight"),
    (dict(rec_weight=torch.randn(2, 2, 1, 1)), ValueError, "rec_weight"),
    (dict(rec_weight=torch.randn(2, 3, 3, 3)), ValueError, "rec_weight"),
    (dict(rec_weight=torch.randn(2, 2, 3, 3, dtype=torch.float64)), TypeError, "rec_weight"),
    (dict(bn_weight=torch.randn(3)), ValueError, "bn_weight"),
    (dict(running_var=torch.randn(2, 2)), ValueError, "running_var"),
    (dict(pool="yes"), TypeError, "pool"),
    (dict(pool=False), ValueError, "h"),
    (dict(y=torch.randn(1, 4, 1, 1), h=torch.randn(1, 2, 2, 2)), ValueError, "more than 1 value per channel"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,exc,needle", UPD_ERRORS, ids=[f"{e.__name__}-{n}" for _, e, n in UPD_ERRORS])
def test_rla_update_errors(backend, overrides, exc, needle):
    inp, kw = upd(**overrides)
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=needle):
        rla_update(**inp, **kw)


def test_device_mismatch_names_argument():
    inp, kw = ccba()
    inp["weight"] = inp["weight"].to("meta")
    with pytest.raises(ValueError, match="weight: expected device cpu"):
        concat_conv_bn_act(**inp, **kw)


def test_sparse_layout_refused():
    inp, kw = ccba()
    inp["x"] = inp["x"].to_sparse()
    with pytest.raises(ValueError, match="x: expected a dense"):
        concat_conv_bn_act(**inp, **kw)


def test_single_value_per_channel_allowed_in_eval():
    inp, kw = ccba(x=torch.randn(1, 4, 1, 1), h=torch.randn(1, 2, 1, 1), training=False)
    assert concat_conv_bn_act(**inp, **kw).shape == (1, 3, 1, 1)
