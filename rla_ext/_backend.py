"""Backend selection: per call, per module, a context manager, a process default, the environment.

Precedence (first that is set wins): the call's ``backend=`` argument (modules pass theirs), the
innermost ``use_backend()`` block, ``set_backend()``, ``$RLA_EXT_BACKEND``, then ``"auto"``.
``"auto"`` picks the fastest backend available for the tensor's device: first the fused backends in
the order measured for the op and size class (``rla_ext._auto_table``), then the static order below.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch

from rla_ext import _auto_table, _extension

BACKENDS = ("torch", "cpp", "cuda", "triton")
CHOICES = BACKENDS + ("auto",)
# Fastest first. Triton on the CPU runs through its interpreter: correct but slow, never auto.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
# Ops whose fused kernels `auto` takes only where rla_ext/_auto_table.py says they won: the basic
# block's 3x3 entry measured 0.86-0.97x eager at batch 8 on CIFAR shapes on 2 CPU cores (the benchmarks
# time it: benchmarks/shapes.py, CIFAR_BASIC_STAGES), so a device or size class the table has no entry
# for (the GPU today) runs the reference.
_REFERENCE_UNLESS_MEASURED = frozenset({"concat_conv3x3_bn_act"})


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and how to get it."""


_process_default: str | None = None
_local = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"backend: expected one of {CHOICES}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None restores $RLA_EXT_BACKEND / "auto")."""
    global _process_default
    _process_default = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use `name` for every op call inside the block that does not pass ``backend=`` itself."""
    name = _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def get_backend() -> str:
    """The backend name in force for calls that do not pass one (may be "auto")."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _process_default is not None:
        return _process_default
    env = os.environ.get("RLA_EXT_BACKEND")
    if env:
        try:
            return _check_name(env)
        except ValueError:
            raise ValueError(f"$RLA_EXT_BACKEND: expected one of {CHOICES}, got {env!r}") from None
    return "auto"


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None when backend `name` can run on `device`, else a sentence saying why and how to fix it."""
    reason = _unavailable_reason(_check_name(name), torch.device(device).type)
    return reason or None


# Availability cannot change while a graph is traced; torch.compile evaluates this once, at trace time,
# instead of tracing into the dispatcher queries and imports below (which would break the graph).
@torch.compiler.assume_constant_result
def _unavailable_reason(name: str, dev: str) -> str:
    """An empty string when available (a str either way, so the traced constant has one type)."""
    return _why_unavailable(name, dev) or ""


def _why_unavailable(name: str, dev: str) -> str | None:
    if name in ("torch", "auto"):
        return None
    if name == "cpp":
        if dev != "cpu":
            return f"the 'cpp' backend runs on CPU tensors only (got a {dev} tensor); use 'cuda' or 'triton'"
        if not _extension.cpp_compiled():
            return ("the compiled extension rla_ext._C is missing or failed to load "
                    f"({_extension.load_error() or 'CPU kernels not registered'}); "
                    "build it with `pip install --no-build-isolation -e .` (or `make setup`)")
        return None
    if name == "cuda":
        if dev != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors only (got a {dev} tensor)"
        if not _extension.cuda_compiled():
            return ("rla_ext was built without its CUDA kernels "
                    f"({_extension.recorded_build_info().get('cuda_reason', 'not built')}); rebuild with a "
                    "CUDA toolkit and a CUDA build of torch, or set RLA_EXT_FORCE_CUDA=1")
        return None
    # triton
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' backend needs the triton package: `pip install triton`"
    if dev == "cuda":
        return None
    if dev == "cpu":
        if triton_interpreter_on():
            return None
        return ("Triton kernels run on CPU tensors only through Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing rla_ext")
    return f"the 'triton' backend does not run on {dev} tensors"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (default: CUDA if visible, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device).type
    order = list(_AUTO_ORDER.get(dev, ("torch",)))
    order += [b for b in BACKENDS if b not in order]
    return [b for b in order if unavailable_reason(b, device) is None]


def auto_candidates(device_type: str, op: str | None = None, size: tuple[int, int] | None = None,
                    pass_: str | None = None) -> list[str]:
    """The backends "auto" tries, in order, for `op` on (height, width) activations on `device_type`,
    for a call whose pass is `pass_` ("fwd" or "fwd+bwd", prefixed "compiled " under torch.compile;
    default: "fwd+bwd" while autograd records, "fwd" under no_grad / inference_mode, each "compiled"
    while torch.compile traces the call: the fastest backend differs between all four)."""
    order: list[str] = []
    if op is not None and size is not None:
        if pass_ is None:
            pass_ = ("compiled " if torch.compiler.is_compiling() else "") + (
                "fwd+bwd" if torch.is_grad_enabled() else "fwd")
        key = (device_type, op, _auto_table.size_class(*size), pass_)
        order += [b for b in _auto_table.PREFERENCE.get(key, ()) if b in BACKENDS]
    if op in _REFERENCE_UNLESS_MEASURED and not order:
        order = ["torch"]
    return order + [b for b in _AUTO_ORDER.get(device_type, ("torch",)) if b not in order]


def resolve(name: str | None, device: torch.device, op: str | None = None,
            size: tuple[int, int] | None = None) -> str:
    """The concrete backend for a call on `device`: checks availability, expands "auto" (for `op` on
    activations of spatial `size`, when given, in the measured order of rla_ext._auto_table for the
    pass autograd's state implies; see auto_candidates)."""
    name = get_backend() if name is None else _check_name(name)
    if name == "auto":
        for candidate in auto_candidates(device.type, op, size):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return name
