"""Shared test helpers: which backends/devices/dtypes to run, per-dtype tolerances, input builders."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import rla_ext

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)
# For float32/float64, fused paths are compared element-wise with the reference in the same dtype.
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}
# For half precision the bar is relative to eager PyTorch in the same dtype (STYLE.md): the fused
# error against a float64 reference may be at most twice eager's error, plus this small atol.
HALF_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def devices() -> list:
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
    return ["cpu", cuda]


def fused_backends(device: str) -> list[str]:
    """Fused backends that can run on `device` here (the reference `torch` is what they are checked against)."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in rla_ext.available_backends(device) if b != "torch"]


def backend_device_params() -> list:
    """(backend, device) pairs: every fused backend available here, plus a visible failure if none is."""
    params = [(b, d) for d in ("cpu", "cuda") for b in fused_backends(d)]
    if not params:
        params = [pytest.param("none", "cpu", marks=pytest.mark.skip(reason="no fused backend is available"))]
    return params


def dtype_supported(backend: str, device: str, dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter executes through NumPy, which has no bfloat16 / reliable float16 matmul;
    those dtypes are exercised for Triton on the GPU."""
    if backend == "triton" and device == "cpu":
        return dtype in (torch.float32, torch.float64)
    return True


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def to_format(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm parameters/statistics: float32 beside half activations (the mixed-precision norm)."""
    return torch.float32 if dtype in HALF else dtype


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype, what: str,
                 expected64: torch.Tensor | None = None) -> None:
    """Per-dtype comparison. For half dtypes pass `expected64`, the float64 reference."""
    assert (actual is None) == (expected is None), f"{what}: one side has no value"
    if actual is None:
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if dtype in HALF:
        assert expected64 is not None
        ref = expected64.double()
        err_fused = (actual.double() - ref).abs().max().item()
        err_eager = (expected.double() - ref).abs().max().item()
        scale = max(ref.abs().max().item(), 1.0)
        bound = 2 * err_eager + HALF_ATOL[dtype] * scale
        assert err_fused <= bound, f"{what}: fused error {err_fused:.3g} > 2 x eager error {err_eager:.3g} + atol"
    else:
        torch.testing.assert_close(actual, expected.to(actual.dtype), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- op runners
DIFFERENTIABLE = ("x", "h", "y", "weight", "out_weight", "rec_weight", "bn_weight", "bn_bias")


def make_ccba_inputs(n: int, c: int, k: int, co: int, hw: tuple[int, int], dtype: torch.dtype, device: str,
                     fmt: str, seed: int = 0, affine: bool = True, weight_2d: bool = False) -> dict:
    """Inputs of concat_conv_bn_act; running stats are non-trivial so eval mode is meaningful."""
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype(dtype)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    w = rnd(co, c + k, 1, 1) * (c + k) ** -0.5
    return dict(
        x=to_format(rnd(n, c, *hw), fmt).to(device), h=to_format(rnd(n, k, *hw), fmt).to(device),
        weight=(w[:, :, 0, 0] if weight_2d else w).to(device),
        bn_weight=(1 + 0.3 * rnd(co, dt=pd)).to(device) if affine else None,
        bn_bias=(0.2 * rnd(co, dt=pd)).to(device) if affine else None,
        running_mean=(0.1 * rnd(co, dt=pd)).to(device),
        running_var=(0.5 + torch.rand(co, generator=g, dtype=torch.float64)).to(pd).to(device))


def make_update_inputs(n: int, c: int, k: int, hw: tuple[int, int], pool: bool, dtype: torch.dtype, device: str,
                       fmt: str, seed: int = 0, affine: bool = True) -> dict:
    """Inputs of rla_update; `hw` is y's size, h is twice that (plus one when odd sizes test floor mode)."""
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype(dtype)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    hh = (2 * hw[0] + hw[0] % 2, 2 * hw[1] + hw[1] % 2) if pool else hw
    return dict(
        h=to_format(rnd(n, k, *hh), fmt).to(device), y=to_format(rnd(n, c, *hw), fmt).to(device),
        out_weight=(rnd(k, c, 1, 1) * c ** -0.5).to(device),
        bn_weight=(1 + 0.3 * rnd(k, dt=pd)).to(device) if affine else None,
        bn_bias=(0.2 * rnd(k, dt=pd)).to(device) if affine else None,
        running_mean=(0.1 * rnd(k, dt=pd)).to(device),
        running_var=(0.5 + torch.rand(k, generator=g, dtype=torch.float64)).to(pd).to(device),
        rec_weight=(rnd(k, k, 3, 3) * (9 * k) ** -0.5).to(device))


def make_entry3x3_inputs(n: int, c: int, k: int, co: int, hw: tuple[int, int], dtype: torch.dtype, fmt: str,
                seed: int = 0, affine: bool = True, device: str = "cpu") -> dict:
    """Inputs of concat_conv3x3_bn_act; running stats non-trivial so eval mode is meaningful."""
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype(dtype)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    inputs = dict(x=to_format(rnd(n, c, *hw), fmt), h=to_format(rnd(n, k, *hw), fmt),
                  weight=rnd(co, c + k, 3, 3) * (9 * (c + k)) ** -0.5,
                  bn_weight=1 + 0.3 * rnd(co, dt=pd) if affine else None,
                  bn_bias=0.2 * rnd(co, dt=pd) if affine else None,
                  running_mean=0.1 * rnd(co, dt=pd),
                  running_var=(0.5 + torch.rand(co, generator=g, dtype=torch.float64)).to(pd))
    return {name: None if t is None else t.to(device) for name, t in inputs.items()}


def clone_inputs(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh leaves (grad enabled on differentiable ones), optionally cast to `dtype` (float64 reference)."""
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
            continue
        t = t.detach().clone(memory_format=torch.preserve_format)
        if dtype is not None:
            t = t.to(dtype)
        out[name] = t.requires_grad_(name in DIFFERENTIABLE)
    return out


def run_op(op, inputs: dict, grad_seed: int = 1, **kwargs) -> tuple[torch.Tensor, dict, dict]:
    """Run `op` forward + backward with a fixed random upstream gradient.

    Returns (output, {name: grad}, {running_mean, running_var after the call})."""
    out = op(**inputs, **kwargs)
    g = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    (out * upstream).sum().backward()
    grads = {n: t.grad for n, t in inputs.items() if t is not None and t.requires_grad}
    stats = {n: inputs[n] for n in ("running_mean", "running_var")}
    return out.detach(), grads, stats


def compare_with_reference(op, inputs: dict, backend: str, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """The fused `backend` against the `torch` reference: output, every gradient and the running stats."""
    got = run_op(op, clone_inputs(inputs), backend=backend, **kwargs)
    ref = run_op(op, clone_inputs(inputs), backend="torch", **kwargs)
    ref64 = run_op(op, clone_inputs(inputs, torch.float64), backend="torch", **kwargs) if dtype in HALF else None
    assert_close(got[0], ref[0], dtype, "output", ref64[0] if ref64 else None)
    for name in ref[1]:
        assert_close(got[1][name], ref[1][name], dtype, f"grad of {name}", ref64[1][name] if ref64 else None)
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], dtype, name, ref64[2][name] if ref64 else None)
    return got[0]


@contextlib.contextmanager
def opcheck_kernel_calls(op: str, backend: str = "cpp") -> Iterator[list]:
    """Inside: the first call of each of `op`'s two kernel ops on `backend` (a C++ kernel backend, which
    tracing records directly: rla_ext.ops._kernels.TRACED_KERNEL_BACKENDS) is recorded with copies of its
    arguments; on exit each recorded call goes through torch.library.opcheck (schema, fake kernel,
    AOT dispatch). Eager calls take the Python autograd path meanwhile (the C++ one calls the kernels
    below Python). Yields the list of (kernel op, arguments)."""
    from rla_ext.ops import _kernels

    real, cpp_autograd = _kernels.kernels(op, backend), _kernels.CPP_AUTOGRAD_BACKENDS
    calls: list = []

    def record(kernel):
        def call(*args):
            if all(k is not kernel for k, _ in calls):
                calls.append((kernel, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)))
            return kernel(*args)
        return call

    _kernels._RESOLVED[(op, backend)] = _kernels.KernelPair(record(real.forward), record(real.backward))
    _kernels.CPP_AUTOGRAD_BACKENDS = ()
    try:
        yield calls
    finally:
        _kernels._RESOLVED[(op, backend)] = real
        _kernels.CPP_AUTOGRAD_BACKENDS = cpp_autograd
    assert {k for k, _ in calls} == {real.forward, real.backward}, f"{op}: a kernel op was never called"
    for kernel, args in calls:
        torch.library.opcheck(kernel, args)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread.

    Model-level tests run many small float64 convolutions; on a busy 2-core machine OpenMP threads
    oversubscribe and run 50x slower, while one thread is fast and deterministic.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
