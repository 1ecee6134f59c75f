"""Parity harness for the released-variant model tests: one float64 train + eval round against a
plain-PyTorch reference (outputs, input and parameter gradients, running statistics)."""
from __future__ import annotations

import torch
from torch import nn

from rla_model_testing import assert_grads_close, assert_states_close

TOL = dict(rtol=1e-7, atol=1e-9)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def load_pair(model: nn.Module, ref: nn.Module, randomize, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """float64 copies with the reference's (randomised) weights loaded strictly into the model."""
    ref = randomize(ref.double(), seed)
    model = model.double()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def assert_parity(model: nn.Module, ref: nn.Module, x: torch.Tensor, *, seed: int = 0, modes=(True, False),
                  call=None) -> None:
    """Train then eval: equal outputs, gradients (input and parameters) and state, to 1e-9.

    ``call(module, x)`` maps a module and input to one tensor (default: ``module(x)``). The global
    generator is re-seeded before each forward, so dropout masks agree.
    """
    call = call or (lambda m, t: m(t))
    g = torch.Generator().manual_seed(seed)
    for training in modes:
        model.train(training)
        ref.train(training)
        model.zero_grad()
        ref.zero_grad()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(seed)
        out_a = call(model, xa)
        torch.manual_seed(seed)
        out_b = call(ref, xb)
        torch.testing.assert_close(out_a, out_b, **TOL)
        w = torch.randn(out_a.shape, generator=g, dtype=out_a.dtype)
        (out_a * w).sum().backward()
        (out_b * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        assert_grads_close(model, ref, **TOL)
        assert_states_close(model, ref, **TOL)
