"""Argument checks and canonicalisation shared by every backend (the one place they live).

Every error names the argument it is about. Nothing here broadcasts: a batch, channel or spatial
mismatch is an error, never silently expanded.
"""
from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F
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


def check_scalars(training: object, momentum: object, eps: object, prefix: str = "") -> tuple[bool, float, float]:
    """`prefix` goes before momentum's and eps's names in errors (an op with two BatchNorms: "entry_")."""
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise TypeError(f"{prefix}momentum: expected a float (the resolved averaging factor), got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"{prefix}eps: expected a float, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"{prefix}eps: expected a non-negative value, got {eps}")
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


# --------------------------------------------------------------------------- pooling of the RLA state
# The one definition of how h is 2x2-pooled at a stride-2 block, and of the size that gives: the op's
# validation, the reference, every fused backend's Python entry and the models all use these.
POOL_MODES = ("floor", "ceil")


def check_pool_mode(pool_mode: object) -> str:
    """``pool_mode``: "floor" (the published model; the default) or "ceil" (any input size).

    "floor": 2x2 average pool, stride 2, floor mode: (Hh, Wh) -> (Hh // 2, Wh // 2); an odd last
        row / column of h is dropped. A stride-2 conv (3x3 padding 1, or 1x1 padding 0) gives
        ceil(H / 2), so a network only runs when every pooled side is even (inputs a multiple of 32
        for the ImageNet-style models), as in the released code.
    "ceil": the same pool in ceil mode (``F.avg_pool2d(h, 2, 2, ceil_mode=True)``):
        (Hh, Wh) -> (ceil(Hh / 2), ceil(Wh / 2)), the stride-2 convs' size, so any input size runs.
        An edge window that covers only one row / column averages the values it covers (divisor 2,
        or 1 at the corner), as PyTorch's ceil-mode pooling does. Equal to "floor" for even sides.
    """
    if not isinstance(pool_mode, str) or pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode: expected one of {POOL_MODES}, got {pool_mode!r}")
    return pool_mode


def pooled_side(size: int, pool_mode: str) -> int:
    """One side of h after the 2x2 / stride-2 pooling: size // 2 ("floor") or ceil(size / 2) ("ceil")."""
    return size // 2 if pool_mode == "floor" else (size + 1) // 2


def state_size(hh: int, wh: int, pool: bool, pool_mode: str) -> tuple[int, int]:
    """The spatial size h (Hh, Wh) has after the update's optional pooling (y must have this size)."""
    if not pool:
        return (int(hh), int(wh))
    return (pooled_side(int(hh), pool_mode), pooled_side(int(wh), pool_mode))


def pool_state(h: Tensor, pool_mode: str = "floor") -> Tensor:
    """The 2x2 average pooling (stride 2) of an RLA state (N, k, Hh, Wh) in ``pool_mode`` (see
    :func:`check_pool_mode`). Differentiable; keeps h's memory format."""
    return F.avg_pool2d(h, kernel_size=2, stride=2, ceil_mode=pool_mode == "ceil")


def check_update_state(h: Tensor, y: Tensor, pool: bool, pool_mode: str) -> None:
    """h (N, k, Hh, Wh) beside the update's y (N, C, H, W): the same batch, and (H, W) the size of h after
    the optional pooling in ``pool_mode`` (rla_update and rla_update_and_entry)."""
    n, _, hy, wy = y.shape
    want = state_size(h.shape[2], h.shape[3], pool, pool_mode)
    if h.shape[0] != n or want != (hy, wy):
        how = "spatial size"
        if pool:
            how = "2x2-pooled spatial size" + (" (ceil mode)" if pool_mode == "ceil" else "")
        hint = ""
        if pool and pool_mode == "floor" and state_size(h.shape[2], h.shape[3], pool, "ceil") == (hy, wy):
            hint = "; pool_mode='ceil' pools odd sides up to the stride-2 convolutions' size"
        raise ValueError(f"h: shape {tuple(h.shape)} does not match y {tuple(y.shape)} (batch must be equal and the "
                         f"{how} of h, {want}, must equal y's {(hy, wy)}){hint}")


def prepool_for_kernel(h: Tensor, pool: bool, pool_mode: str) -> tuple[Tensor, bool]:
    """(h, pool) as the fused kernels take them. The kernels pool in floor mode only; where ceil mode
    differs from it (an odd side), h is pooled here by :func:`pool_state` (the reference's own pooling,
    so the pooled values are bit-identical to it; autograd carries its backward) and the kernel runs
    without pooling. Even sides keep the kernels' fused pooling: ceil and floor modes agree there."""
    if pool and pool_mode == "ceil" and (h.shape[2] % 2 or h.shape[3] % 2):
        return pool_state(h, pool_mode), False
    return h, pool


def check_update_inputs(h, y, out_weight, rec_weight, pool, pool_mode: str):
    """The RLA update's shared argument checks (rla_update and rla_update_and_entry): y and h as
    activations of one device and dtype, pool / pool_mode, h's size against y's, the two weights.
    -> ((n, c, height, width) of y, k, pool_mode, out_weight as a (k, C) matrix, rec_weight)."""
    check_activation("y", y)
    check_activation("h", h, y, "y")
    n, c, hy, wy = y.shape
    k = h.shape[1]
    if not isinstance(pool, bool):
        raise TypeError(f"pool: expected a bool, got {type(pool).__name__}")
    pool_mode = check_pool_mode(pool_mode)
    check_update_state(h, y, pool, pool_mode)
    w_out = weight_matrix("out_weight", out_weight, k, c, y, "y", f"C = {c}, the channels of y")
    w_rec = conv3x3_weight("rec_weight", rec_weight, k, y, "y")
    return (n, c, hy, wy), k, pool_mode, w_out, w_rec
