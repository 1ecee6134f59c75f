"""Argument checks and canonicalisation shared by every backend (the one place they live).

Every error names the argument it is about. Nothing here broadcasts: a batch, channel or spatial
mismatch is an error, never silently expanded.
"""
from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = ("relu", "none")


def check_tensor(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_like(name: str, t: Tensor, ref: Tensor, ref_name: str, same_dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_activation(name: str, t: object, ref: Tensor | None = None, ref_name: str = "",
                     empty_batch: bool = False) -> Tensor:
    """A 4-D floating activation like `ref`, non-empty (with `empty_batch`, N = 0 is allowed when the
    other sides are not 0: the op then behaves as its reference does on an empty batch)."""
    t = check_tensor(name, t, 4)
    if ref is not None:
        check_like(name, t, ref, ref_name)
    if t.numel() == 0 and not (empty_batch and t.shape[0] == 0 and min(t.shape[1:]) > 0):
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    return t


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last when `t` is channels_last (and not also NCHW-contiguous), else contiguous."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def in_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def weight_matrix(name: str, w: object, out_channels: int | None, in_channels: int,
                  ref: Tensor, ref_name: str, what: str) -> Tensor:
    """A 1x1 conv weight given as (out, in, 1, 1) or (out, in), returned as a contiguous (out, in) matrix."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 4:
        if tuple(w.shape[2:]) != (1, 1):
            raise ValueError(f"{name}: expected a 1x1 kernel, got kernel size {tuple(w.shape[2:])}")
        w2 = w.reshape(w.shape[0], w.shape[1])
    elif w.dim() == 2:
        w2 = w
    else:
        raise ValueError(f"{name}: expected shape (out, in, 1, 1) or (out, in), got {tuple(w.shape)}")
    check_tensor(name, w2, 2)
    check_like(name, w2, ref, ref_name)
    if w2.shape[1] != in_channels:
        raise ValueError(f"{name}: expected {in_channels} input channels ({what}), got shape {tuple(w.shape)}")
    if out_channels is not None and w2.shape[0] != out_channels:
        raise ValueError(f"{name}: expected {out_channels} output channels, got shape {tuple(w.shape)}")
    if w2.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one output channel, got shape {tuple(w.shape)}")
    return w2.contiguous()


def conv3x3_weight(name: str, w: object, channels: int, ref: Tensor, ref_name: str) -> Tensor:
    """A k->k 3x3 conv weight given as (k, k, 3, 3) or (k, k*9), returned contiguous (k, k, 3, 3)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 2 and tuple(w.shape) == (channels, channels * 9):
        w = w.reshape(channels, channels, 3, 3)
    check_tensor(name, w, 4)
    check_like(name, w, ref, ref_name)
    if tuple(w.shape) != (channels, channels, 3, 3):
        raise ValueError(f"{name}: expected shape ({channels}, {channels}, 3, 3) or ({channels}, {channels * 9}), "
                         f"got {tuple(w.shape)}")
    return w.contiguous()


def channel_vector(name: str, t: object, channels: int, ref: Tensor, ref_name: str) -> Tensor | None:
    """An optional per-channel BatchNorm tensor: None or a floating 1-D tensor of `channels` values."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    check_tensor(name, t, 1)
    check_like(name, t, ref, ref_name, same_dtype=False)
    if t.shape[0] != channels:
        raise ValueError(f"{name}: expected {channels} values (one per channel), got shape {tuple(t.shape)}")
    return t


def check_scalars(training: object, momentum: object, eps: object) -> tuple[bool, float, float]:
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise TypeError(f"momentum: expected a float (the resolved averaging factor), got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"eps: expected a float, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a non-negative value, got {eps}")
    return training, float(momentum), float(eps)


def check_activation_name(activation: object) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return activation  # type: ignore[return-value]


def conv3x3_segments_weight(name: str, w: object, out_channels: int | None, c: int, k: int, ref: Tensor,
                            ref_name: str) -> Tensor:
    """A 3x3 conv weight over cat(x, h) (columns [0, c) act on x, [c, c+k) on h): (out, c + k, 3, 3), contiguous.

    `out_channels` None: any number of outputs, at least one."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    check_tensor(name, w, 4)
    check_like(name, w, ref, ref_name)
    out = w.shape[0] if out_channels is None else out_channels
    if tuple(w.shape) != (out, c + k, 3, 3) or out == 0:
        want = "out" if out_channels is None else str(out_channels)
        raise ValueError(f"{name}: expected shape ({want}, {c} + {k}, 3, 3) (out, C + k, 3, 3), "
                         f"got {tuple(w.shape)}")
    return w.contiguous()


def check_stride(stride: object) -> int:
    """A convolution stride: a positive int (the same along both sides)."""
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"stride: expected an int, got {stride!r}")
    if stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride}")
    return stride


def conv3x3_out_size(hh: int, ww: int, stride: int) -> tuple[int, int]:
    """(H, W) of a 3x3 convolution's output, padding 1: ceil(side / stride), as F.conv2d gives."""
    return ((hh - 1) // stride + 1, (ww - 1) // stride + 1)


def bias_vector(name: str, b: object, channels: int, ref: Tensor, ref_name: str) -> Tensor | None:
    """An optional conv bias: None or a 1-D tensor of `channels` values in ref's dtype and device."""
    if b is None:
        return None
    if not isinstance(b, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(b).__name__}")
    check_tensor(name, b, 1)
    check_like(name, b, ref, ref_name)
    if b.shape[0] != channels:
        raise ValueError(f"{name}: expected {channels} values (one per output channel), got shape {tuple(b.shape)}")
    return b.contiguous()


def check_state(name: str, t: object, x: Tensor, channels: int | None = None, empty_batch: bool = False) -> Tensor:
    """A recurrent state (N, k, H, W) beside x (N, C, H, W): same N, H, W, dtype and device."""
    t = check_activation(name, t, x, "x", empty_batch)
    n, _, hh, ww = x.shape
    if t.shape[0] != n or tuple(t.shape[2:]) != (hh, ww) or (channels is not None and t.shape[1] != channels):
        want = "k" if channels is None else str(channels)
        raise ValueError(f"{name}: expected shape ({n}, {want}, {hh}, {ww}) to match x {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    return t
