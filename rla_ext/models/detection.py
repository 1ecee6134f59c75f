"""RLA-ResNet as a detection backbone (the released mmdetection ``RLA_ResNet``) and a recipe that
plugs it into torchvision's detectors through a feature pyramid.

``RLA_ResNet(x)`` returns the per-stage block outputs x_s (N, 256 * 2**s, H / 2**(s+2), W / 2**(s+2))
for s in ``out_indices`` (the RLA state h travels along but is not returned, as released). Its
arguments are the released ones, so mmdetection-style configs carry over::

    backbone = RLA_ResNet(layers=[3, 4, 6, 3], frozen_stages=1, norm_eval=True, style="pytorch")

With torchvision (``pip install torchvision``)::

    from torchvision.models.detection import FasterRCNN
    from rla_ext.models import rla_resnet_fpn_backbone
    model = FasterRCNN(rla_resnet_fpn_backbone(layers=[3, 4, 6, 3], frozen_stages=1), num_classes=91)

    # RetinaNet: P3-P7 from stages 1-3 plus two extra levels
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    backbone = rla_resnet_fpn_backbone(out_indices=(1, 2, 3), extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes=91)

Released behaviour kept: ``frozen_stages`` = s >= 0 freezes the stem and, for i < s, stage i with
its RLA pieces (``stages.i``, ``stage_bns.i``, ``conv_outs.i``, ``recurrent_convs.i``): parameters stop
requiring gradients and their BatchNorms stay in eval mode; ``norm_eval`` puts every BatchNorm
(the RLA ones included) in eval mode whenever the model trains; ``zero_init_last_bn`` defaults to
True; no ``bn2`` / ``fc`` (a classification checkpoint loads with :meth:`RLA_ResNet.init_weights`,
which drops exactly those). Differences: the freezing is also applied at construction (the released
class applies it on the first ``train()`` call only), h follows the input's device instead of 'cuda',
``out_indices`` selects the returned stages (released: all four), and the unsupported options
(``style`` other than 'pytorch', dilation, another norm layer or block) raise instead of being
ignored or failing later.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from rla_ext.models.checkpoint import CheckpointMismatchError, _unwrap, explain_mismatch
from rla_ext.models.rla_resnet import RLAResNet
from rla_ext.nn import RLABottleneck, rla_step


class RLA_ResNet(RLAResNet):  # noqa: N801  (the released class name)
    """The released detection backbone. x (N, 3, H, W), H and W multiples of 32 (any size with
    ``pool_mode="ceil"``) -> tuple of stage outputs.

    Args (released names): block (RLABottleneck only), layers, num_classes (unused, as released),
        rla_channel, SE, ECA (kernel size per stage or None), frozen_stages (-1: none), norm_eval,
        style ('pytorch' only), zero_init_last_bn, groups, width_per_group,
        replace_stride_with_dilation (None / all False only), norm_layer (None / nn.BatchNorm2d only).
    Extra: out_indices (stages to return, 0-based; None: all, as released), widths (planes per stage, for small models),
        pool_mode ("floor", as released, or "ceil": the RLA state is pooled in ceil mode to the strided
        convs' size, so detection inputs of any size run; see :class:`RLAResNet`),
        backend (rla_ext backend of the fused ops).
    Attribute ``out_channels_list``: channels of each returned feature map.
    """

    def __init__(self, block: type[nn.Module] | None = None, layers: Sequence[int] = (3, 4, 6, 3),
                 num_classes: int = 1000, rla_channel: int = 32, SE: bool = False,  # noqa: N803
                 ECA: Sequence[int] | None = None, frozen_stages: int = -1, norm_eval: bool = True,  # noqa: N803
                 style: str = "pytorch", zero_init_last_bn: bool = True, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] | None = None, norm_layer: type | None = None, *,
                 out_indices: Sequence[int] | None = None, widths: Sequence[int] | None = None,
                 pool_mode: str = "floor", backend: str | None = None) -> None:
        if block not in (None, RLABottleneck):
            raise ValueError("block: only the RLA bottleneck is supported (RLABottleneck / None)")
        if style != "pytorch":
            raise ValueError(f"style: only 'pytorch' (stride on the 3x3 conv) is implemented, got {style!r}")
        if replace_stride_with_dilation is not None and any(replace_stride_with_dilation):
            raise NotImplementedError("replace_stride_with_dilation: dilated stages are not implemented")
        if norm_layer not in (None, nn.BatchNorm2d):
            raise ValueError("norm_layer: only nn.BatchNorm2d (convert_sync_batchnorm afterwards for SyncBN)")
        super().__init__(layers, num_classes, rla_channel, block=RLABottleneck, se=SE, eca=ECA,
                         groups=groups, width_per_group=width_per_group, zero_init_last_bn=zero_init_last_bn,
                         widths=widths, pool_mode=pool_mode, backend=backend)
        del self.bn2, self.fc  # no classification head, as released
        n = len(self.stages)
        self.out_indices = tuple(range(n)) if out_indices is None else tuple(int(i) for i in out_indices)
        if not self.out_indices or any(not 0 <= i < n for i in self.out_indices):
            raise ValueError(f"out_indices: expected stage indices in [0, {n}), got {self.out_indices}")
        if not -1 <= frozen_stages <= n:
            raise ValueError(f"frozen_stages: expected -1 .. {n}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_channels_list = [self.stages[i][-1].bn3.num_features for i in self.out_indices]
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        for i in range(max(self.frozen_stages, 0)):
            mods += [self.stages[i], self.stage_bns[i], self.conv_outs[i], self.recurrent_convs[i]]
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "RLA_ResNet":
        """Train mode, then re-freeze the frozen stages; with norm_eval every BatchNorm stays in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (N, 3, H, W) -> (x_s for s in out_indices), x_s (N, C_s, H / 2**(s+2), W / 2**(s+2))."""
        x = self.stem(x)
        h = self.initial_state(x)
        outs = []
        for s in range(len(self.stages)):
            conv_out, rec = self.conv_outs[s], self.recurrent_convs[s]
            for t, block in enumerate(self.stages[s]):
                x = block(x, h)
                h = rla_step(h, x, conv_out, rec, self.stage_bns[s][t], pool=block.pool_h,
                             pool_mode=self.pool_mode, backend=self.backend)
            outs.append(x)
        return tuple(outs[i] for i in self.out_indices)

    def init_weights(self, pretrained: str | os.PathLike | Mapping[str, Any] | None = None) -> None:
        """Load a classification RLA-ResNet checkpoint (file or state_dict, released layout): every entry
        but the head's ``bn2.*`` / ``fc.*`` must match (strict otherwise). None keeps the current weights."""
        if pretrained is None:
            return
        obj = torch.load(pretrained, map_location="cpu", weights_only=True) \
            if isinstance(pretrained, (str, os.PathLike)) else pretrained
        state = {k: v for k, v in _unwrap(obj).items() if not k.startswith(("bn2.", "fc."))}
        problem = explain_mismatch(self, state)
        if problem is not None:
            raise CheckpointMismatchError(problem)
        self.load_state_dict(state, strict=True)

    # The classification-only helpers of RLAResNet do not apply to the headless backbone.
    forward_head = make_early_exit_heads = early_exit_logits = None  # type: ignore[assignment]


class RLAResNetFPN(nn.Module):
    """RLA_ResNet + torchvision's FeaturePyramidNetwork: the backbone torchvision's detectors take.

    x (N, 3, H, W) -> OrderedDict {"0": P_first, ..., (extra levels, e.g. "pool" or "p6", "p7")},
    each (N, out_channels, ., .). Attribute ``out_channels`` (what FasterRCNN / RetinaNet read).
    """

    def __init__(self, body: RLA_ResNet, out_channels: int = 256, extra_blocks: nn.Module | None = None) -> None:
        super().__init__()
        try:
            from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("RLAResNetFPN needs torchvision (pip install torchvision)") from exc
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def rla_resnet_fpn_backbone(*, out_channels: int = 256, extra_blocks: nn.Module | None = None,
                            **backbone_kwargs: Any) -> RLAResNetFPN:
    """An RLA_ResNet (released keyword arguments, e.g. layers=[3, 4, 6, 3], frozen_stages=1,
    norm_eval=True, out_indices) under a torchvision FPN with ``out_channels`` channels; pass it as
    ``backbone`` to ``torchvision.models.detection.FasterRCNN`` / ``RetinaNet`` / ``MaskRCNN``.
    ``extra_blocks`` defaults to torchvision's LastLevelMaxPool (Faster / Mask R-CNN); RetinaNet uses
    ``LastLevelP6P7(out_channels, out_channels)`` with ``out_indices=(1, 2, 3)``."""
    return RLAResNetFPN(RLA_ResNet(**backbone_kwargs), out_channels, extra_blocks)


__all__ = ["RLA_ResNet", "RLAResNetFPN", "rla_resnet_fpn_backbone"]
