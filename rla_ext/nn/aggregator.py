"""The RLA update, ``h_t = rec3x3(tanh(bn_t(pool?(h_{t-1}) + out1x1(x_t))))``, as module pieces.

Within one stage ``out1x1`` (C -> k) and ``rec3x3`` (k -> k) are shared by every block (that is
the recurrence) while each block t has its own ``bn_t``. Networks that must keep the published
checkpoint layout (conv_outs.{s}, recurrent_convs.{s}, stage_bns.{s}.{t}) hold these modules
themselves and call :func:`rla_step`; :class:`RLAAggregator` bundles one stage's pieces for
building RLA into other backbones.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from rla_ext.nn._bn_args import BNArgs, bn_args
from rla_ext.nn.blocks import bottleneck_entry
from rla_ext.nn.sync_batchnorm import process_group_of
from rla_ext.ops import rla_update, rla_update_and_entry
from rla_ext.ops._validation import check_pool_mode


def _as(w: Tensor, like: Tensor) -> Tensor:
    return w if w.dtype == like.dtype else w.to(like.dtype)


def check_rla_convs(conv_out: nn.Conv2d, recurrent_conv: nn.Conv2d) -> None:
    """The fused update implements bias-free 1x1 (stride 1) and 3x3 (padding 1) convs only."""
    if conv_out.kernel_size != (1, 1) or conv_out.stride != (1, 1) or conv_out.bias is not None \
            or conv_out.groups != 1:
        raise ValueError("conv_out: expected a bias-free, ungrouped 1x1 conv with stride 1")
    k = recurrent_conv.out_channels
    if (recurrent_conv.kernel_size != (3, 3) or recurrent_conv.padding != (1, 1) or recurrent_conv.stride != (1, 1)
            or recurrent_conv.dilation != (1, 1) or recurrent_conv.bias is not None or recurrent_conv.groups != 1
            or recurrent_conv.in_channels != k or conv_out.out_channels != k):
        raise ValueError("recurrent_conv: expected a bias-free k->k 3x3 conv, padding 1, stride 1, with k = "
                         "conv_out.out_channels")


def rla_step(h: Tensor, y: Tensor, conv_out: nn.Conv2d, recurrent_conv: nn.Conv2d, bn: nn.Module, *,
             pool: bool = False, pool_mode: str = "floor", backend: str | None = None) -> Tensor:
    """One RLA update through ``rla_ext.ops.rla_update``, with ``bn``'s bookkeeping as nn.BatchNorm2d.

    h (N, k, Hh, Wh) previous state; y (N, C, H, W) the block's final output, with
    (H, W) = (Hh//2, Wh//2) when ``pool`` else (Hh, Wh); ``pool_mode="ceil"`` pools to
    (ceil(Hh/2), ceil(Wh/2)) instead (see ``rla_update``). Returns the new state (N, k, H, W).
    """
    return _update(h, y, conv_out, recurrent_conv, bn_args(bn), process_group_of(bn), pool, pool_mode, backend)


def _update(h: Tensor, y: Tensor, conv_out: nn.Conv2d, recurrent_conv: nn.Conv2d, a: BNArgs, group: object,
            pool: bool, pool_mode: str, backend: str | None) -> Tensor:
    """rla_step with the BatchNorm already resolved (``a``, its process group ``group``)."""
    return rla_update(h, y, _as(conv_out.weight, y), a.weight, a.bias, a.running_mean, a.running_var,
                      _as(recurrent_conv.weight, y), pool=pool, pool_mode=pool_mode, training=a.training,
                      momentum=a.momentum, eps=a.eps, backend=backend, process_group=group)


def boundary_pays(y: Tensor) -> bool:
    """Whether the fused boundary (:func:`rla_boundary`) beats the two ops on the `cpp` backend for block
    output y (N, C, H, W): when there are at least 8 pixel rows per channel, N*H*W >= 8*C.

    Measured on 2 CPU cores (fp32, channels_last, forward+backward, RLA-ResNet-50 stage shapes, k=32,
    N=8) against the two cpp ops: the benchmark CLI (gradients by autograd.grad) 1.00x at C256xH56,
    1.06x at C512xH28, 1.02x at C1024xH14, 0.98x at C2048xH7 (0.99 / 1.04 / 0.96 / 0.94x in a second
    run); with the gradients accumulated into leaf tensors (one add of dy fewer for the fused op)
    1.20x / 1.05x / 0.97x / 0.96x. Where there are few pixel rows per channel the stacked GEMMs lose,
    so those boundaries stay unfused.
    """
    return y.shape[0] * y.shape[2] * y.shape[3] >= 8 * y.shape[1]


def rla_boundary(h: Tensor, y: Tensor, conv_out: nn.Conv2d, recurrent_conv: nn.Conv2d, bn: nn.Module,
                 next_block: nn.Module, next_norms: Sequence[nn.Module] | None = None, *, pool: bool = False,
                 pool_mode: str = "floor", backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The block boundary in one op (``rla_ext.ops.rla_update_and_entry``, y read once): block t's RLA
    update, as :func:`rla_step`, and the next bottleneck's entry relu(bn1(conv1x1(cat(y, h_next)))).

    h, y, pool, pool_mode: as :func:`rla_step`; next_block: the RLABottleneck that runs next on y, with
    ``next_norms`` replacing its BatchNorms as in its forward. Returns (h_next (N, k, H, W), entry
    (N, width, H, W)); pass ``entry=`` to ``next_block``'s forward. When the two BatchNorms differ in
    mode (one training, one eval) or synchronise over different process groups, the two run as separate
    ops (same results).
    """
    a = bn_args(bn)
    group = process_group_of(bn)
    w, e, entry_group = next_block.entry_arguments(y, next_norms)
    if e.training != a.training or entry_group is not group:
        h_next = _update(h, y, conv_out, recurrent_conv, a, group, pool, pool_mode, backend)
        return h_next, bottleneck_entry(y, h_next, w, e, entry_group, backend)
    return rla_update_and_entry(h, y, _as(conv_out.weight, y), a.weight, a.bias, a.running_mean, a.running_var,
                                _as(recurrent_conv.weight, y), w, e.weight, e.bias, e.running_mean, e.running_var,
                                pool=pool, pool_mode=pool_mode, training=a.training, momentum=a.momentum, eps=a.eps,
                                entry_momentum=e.momentum, entry_eps=e.eps, activation="relu", backend=backend,
                                process_group=group)


class RLAAggregator(nn.Module):
    """One stage's RLA pieces: shared ``conv_out`` (C -> k, 1x1) and ``recurrent_conv`` (k -> k, 3x3),
    and ``bns`` (one BatchNorm2d(k) per block of the stage).

    ``forward(h, y, step, pool=False)``: h (N, k, Hh, Wh), y (N, C, H, W) -> (N, k, H, W).
    ``pool_mode`` ("floor", the published default, or "ceil"): how ``pool`` rounds odd sides of h
    (see ``rla_ext.ops.rla_update``); "ceil" matches stride-2 convolutions at any input size.
    """

    def __init__(self, in_channels: int, rla_channel: int, num_blocks: int, *, backend: str | None = None,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d, pool_mode: str = "floor") -> None:
        super().__init__()
        self.pool_mode = check_pool_mode(pool_mode)
        self.conv_out = nn.Conv2d(in_channels, rla_channel, 1, bias=False)
        self.recurrent_conv = nn.Conv2d(rla_channel, rla_channel, 3, padding=1, bias=False)
        self.bns = nn.ModuleList(norm_layer(rla_channel) for _ in range(num_blocks))
        self.backend = backend

    def forward(self, h: Tensor, y: Tensor, step: int, pool: bool = False) -> Tensor:
        return rla_step(h, y, self.conv_out, self.recurrent_conv, self.bns[step], pool=pool,
                        pool_mode=self.pool_mode, backend=self.backend)
