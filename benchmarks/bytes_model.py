"""How many bytes a fused implementation of each op must move (SPEC §5), per pass.

The model counts compulsory traffic: every tensor the op consumes is read once and every tensor it
produces is written once, where "produces" follows the kernel contract in docs/ARCHITECTURE.md
(the forward also writes the pre-BN tensor it saves for backward). Re-reads that training-mode
BatchNorm forces in practice (statistics must be complete before anything is normalised) are
deliberately left out, so bytes / time is an upper bound on what a kernel can reach and 100% of
the measured copy bandwidth is unreachable, not a target that was missed.

Per-channel vectors (gamma, beta, statistics) are left out: they are < 0.01% of the traffic at
every benchmarked shape. Weights are counted, in the activation dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Traffic:
    """Bytes read and written by one pass."""

    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.read + other.read, self.written + other.written)


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {PASSES}, got {pass_!r}")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _concat_entry_traffic(x: int, h: int, w: int, act_out: int, pass_: str) -> Traffic:
    """The entry ops' common pattern, from the bytes of x, h, the weight and one output activation.

    fwd: read x, h, weight; write out and z (the pre-BN conv output kept for backward).
    bwd: read grad_out, z, x, h, weight; write dx, dh, dweight.
    """
    _check_pass(pass_)
    fwd = Traffic(read=x + h + w, written=2 * act_out)
    if pass_ == "fwd":
        return fwd
    return fwd + Traffic(read=2 * act_out + x + h + w, written=x + h + w)


def concat_conv_bn_act_traffic(n: int, c: int, k: int, c_out: int, hw: int, dtype: torch.dtype,
                               pass_: str = "fwd") -> Traffic:
    """Op A on x (n, c, H, W), h (n, k, H, W) -> (n, c_out, H, W), hw = H * W, training mode.

    fwd: read x, h, weight; write out and z (the pre-BN conv output kept for backward).
    bwd: read grad_out, z, x, h, weight; write dx, dh, dweight.
    """
    e = _element_size(dtype)
    return _concat_entry_traffic(x=n * c * hw * e, h=n * k * hw * e, w=c_out * (c + k) * e,
                                 act_out=n * c_out * hw * e, pass_=pass_)


def concat_conv3x3_bn_act_traffic(n: int, c: int, k: int, c_out: int, height: int, width: int,
                                  dtype: torch.dtype, pass_: str = "fwd", stride: int = 1) -> Traffic:
    """The basic block's 3x3 entry on x (n, c, H, W), h (n, k, H, W) -> (n, c_out, ceil(H / stride),
    ceil(W / stride)) (3x3 conv, padding 1), training mode.

    The same tensors as op A: fwd reads x, h and the (c_out, c + k, 3, 3) weight and writes out and z;
    bwd reads grad_out, z, x, h, weight and writes dx, dh, dweight. Only the weight (9x) and the
    output's resolution (1/stride^2 of the input's pixels) differ. The 3x3 taps' re-reads of x and h
    (the halo) stay on chip and are not counted.
    """
    e = _element_size(dtype)
    hw, hw_out = height * width, -(-height // stride) * -(-width // stride)
    return _concat_entry_traffic(x=n * c * hw * e, h=n * k * hw * e, w=c_out * (c + k) * 9 * e,
                                 act_out=n * c_out * hw_out * e, pass_=pass_)


def rla_update_traffic(n: int, c: int, k: int, hw: int, dtype: torch.dtype, pass_: str = "fwd",
                       pool: bool = False) -> Traffic:
    """Op B on h (n, k, Hh, Wh), y (n, c, H, W) -> (n, k, H, W), hw = H * W, training mode.

    With ``pool`` h has 4 * hw pixels (2x2 average pool). fwd: read h, y, out_weight, rec_weight;
    write out and s (the pre-BN sum kept for backward). bwd: read grad_out, s, y and both weights;
    write dh, dy and both weight gradients (h itself is only needed for its shape).
    """
    _check_pass(pass_)
    e = _element_size(dtype)
    h = n * k * hw * (4 if pool else 1) * e
    y = n * c * hw * e
    w = (k * c + k * k * 9) * e
    small = n * k * hw * e  # one k-channel activation at the output resolution
    fwd = Traffic(read=h + y + w, written=2 * small)
    if pass_ == "fwd":
        return fwd
    return fwd + Traffic(read=2 * small + y + w, written=h + y + w)


def rla_update_and_entry_traffic(n: int, c: int, k: int, c_out: int, hw: int, dtype: torch.dtype,
                                 pass_: str = "fwd", pool: bool = False) -> Traffic:
    """Op C, the block boundary, on h (n, k, Hh, Wh), y (n, c, H, W) -> h_next (n, k, H, W) and the next
    block's entry out (n, c_out, H, W), hw = H * W, training mode.

    The two ops it replaces (``rla_update_traffic`` + ``concat_conv_bn_act_traffic`` with x = y and
    h = h_next) less what the fusion makes internal. fwd: y is read once (not by each op), and h_next,
    written once as an output, is not read back by the entry. bwd: y is read once for both weight
    gradients and dy is written once (one dgrad into y with the stacked weight: the two ops' dy are
    not written separately and summed), and the entry's gradient into h_next stays internal (added to
    the incoming grad_h_next, which is read once, the update's grad_out). Everything else as the two
    ops: fwd writes h_next, s, out, z; bwd reads s, z, h_next and the three weights and writes dh and
    the three weight gradients.
    """
    update = rla_update_traffic(n, c, k, hw, dtype, pass_, pool)
    entry = concat_conv_bn_act_traffic(n, c, k, c_out, hw, dtype, pass_)
    e = _element_size(dtype)
    y, h_next = n * c * hw * e, n * k * hw * e
    internal = Traffic(read=y + h_next, written=0)  # fwd: the entry's reads of y and h_next
    if pass_ == "fwd+bwd":
        # bwd: the second read of y, the second dy and the entry's dh_next
        internal = internal + Traffic(read=y, written=y + h_next)
    total = update + entry
    return Traffic(total.read - internal.read, total.written - internal.written)
