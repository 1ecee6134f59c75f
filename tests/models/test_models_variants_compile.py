"""torch.compile(fullgraph=True), autocast and backend-routing smoke tests for one small configuration
of each model family added after RLA-ResNet: ConvGRU / ConvLSTM RLA-ResNet, (ds)RLA-MobileNetV2,
RLA-DenseNet and the detection backbone."""
from __future__ import annotations

import pytest
import torch

from rla_ext import models

SETTING = [[1, 8, 1, 1], [2, 8, 2, 2], [2, 16, 1, 2]]

BUILD = {
    "gru": lambda: models.RLAgru_ResNet((1, 1), 10, 8, widths=(8, 16)),
    "lstm": lambda: models.RLAlstm_ResNet((1, 1), 10, 8, widths=(8, 16)),
    "mobilenetv2": lambda: models.RLA_MobileNetV2(10, 0.5, 8, SETTING),
    "dsrla_mobilenetv2_eca": lambda: models.dsRLA_MobileNetV2(10, 0.5, 8, SETTING, ECA=True),
    "densenet": lambda: models.RLADenseNet((2, 2), 4, 8, num_classes=10, rla_channel=8, stem="cifar"),
    "detection": lambda: models.RLA_ResNet(layers=[1, 1], rla_channel=8, widths=(8, 16), norm_eval=False,
                                           frozen_stages=0),
}
SIZE = {"densenet": 16}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = BUILD[name]()
    if hasattr(m, "classifier") and isinstance(m.classifier, torch.nn.Sequential):
        m.classifier[0].p = 0.0  # dropout off: compiled and eager draw masks differently
    return m


def _loss(out) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.square().mean() for o in outs)


@pytest.mark.parametrize("name", list(BUILD))
def test_compile_fullgraph_train_step(name):
    """aot_eager traces forward and backward through the fused ops' fake kernels without graph breaks;
    outputs, gradients and running statistics match eager."""
    eager, src = _build(name).train(), _build(name).train()
    compiled = torch.compile(src, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, SIZE.get(name, 32), SIZE.get(name, 32))
    out_e, out_c = eager(x), compiled(x)
    for a, b in zip(out_e if isinstance(out_e, tuple) else (out_e,), out_c if isinstance(out_c, tuple) else (out_c,)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    _loss(out_e).backward()
    _loss(out_c).backward()
    for (n, p), q in zip(eager.named_parameters(), src.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=n)
    for (n, b), c in zip(eager.named_buffers(), src.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", list(BUILD))
def test_bf16_autocast(name):
    m = _build(name).train()
    x = torch.randn(2, 3, SIZE.get(name, 32), SIZE.get(name, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)
    _loss(tuple(o.float() for o in outs)).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("name", list(BUILD))
def test_fused_ops_follow_the_model_backend(name):
    """Every family routes its fused parts through rla_ext.ops: a backend that cannot run on CPU
    tensors is refused, and the selection in force (None) runs."""
    import rla_ext

    m = _build(name).eval()
    x = torch.randn(1, 3, SIZE.get(name, 32), SIZE.get(name, 32))
    m.set_backend("cuda")
    with pytest.raises(rla_ext.BackendUnavailableError):
        m(x)
    m.set_backend(None)
    with rla_ext.use_backend("torch"):
        m(x)
