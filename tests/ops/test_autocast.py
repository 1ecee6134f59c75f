"""Both ops under ``torch.autocast("cpu", dtype=torch.bfloat16)``: every CPU fused backend against the
`torch` reference under the same autocast (half-precision bar: error against a float64 reference at most
twice eager's, plus atol), bf16 outputs, float32 running statistics, float32 gradients for float32
leaves; and a small RLA model trained one step under autocast."""
from __future__ import annotations

import pytest
import torch

import rla_ext
from rla_ext.ops import concat_conv_bn_act, rla_update
from rla_testing import (assert_close, clone_inputs, dtype_supported, fused_backends, make_ccba_inputs,
                         make_update_inputs, run_op)

AMP = torch.bfloat16


def _backends() -> list:
    params = []
    for b in fused_backends("cpu"):
        marks = [] if dtype_supported(b, "cpu", AMP) else [
            pytest.mark.skip(reason="Triton's CPU interpreter has no bfloat16 (see rla_testing.dtype_supported)")]
        params.append(pytest.param(b, marks=marks, id=b))
    return params or [pytest.param("none", marks=pytest.mark.skip(reason="no fused CPU backend"))]


def _compare_under_autocast(op, inputs: dict, backend: str, **kwargs) -> None:
    """float32 inputs, autocast to bf16 around the call (forward and backward, as a training loop does)."""
    with torch.autocast("cpu", dtype=AMP):
        got = run_op(op, clone_inputs(inputs), backend=backend, **kwargs)
        ref = run_op(op, clone_inputs(inputs), backend="torch", **kwargs)
    ref64 = run_op(op, clone_inputs(inputs, torch.float64), backend="torch", **kwargs)
    assert got[0].dtype == AMP and ref[0].dtype == AMP
    assert_close(got[0], ref[0], AMP, "output", ref64[0])
    for name, g in ref[1].items():
        # Leaves are float32 master copies; the autocast cast's backward returns float32 gradients.
        assert got[1][name].dtype == inputs[name].dtype, name
        assert_close(got[1][name], g, AMP, f"grad of {name}", ref64[1][name])
    for name, s in ref[2].items():
        assert got[2][name].dtype == torch.float32, f"{name} must stay float32 under autocast"
        assert_close(got[2][name], s, AMP, name, ref64[2][name])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_concat_conv_bn_act_autocast(backend, fmt, training, activation):
    inputs = make_ccba_inputs(3, 12, 4, 10, (5, 7), torch.float32, "cpu", fmt, seed=3)
    _compare_under_autocast(concat_conv_bn_act, inputs, backend, training=training, momentum=0.1, eps=1e-5,
                            activation=activation)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
def test_rla_update_autocast(backend, fmt, training, pool):
    inputs = make_update_inputs(2, 12, 6, (5, 6), pool, torch.float32, "cpu", fmt, seed=4)
    _compare_under_autocast(rla_update, inputs, backend, pool=pool, training=training, momentum=0.1, eps=1e-5)


def test_float64_is_left_alone_under_autocast():
    # autocast never lowers float64; neither do the ops (gradcheck relies on it).
    inputs = make_ccba_inputs(2, 4, 2, 3, (3, 3), torch.float64, "cpu", "contiguous")
    for backend in ["torch", *fused_backends("cpu")]:
        with torch.autocast("cpu", dtype=AMP):
            out, grads, stats = run_op(concat_conv_bn_act, clone_inputs(inputs), backend=backend, training=True)
        assert out.dtype == torch.float64 and grads["x"].dtype == torch.float64
        assert stats["running_mean"].dtype == torch.float64


def _model(backend: str) -> torch.nn.Module:
    from rla_ext.models import rla_resnet_cifar
    torch.manual_seed(0)
    # Bottleneck blocks: their entry is the fused concat op, and every block runs the fused update.
    return rla_resnet_cifar(11, num_classes=5, rla_channel=4, bottleneck=True, widths=(4, 8, 8), backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_model_forward_backward_autocast(backend):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3])
    runs = {}
    for name in (backend, "torch"):
        model = _model(name).train()
        with torch.autocast("cpu", dtype=AMP):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        assert logits.dtype == AMP
        runs[name] = (logits.detach(), model)
    ref64 = _model("torch").double().train()
    logits64 = ref64(x.double())
    torch.nn.functional.cross_entropy(logits64, target).backward()

    (got, m_got), (ref, m_ref) = runs[backend], runs["torch"]
    assert_close(got, ref, AMP, "logits", logits64)
    p64 = dict(ref64.named_parameters())
    b64 = dict(ref64.named_buffers())
    for name, p in m_got.named_parameters():
        q = dict(m_ref.named_parameters())[name]
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        assert_close(p.grad, q.grad, AMP, f"grad {name}", p64[name].grad)
    for name, b in m_got.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32, name
            assert_close(b, dict(m_ref.named_buffers())[name], AMP, name, b64[name])
