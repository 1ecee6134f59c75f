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


@functools.lru_cache(maxsize=None)
def kernels(op: str, backend: str) -> KernelPair:
    """The kernel pair of `op` ("concat_conv_bn_act" or "rla_update") for a fused `backend`."""
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


def eager_fast_path(op: Callable[..., Any], body: Callable[..., Any]) -> Callable[..., Any]:
    """`op` (a torch.library custom op made from `body`) with a fast path for plain eager calls.

    Going through the custom-op dispatcher costs tens of microseconds of Python per call, which is a
    visible share of the op at RLA-ResNet's small CPU shapes. In plain eager execution `body` runs
    directly. Whenever anything could be tracing or transforming the call (torch.compile or export,
    a dispatch mode such as fake tensors or make_fx, functorch transforms, tensor subclasses) the
    call goes through `op`, whose fake kernel and schema are what opcheck and the compile tests check.
    """
    def call(*args: Any) -> Any:
        if (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
                or torch._C._are_functorch_transforms_active()
                or any(isinstance(a, Tensor) and type(a) not in _PLAIN_TENSORS for a in args)):
            return op(*args)
        return body(*args)

    return call
