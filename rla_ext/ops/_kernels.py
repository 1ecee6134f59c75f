"""Where each fused backend's kernel pair (forward, backward) lives; see docs/ARCHITECTURE.md."""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from rla_ext import _extension
from rla_ext.ops import _batchnorm
from rla_ext.ops import _validation as v

FUSED_BACKENDS = ("cpp", "cuda", "triton")


class KernelPair(NamedTuple):
    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., tuple[Tensor, ...]]


# Resolved kernel pairs: a plain dict, which torch.compile traces through quietly (it warns on every
# functools.lru_cache-wrapped call it meets).
_RESOLVED: dict[tuple[str, str], KernelPair] = {}


def kernels(op: str, backend: str) -> KernelPair:
    """The kernel pair of `op` (a fused op's name, e.g. "rla_update") for a fused `backend`."""
    pair = _RESOLVED.get((op, backend))
    if pair is None:
        pair = _RESOLVED[(op, backend)] = _resolve(op, backend)
    return pair


def _resolve(op: str, backend: str) -> KernelPair:
    if backend in ("cpp", "cuda"):
        err = _extension.load_error()
        if err is not None:
            raise RuntimeError(f"rla_ext._C is not available: {err}")
        ns = torch.ops.rla_ext
        # One schema for both: the dispatcher picks the CPU or CUDA kernel from the tensors' device.
        return KernelPair(getattr(ns, f"{op}_kernel_fwd").default, getattr(ns, f"{op}_kernel_bwd").default)
    if backend == "triton":
        mod = importlib.import_module(f"rla_ext.triton_kernels.{op}")
        return KernelPair(mod.forward, mod.backward)
    raise ValueError(f"backend: {backend!r} has no fused kernels (expected one of {FUSED_BACKENDS})")


def forward_with_stats(call: Callable[[Tensor | None, Tensor | None], tuple[Tensor, ...]],
                       running_mean: Tensor | None, running_var: Tensor | None, *, training: bool,
                       momentum: float, count: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Run a kernel forward in training (batch stats, then the running update) or eval mode.

    `call(mean, var)` runs the kernel; it returns (out, saved, mean, var) like every forward kernel.
    (csrc/autograd.cpp mirrors this for the C++ autograd path.)
    """
    if training:
        result = call(None, None)
        _batchnorm.update_running_stats(running_mean, running_var, result[2], result[3], count, momentum)
        return result
    assert running_mean is not None and running_var is not None
    return call(*_batchnorm.eval_stats(running_mean, running_var, dtype))


def empty_activation(like: Tensor, channels: int, height: int, width: int,
                     fmt: torch.memory_format) -> Tensor:
    """An uninitialised (N, channels, height, width) tensor in memory format `fmt` (for fake kernels)."""
    return like.new_empty((like.shape[0], channels, height, width)).contiguous(memory_format=fmt)


def fake_forward_outputs(like: Tensor, channels: int, gamma: Tensor,
                         size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (out, saved, mean, var) of a forward kernel: two activations shaped like `like` (spatial
    `size` when given) with `channels` channels in its memory format, and two per-channel statistics
    in gamma's dtype."""
    fmt = v.memory_format_of(like)
    h, w = (like.shape[2], like.shape[3]) if size is None else size
    return (empty_activation(like, channels, h, w, fmt), empty_activation(like, channels, h, w, fmt),
            gamma.new_empty((channels,)), gamma.new_empty((channels,)))


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*args: Any) -> bool:
    """Whether a call with `args` runs in plain eager execution: nothing could be tracing or transforming
    it (torch.compile or export, a dispatch mode such as fake tensors or make_fx, functorch transforms,
    tensor subclasses)."""
    return not (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
                or torch._C._are_functorch_transforms_active()
                or any(isinstance(a, Tensor) and type(a) not in _PLAIN_TENSORS for a in args))


# Backends whose kernel pairs are C++ operators with fake kernels (register_kernel_fakes): their op
# bodies run even while something traces the call (torch.compile, export, fake tensors), so the graph
# holds the kernel ops themselves and the BatchNorm bookkeeping around them as ordinary ops, which
# Inductor fuses, instead of one opaque Python custom op per call. Measured under torch.compile on 2 CPU
# cores: ~185 us less host time per rla_update forward + backward (the custom op's Python dispatch
# layers and body). "cuda" joins once a GPU run has checked it; triton's kernels are Python functions
# and stay behind the custom ops.
TRACED_KERNEL_BACKENDS = ("cpp",)


def eager_fast_path(op: Callable[..., Any], body: Callable[..., Any]) -> Callable[..., Any]:
    """`op` (a torch.library custom op made from `body`, whose last argument is the backend) with a fast
    path for plain eager calls and for backends in TRACED_KERNEL_BACKENDS.

    Going through the custom-op dispatcher costs tens of microseconds of Python per call, which is a
    visible share of the op at RLA-ResNet's small CPU shapes. In plain eager execution, and on a backend
    whose kernels trace as C++ operators, `body` runs directly. Otherwise, whenever anything could be
    tracing or transforming the call (:func:`plain_eager`), the call goes through `op`, whose fake
    kernel and schema are what opcheck and the compile tests check.
    """
    def call(*args: Any) -> Any:
        return body(*args) if args[-1] in TRACED_KERNEL_BACKENDS or plain_eager(*args) else op(*args)

    return call


def register_kernel_fakes(op: str, forward: Callable[..., Any], backward: Callable[..., Any]) -> None:
    """Fake kernels of the C++ kernel ops rla_ext::<op>_kernel_fwd / _bwd (schemas in csrc/ops.cpp),
    when the extension is built with them: what lets tracing record them (TRACED_KERNEL_BACKENDS). Their
    kernel pairs are resolved here too, so a traced call finds them already in the dict."""
    if _extension.load_error() is not None or not hasattr(torch.ops.rla_ext, f"{op}_kernel_fwd"):
        return
    torch.library.register_fake(f"rla_ext::{op}_kernel_fwd")(forward)
    torch.library.register_fake(f"rla_ext::{op}_kernel_bwd")(backward)
    for backend in TRACED_KERNEL_BACKENDS:
        kernels(op, backend)


# Backends whose plain eager calls run the whole autograd in C++ (csrc/autograd.cpp: the kernels under
# a torch::autograd::Function with the BatchNorm bookkeeping; measured on 2 CPU cores at a tiny shape,
# 52-67 us less host time per forward+backward than the Python Function). The code is device-generic,
# but "cuda" joins only once a GPU run has checked it.
CPP_AUTOGRAD_BACKENDS = ("cpp",)


def cpp_autograd(op: str, backend: str, *args: Any) -> Callable[..., Tensor] | None:
    """The C++ autograd op of `op` (torch.ops.rla_ext.<op>_autograd, schema in csrc/ops.cpp: the op's
    validated arguments with running_mean / running_var, training and momentum -> out, the running
    statistics updated in place) when a call on `backend` with `args` can take it, else None."""
    if backend not in CPP_AUTOGRAD_BACKENDS or not plain_eager(*args):
        return None
    return _cpp_autograd_op(op)


@functools.lru_cache(maxsize=None)
def _cpp_autograd_op(op: str) -> Callable[..., Tensor]:
    _extension.load_error()  # a backend that resolved to "cpp" has loaded it; this makes sure
    return getattr(torch.ops.rla_ext, f"{op}_autograd").default
