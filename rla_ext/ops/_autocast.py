"""torch.autocast policy for the fused ops, the one PyTorch applies to convolutions: activations and
weights run in the autocast dtype, BatchNorm parameters and statistics stay float32 (the ops keep their
statistics in float32 for half inputs anyway). float64 tensors are left alone, as autocast does."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype for `device_type`, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(dtype: torch.dtype | None, *tensors: object) -> tuple:
    """Cast the floating, non-float64 tensors among `tensors` to `dtype` (others pass through untouched)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Kernels choose their own precisions: autocast must not re-cast the ATen calls inside them."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
