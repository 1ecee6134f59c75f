"""Helpers for the model tests: which backends to run, and state comparison."""
from __future__ import annotations

import pytest
import torch

import rla_ext


def kernel_problem(backend: str) -> str | None:
    """None when `backend`'s kernels for both ops load, else why not."""
    if backend == "torch":
        return None
    from rla_ext.ops._kernels import kernels
    try:
        for op in ("concat_conv_bn_act", "rla_update"):
            kernels(op, backend)
    except Exception as exc:  # noqa: BLE001 - report any load failure as the skip reason
        return f"backend {backend!r} is listed as available but its kernels do not load: {exc}"
    return None


INTERPRETED_SKIP = ("Triton runs on CPU only through its interpreter (minutes per model here); the "
                    "reduced-model parity tests cover it, and custom-op tracing is backend-independent")


def backend_params(heavy: bool = False) -> list:
    """Every backend rla_ext.available_backends('cpu') lists here. `heavy` tests skip Triton's CPU
    interpreter (correct but orders of magnitude slower; the reduced models cover it)."""
    params = []
    for b in rla_ext.available_backends("cpu"):
        marks = []
        problem = kernel_problem(b)
        if problem:
            marks.append(pytest.mark.skip(reason=problem))
        elif heavy and b == "triton":
            marks.append(pytest.mark.skip(reason=INTERPRETED_SKIP))
        params.append(pytest.param(b, marks=marks, id=b))
    return params


def assert_states_close(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)
        else:
            assert torch.equal(sa[k], sb[k]), k


def assert_grads_close(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    pb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        q = pb[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=name: f"grad {n}: {m}", **tol)
