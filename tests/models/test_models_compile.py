"""torch.compile and torch.export of RLA models (the custom ops must trace without graph breaks)."""
from __future__ import annotations

import pytest
import torch

from rla_model_testing import backend_params
from rla_ext import models


def _model(backend):
    torch.manual_seed(0)
    return models.rla_resnet29_bottleneck(10, 8, backend=backend)


@pytest.mark.parametrize("backend", backend_params(heavy=True))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_aot_eager(backend, training):
    """aot_eager traces forward AND backward through the ops' fake kernels; fullgraph forbids breaks."""
    eager, compiled_src = _model(backend), _model(backend)
    eager.train(training)
    compiled_src.train(training)
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    if training:
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        for (n, p), q in zip(eager.named_parameters(), compiled_src.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=n)
        for (n, b), c in zip(eager.named_buffers(), compiled_src.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params(heavy=True))
def test_compile_inductor_train_step(backend):
    eager, src = _model(backend), _model(backend)
    compiled = torch.compile(src, fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    out_c.sum().backward()
    assert all(p.grad is not None for p in src.parameters())


@pytest.mark.parametrize("backend", backend_params(heavy=True))
def test_export_eval_model(backend):
    m = _model(backend).eval()
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-6)
