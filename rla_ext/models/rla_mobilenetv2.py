"""RLA-MobileNetV2 (the released ``RLA_MobileNetV2`` / ``dsRLA_MobileNetV2``), names as released.

Data flow (N images, stem output 112x112 for 224x224 input), per stage j, block i::

    e = relu6(bn(conv1x1(x)))            if the block expands (t != 1), else e = x
    d = relu6(bn_dw(dwconv3x3_s(cat(e, h))))            # depthwise over hidden + k channels
    y = bn_pw(conv1x1(d)) [* eca]                       # the branch output ("pw-linear")
    x = x + y  if stride 1 and C_in == C_out, else y
    h = rec(tanh(bn_{j,i}(avgpool2x2_if_stride2(h) + conv_out_j(y))))   # floor pool; pool_mode="ceil": ceil
    head: h = relu6(bn2(h)); x = relu6(bn(conv2_1x1(cat(x, h)))); logits = fc(dropout(mean_hw(x)))

``rec`` is a dense 3x3 conv (k -> k) in RLA_MobileNetV2 and a depthwise 3x3 conv (groups = k) in
dsRLA_MobileNetV2 (the released MobileNetV2 checkpoint is ``dsrla_mobilenetv2_k32``).

Released quirks reproduced:
  * ONE recurrent conv module is shared by every stage: ``recurrent_convs`` (``recurrent_dsconvs``)
    is a ModuleList holding the same module once per "new cell" (stage 0 and every stride-2 stage:
    5 entries for the standard setting). The state_dict therefore has 5 keys for one tensor and the
    parameter count counts it once; loading a state_dict whose 5 entries differ keeps the last one.
  * Unlike the RLA-ResNet, the update reads the branch output y (before the residual add), and
    ``conv_outs`` has one 1x1 conv per stage (7), with one BatchNorm per block in ``stage_bns``.
  * h is pooled (2x2 average) in every stride-2 block, whether or not it has a shortcut.
  * ECA (``_eca`` forms) uses kernel 1 in stages whose unscaled width c < 96, else 3.
  * The head keeps ``nn.Dropout(0.2)`` before the classifier (``classifier.0``), drawing its mask
    from the global generator in training mode; the stem and head activations are ReLU6.
  * The released code builds h on 'cuda' only; here h follows the input's device and dtype.

Fused paths (backend selection honoured): the depthwise conv is channel-wise, so ``bn_dw(dw(cat(e, h)))``
is computed as two depthwise convs over e and h with the matching weight and BatchNorm slices, and
the pw-linear conv over their concatenation is ``concat_conv_bn_act(.., activation="none")``: the
expanded concatenation is never built. The head's conv2 over ``cat(x, h)`` is the same op (ReLU6
applied after). The dense-recurrent update is ``rla_update(pool=stride 2)``. The depthwise recurrent
update of the ds variant has no fused op (plain PyTorch).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext.models.rla_recurrent import check_state_size, zero_state
from rla_ext.nn import EfficientChannelAttention, bn_args, rla_step
from rla_ext.nn.sync_batchnorm import process_group_of
from rla_ext.ops import concat_conv_bn_act
from rla_ext.ops._validation import check_pool_mode, pool_state

# t (expansion), c (output channels), n (blocks), s (stride of the first block)
DEFAULT_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round v to the nearest multiple of divisor (at least min_value), never more than 10% below v."""
    min_value = divisor if min_value is None else min_value
    out = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU6; names 0 (conv), 1 (bn). (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


def _weight_as(w: Tensor, like: Tensor) -> Tensor:
    return w if w.dtype == like.dtype else w.to(like.dtype)


def _split_bn_relu6(parts: Sequence[Tensor], bn: nn.BatchNorm2d) -> list[Tensor]:
    """relu6(bn(cat(parts))) returned as its channel slices, without building the concatenation.

    One bookkeeping step for the whole BatchNorm (num_batches_tracked counts once), then one
    ``F.batch_norm`` per slice on views of the parameters and running statistics (updated in place).
    """
    a = bn_args(bn)
    out, lo = [], 0
    for p in parts:
        hi = lo + p.shape[1]

        def sl(t: Tensor | None, lo: int = lo, hi: int = hi) -> Tensor | None:
            return None if t is None else t[lo:hi]

        out.append(F.relu6(F.batch_norm(p, sl(a.running_mean), sl(a.running_var), sl(a.weight), sl(a.bias),
                                        a.training, a.momentum, a.eps)))
        lo = hi
    return out


def _fused_conv_bn(x: Tensor, h: Tensor, conv: nn.Conv2d, bn: nn.Module, backend: str | None) -> Tensor:
    """bn(conv1x1(cat(x, h))) through concat_conv_bn_act (no activation)."""
    a = bn_args(bn)
    return concat_conv_bn_act(x, h, _weight_as(conv.weight, x), a.weight, a.bias, a.running_mean, a.running_var,
                              training=a.training, momentum=a.momentum, eps=a.eps, activation="none",
                              backend=backend, process_group=process_group_of(bn))


class RLAInvertedResidual(nn.Module):
    """The released RLA inverted-residual block. ``forward(x, h) -> (out, y)``.

    x (N, inp, H, W), h (N, k, H, W) -> out (N, oup, H/s, W/s) (block output) and y (N, oup, H/s, W/s)
    (the branch output, which the RLA update reads). Names: conv1x1.{0,1} (expansion, absent when
    expand_ratio == 1), conv.0.{0,1} (depthwise over hidden + k channels), conv.1 (pw-linear),
    conv.2 (its BatchNorm), conv.3 (ECA, optional). ``pool_h``: h must be 2x2-pooled after it.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, rla_channel: int,
                 eca_kernel: int | None = None, backend: str | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride}")
        self.stride = stride
        self.hidden = hidden = int(round(inp * expand_ratio))
        wide = hidden + rla_channel
        self.use_res_connect = stride == 1 and inp == oup
        self.conv1x1 = ConvBNReLU6(inp, hidden, kernel_size=1) if expand_ratio != 1 else None
        layers: list[nn.Module] = [ConvBNReLU6(wide, wide, stride=stride, groups=wide),
                                   nn.Conv2d(wide, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        if eca_kernel is not None:
            layers.append(EfficientChannelAttention(oup, eca_kernel))
        self.conv = nn.Sequential(*layers)
        self.pool_h = stride != 1
        self.backend = backend

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        e = x if self.conv1x1 is None else self.conv1x1(x)
        dw, dw_bn = self.conv[0][0], self.conv[0][1]
        if type(dw_bn) is nn.BatchNorm2d:  # channel-wise: split instead of concatenating
            w = _weight_as(dw.weight, e)
            c = self.hidden
            de = F.conv2d(e, w[:c], None, self.stride, 1, 1, c)
            dh = F.conv2d(h, w[c:], None, self.stride, 1, 1, w.shape[0] - c)
            de, dh = _split_bn_relu6((de, dh), dw_bn)
        else:  # a synchronised (or other) norm: the released path, concatenation and all
            d = self.conv[0](torch.cat((e, h), 1))
            de, dh = d[:, :self.hidden].contiguous(), d[:, self.hidden:].contiguous()
        y = _fused_conv_bn(de, dh, self.conv[1], self.conv[2], self.backend)
        if len(self.conv) > 3:
            y = self.conv[3](y)
        return (x + y if self.use_res_connect else y), y


class RLA_MobileNetV2(nn.Module):  # noqa: N801  (the released class name)
    """RLA-MobileNetV2 with a dense 3x3 recurrent conv. (N, 3, H, W) -> (N, num_classes), H and W
    multiples of 32 (any size with ``pool_mode="ceil"``).

    Args (as released, plus ``pool_mode`` and ``backend``):
        num_classes: classifier outputs. width_mult: channel multiplier. rla_channel: k.
        inverted_residual_setting: rows (t, c, n, s); default the MobileNetV2 table.
        round_nearest: channel rounding multiple. ECA: add ECA (kernel 1 for c < 96, else 3).
        pool_mode: how h is 2x2-pooled in stride-2 blocks: "floor" (default, as released: input sides
            must be multiples of 32, else ValueError) or "ceil" (ceil-mode pooling to the strided
            depthwise convs' size, ceil(H / 2): any input size; same numbers where "floor" runs).
        backend: rla_ext backend of the fused ops (None: the selection in force).
    """

    depthwise_recurrent = False

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, rla_channel: int = 32,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None, round_nearest: int = 8,
                 ECA: bool = False, *, pool_mode: str = "floor",  # noqa: N803  (released name)
                 backend: str | None = None) -> None:
        super().__init__()
        self.pool_mode = check_pool_mode(pool_mode)
        setting = [tuple(r) for r in (inverted_residual_setting or DEFAULT_SETTING)]
        if not setting or any(len(r) != 4 for r in setting):
            raise ValueError(f"inverted_residual_setting: expected non-empty rows (t, c, n, s), got {setting}")
        self.rla_channel = rla_channel
        self.backend = backend
        k = rla_channel
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.conv1 = ConvBNReLU6(3, input_channel, stride=2)
        # Stage j uses recurrent conv entry _rec_index[j]: a new entry at stage 0 and at every stride-2 stage.
        new_cells = [0] + [j for j in range(1, len(setting)) if setting[j][3] == 2]
        self._rec_index = [sum(1 for c in new_cells if c <= j) - 1 for j in range(len(setting))]
        stages, stage_bns, conv_outs = [], [], []
        for t, c, n, s in setting:
            out_ch = make_divisible(c * width_mult, round_nearest)
            eca = (1 if c < 96 else 3) if ECA else None
            blocks = []
            for i in range(n):
                blocks.append(RLAInvertedResidual(input_channel, out_ch, s if i == 0 else 1, t, k, eca, backend))
                input_channel = out_ch
            stages.append(nn.ModuleList(blocks))
            stage_bns.append(nn.ModuleList(nn.BatchNorm2d(k) for _ in range(n)))
            conv_outs.append(nn.Conv2d(out_ch, k, 1, bias=False))
        self.stages = nn.ModuleList(stages)
        self.conv_outs = nn.ModuleList(conv_outs)
        rec = nn.Conv2d(k, k, 3, padding=1, groups=k if self.depthwise_recurrent else 1, bias=False)
        setattr(self, self._rec_name, nn.ModuleList([rec] * len(new_cells)))  # one module, listed per new cell
        self.stage_bns = nn.ModuleList(stage_bns)
        self.conv2 = ConvBNReLU6(input_channel + k, self.last_channel, kernel_size=1)
        self.bn2 = nn.BatchNorm2d(k)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():  # as released
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def _rec_name(self) -> str:
        return "recurrent_dsconvs" if self.depthwise_recurrent else "recurrent_convs"

    def recurrent_conv(self, stage: int) -> nn.Conv2d:
        """The recurrent conv stage `stage` uses (the same module for every stage, as released)."""
        return getattr(self, self._rec_name)[self._rec_index[stage]]

    def set_backend(self, name: str | None) -> "RLA_MobileNetV2":
        """Use backend `name` for every fused op of this model (None: follow rla_ext's selection)."""
        self.backend = name
        for m in self.modules():
            if isinstance(m, RLAInvertedResidual):
                m.backend = name
        return self

    def _update(self, h: Tensor, y: Tensor, stage: int, bn: nn.Module, pool: bool) -> Tensor:
        rec, conv_out = self.recurrent_conv(stage), self.conv_outs[stage]
        if not self.depthwise_recurrent:
            return rla_step(h, y, conv_out, rec, bn, pool=pool, pool_mode=self.pool_mode,
                            backend=self.backend)
        if pool:
            h = pool_state(h, self.pool_mode)
        check_state_size(h, y, self.pool_mode)
        return rec(torch.tanh(bn(h + conv_out(y))))

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3, H, W) -> (x (N, C_last, H/32, W/32), h (N, k, H/32, W/32)) before the head."""
        x = self.conv1(x)
        h = zero_state(x, self.rla_channel)
        for j, stage in enumerate(self.stages):
            for i, block in enumerate(stage):
                x, y = block(x, h)
                h = self._update(h, y, j, self.stage_bns[j][i], block.pool_h)
        return x, h

    def forward_head(self, x: Tensor, h: Tensor) -> Tensor:
        """relu6(bn2(h)); conv2 + BN + ReLU6 over cat(x, h) (fused, no concat); pool; dropout; linear."""
        h = F.relu6(self.bn2(h))
        x = F.relu6(_fused_conv_bn(x, h, self.conv2[0], self.conv2[1], self.backend))
        return self.classifier(x.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(*self.forward_features(x))


class dsRLA_MobileNetV2(RLA_MobileNetV2):  # noqa: N801  (the released class name)
    """RLA-MobileNetV2 whose shared recurrent conv is depthwise (k -> k, groups = k), held at
    ``recurrent_dsconvs``. Arguments as :class:`RLA_MobileNetV2`."""

    depthwise_recurrent = True


def _constructor(cls: type[RLA_MobileNetV2], name: str, k: int, eca: bool) -> Callable[..., RLA_MobileNetV2]:
    def build(num_classes: int = 1000, rla_channel: int = k, *, backend: str | None = None,
              **kwargs: Any) -> RLA_MobileNetV2:
        kwargs.setdefault("ECA", eca)
        return cls(num_classes=num_classes, rla_channel=rla_channel, backend=backend, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{cls.__name__} with k = {k}{' and ECA' if eca else ''} (released ``{name}``): "
                     "(N, 3, 224, 224) -> (N, num_classes).")
    return build


def mobilenetv2_constructors() -> dict[str, Callable[..., RLA_MobileNetV2]]:
    """Every released name: {rla,dsrla}_mobilenetv2[_k6|_k12|_k24|_k32][_eca] (no suffix: k = 32)."""
    out = {}
    for prefix, cls in (("rla", RLA_MobileNetV2), ("dsrla", dsRLA_MobileNetV2)):
        for suffix, k in (("", 32), ("_k6", 6), ("_k12", 12), ("_k24", 24), ("_k32", 32)):
            for eca in (False, True):
                name = f"{prefix}_mobilenetv2{suffix}{'_eca' if eca else ''}"
                out[name] = _constructor(cls, name, k, eca)
    return out


__all__ = ["RLA_MobileNetV2", "dsRLA_MobileNetV2", "RLAInvertedResidual", "ConvBNReLU6", "make_divisible",
           "mobilenetv2_constructors", "DEFAULT_SETTING"]
