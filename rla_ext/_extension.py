"""Loading the compiled extension (rla_ext._C) and asking what it contains."""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

_KERNEL_OPS = ("concat_conv_bn_act_kernel_fwd", "concat_conv_bn_act_kernel_bwd",
               "concat_conv3x3_bn_act_kernel_fwd", "concat_conv3x3_bn_act_kernel_bwd",
               "rla_update_kernel_fwd", "rla_update_kernel_bwd")


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when rla_ext._C imported, else why not."""
    try:
        from rla_ext import _C  # noqa: F401  (registers the torch.ops.rla_ext.*_kernel_* ops)
    except ImportError as e:  # not built, or built against another torch
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=None)
def has_kernel(dispatch_key: str) -> bool:
    """Whether every kernel op of the extension has an implementation for `dispatch_key`.

    Cached: registrations do not change once the extension is loaded, and the backend check asks
    on every op call (four dispatcher queries cost ~30 us of Python each time)."""
    if load_error() is not None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rla_ext::{name}", dispatch_key)
               for name in _KERNEL_OPS)


def cpp_compiled() -> bool:
    return has_kernel("CPU")


def cuda_compiled() -> bool:
    return has_kernel("CUDA")


def recorded_build_info() -> dict[str, Any]:
    """What setup.py wrote about the build (empty when the package was never built)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
