"""RLA residual blocks: ``x_t = block(x, h)``, where the block's first conv reads ``cat(x, h)``.

A block returns only its final output (after the residual add and ReLU); that tensor is both the
next block's input and what the RLA update reads (see ``rla_ext.nn.aggregator``). Whether ``h``
must be 2x2-pooled before the update is exposed as ``block.pool_h``.

Submodule names (conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1, se, eca) follow
the released RLA-Net checkpoints. ``conv1`` is a plain ``nn.Conv2d`` holding the weight, but the
bottleneck never calls it: its weight and ``bn1``'s state go to the fused op, so forward hooks on
``conv1`` / ``bn1`` do not fire.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext.nn._bn_args import BNArgs, bn_args
from rla_ext.nn.attention import EfficientChannelAttention, SqueezeExcite
from rla_ext.nn.sync_batchnorm import process_group_of
from rla_ext.ops import concat_conv3x3_bn_act, concat_conv_bn_act

NormLayer = Callable[[int], nn.Module]


def _attention(channels: int, se: bool, eca_kernel: int | None, reduction: int) -> dict[str, nn.Module | None]:
    return {"se": SqueezeExcite(channels, reduction) if se else None,
            "eca": EfficientChannelAttention(channels, int(eca_kernel)) if eca_kernel is not None else None}


def _weight_as(w: Tensor, like: Tensor) -> Tensor:
    # Under autocast the activations arrive in a lower precision than the fp32 master weights;
    # the fused ops want one dtype, so the weight follows the activation (a differentiable cast).
    return w if w.dtype == like.dtype else w.to(like.dtype)


class _RLABlock(nn.Module):
    """Shared tail of the RLA blocks: attention, residual, and the h-pooling flag."""

    expansion = 1
    se: nn.Module | None
    eca: nn.Module | None

    def _finish(self, out: Tensor, x: Tensor) -> Tensor:
        if self.se is not None:
            out = self.se(out)
        if self.eca is not None:
            out = self.eca(out)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)

    def norms(self) -> tuple[nn.Module, ...]:
        """This block's own BatchNorms, in order (what ``forward(..., norms=...)`` replaces)."""
        raise NotImplementedError

    def last_norm(self) -> nn.Module:
        return self.norms()[-1]


def bottleneck_entry(x: Tensor, h: Tensor, weight: Tensor, bn: BNArgs, group: object,
                     backend: str | None) -> Tensor:
    """relu(bn1(conv1x1(cat(x, h)))) through ``concat_conv_bn_act``, from what
    ``RLABottleneck.entry_arguments`` resolved (weight, bn1's arguments, its process group)."""
    return concat_conv_bn_act(x, h, weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                              training=bn.training, momentum=bn.momentum, eps=bn.eps, activation="relu",
                              backend=backend, process_group=group)


class RLABottleneck(_RLABlock):
    """The RLA-ResNet bottleneck. x (N, C_in, H, W), h (N, k, H, W) -> (N, 4*planes, H/s, W/s).

    ``relu(bn1(conv1x1(cat(x, h))))`` runs through ``rla_ext.ops.concat_conv_bn_act`` (no concat
    built); the rest is a standard bottleneck with the stride on the 3x3 conv, optional SE / ECA on
    the branch output, residual add and ReLU.

    Args:
        inplanes: C_in; planes: bottleneck planes (output 4*planes); stride: 1 or 2 (on conv2).
        downsample: module mapping x to the output shape (the projection shortcut) or None.
        rla_channel: k, the channels of h. groups, base_width: ResNeXt cardinality and width.
        se: add squeeze-excitation; eca_kernel: kernel size of ECA, or None for no ECA.
        backend: rla_ext backend for the fused entry (None: the selection in force).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 rla_channel: int = 32, groups: int = 1, base_width: int = 64, se: bool = False,
                 eca_kernel: int | None = None, reduction: int = 16, norm_layer: NormLayer | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes + rla_channel, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = norm_layer(out_planes)
        self.downsample = downsample
        for name, mod in _attention(out_planes, se, eca_kernel, reduction).items():
            setattr(self, name, mod)
        self.stride = stride
        self.pool_h = downsample is not None and stride != 1
        self.backend = backend

    def norms(self) -> tuple[nn.Module, ...]:
        return (self.bn1, self.bn2, self.bn3)

    def entry_arguments(self, like: Tensor, norms: Sequence[nn.Module] | None = None) -> tuple[Tensor, BNArgs, object]:
        """What the fused entry relu(bn1(conv1x1(cat(x, h)))) takes from this block for one forward call:
        (conv1's weight in `like`'s dtype, bn1's resolved arguments, bn1's process group). Resolving bn1
        has its side effect (num_batches_tracked): call once per forward."""
        bn1 = self.bn1 if norms is None else norms[0]
        return _weight_as(self.conv1.weight, like), bn_args(bn1), process_group_of(bn1)

    def forward(self, x: Tensor, h: Tensor, norms: Sequence[nn.Module] | None = None,
                entry: Tensor | None = None) -> Tensor:
        """x (N, C_in, H, W), h (N, k, H, W) -> (N, 4*planes, H/stride, W/stride).

        ``norms`` replaces (bn1, bn2, bn3) for this call (the shared-block recurrence keeps one set
        of BatchNorms per step while reusing the convolutions). ``entry``: the entry's output
        relu(bn1(conv1x1(cat(x, h)))), (N, width, H, W), when the caller computed it already (the fused
        block boundary, ``rla_ext.nn.rla_boundary``); h is then not read.
        """
        _, bn2, bn3 = self.norms() if norms is None else norms
        out = entry if entry is not None else bottleneck_entry(x, h, *self.entry_arguments(x, norms), self.backend)
        out = F.relu(bn2(self.conv2(out)))
        out = bn3(self.conv3(out))
        return self._finish(out, x)


class RLABasicBlock(_RLABlock):
    """RLA basic block for small networks. x (N, C_in, H, W), h (N, k, H, W) -> (N, planes, H/s, W/s).

    As in the published basic-block RLA variants, the first 3x3 conv (carrying the stride) reads
    ``cat(x, h)``: conv1 weight (planes, C_in + k, 3, 3); ``relu(bn1(conv1(cat(x, h))))`` runs
    through ``rla_ext.ops.concat_conv3x3_bn_act`` (no concat built), so conv1 / bn1's forward hooks
    do not fire. Under ``auto`` that op runs the reference until measured faster (see
    rla_ext._backend). The RLA update after the block goes through the fused ``rla_update``.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 rla_channel: int = 32, groups: int = 1, base_width: int = 64, se: bool = False,
                 eca_kernel: int | None = None, reduction: int = 16, norm_layer: NormLayer | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("RLABasicBlock supports groups=1 and base_width=64 only")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = inplanes
        self.conv1 = nn.Conv2d(inplanes + rla_channel, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        for name, mod in _attention(planes, se, eca_kernel, reduction).items():
            setattr(self, name, mod)
        self.stride = stride
        self.pool_h = downsample is not None and stride != 1
        self.backend = backend

    def norms(self) -> tuple[nn.Module, ...]:
        return (self.bn1, self.bn2)

    def forward(self, x: Tensor, h: Tensor, norms: Sequence[nn.Module] | None = None) -> Tensor:
        """x (N, C_in, H, W), h (N, k, H, W) -> (N, planes, H/stride, W/stride)."""
        bn1, bn2 = self.norms() if norms is None else norms
        a = bn_args(bn1)
        out = concat_conv3x3_bn_act(x, h, _weight_as(self.conv1.weight, x), a.weight, a.bias, a.running_mean,
                                    a.running_var, stride=self.conv1.stride[0], training=a.training,
                                    momentum=a.momentum, eps=a.eps, activation="relu", backend=self.backend,
                                    process_group=process_group_of(bn1))
        out = bn2(self.conv2(out))
        return self._finish(out, x)


def make_downsample(inplanes: int, out_planes: int, stride: int, norm_layer: NormLayer | None = None) -> nn.Sequential:
    """The projection shortcut: 1x1 conv (stride) + BatchNorm; names downsample.0 / downsample.1."""
    norm_layer = norm_layer or nn.BatchNorm2d
    return nn.Sequential(nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=False), norm_layer(out_planes))


__all__ = ["RLABottleneck", "RLABasicBlock", "make_downsample"]
