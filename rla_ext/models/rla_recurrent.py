"""RLA-ResNet with a ConvGRU or ConvLSTM aggregation cell (the released ``RLAgru_ResNet`` /
``RLAlstm_ResNet``: the paper's comparison of aggregation functions).

Data flow (N images), per stage s and block t::

    x = block(x, h)                                   # conv1 reads cat(x, h): fused concat_conv_bn_act
    h (and c) = avgpool2x2(h) if the block downsamples   # floor mode as released; pool_mode="ceil": ceil mode
    a = tanh(bn_{s,t}(conv_out_s(x)))                 # x: the block's FINAL output (released aliasing)
    h = cell_s(a, h)            (GRU)    |    h, c = cell_s(a, (h, c))   (LSTM; c starts at zeros too)
    head: logits = fc(mean_hw(cat(x, h)))             # no BatchNorm / ReLU on h before the head

Released quirks reproduced (and why they matter for checkpoints and outputs):
  * The head has no ``bn2`` and no activation on h (the released code comments them out), so the
    classifier reads the raw cell output and the state_dict has no ``bn2`` entries.
  * The cell of stage s lives at ``recurrent_convs.{s}`` (the name of the plain RLA's 3x3 conv):
    GRU ``gate_conv`` / ``output_conv`` (3x3 with bias) and three ``GroupNorm(1, k, eps=1e-6)``;
    LSTM one bias-free ``conv`` (k + k -> 4k). See :mod:`rla_ext.nn.conv_rnn`.
  * The block output is what the update reads (the released ``y`` aliases it through in-place ops).
  * ``zero_init_last_bn`` defaults to True (every bottleneck's bn3 starts at weight 0).
  * The released constructors build h (and c) on 'cuda' only and ignore their ``rla_channel``
    argument (rlagru_resnet50/101, rlalstm_resnet50); here h follows the input's device and dtype,
    and ``rla_channel`` is honoured (the default, 32, is the released model).

The bottleneck entry ``relu(bn1(conv1(cat(x, h))))`` runs through the fused
``rla_ext.ops.concat_conv_bn_act`` and the cells through ``rla_ext.ops.conv_gru_cell`` /
``conv_lstm_cell`` where the backend has fused cell kernels (cpp; backend selection honoured). The
update's ``tanh(bn(conv1x1(x)))`` is plain PyTorch: no fused op has its shape.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext.nn import RLABottleneck, make_downsample
from rla_ext.nn.conv_rnn import ConvGRUCell, ConvLSTMCell
from rla_ext.models.rla_resnet import stage_arguments
from rla_ext.ops._validation import check_pool_mode, pool_state

_WIDTHS = (64, 128, 256, 512)
ECA_KERNELS = (5, 5, 5, 7)  # the released ECA kernel sizes per stage


def zero_state(x: Tensor, channels: int) -> Tensor:
    """zeros (N, channels, H, W) with x's dtype, device and memory format (channels_last kept)."""
    n, _, height, width = x.shape
    h = x.new_zeros((n, channels, height, width))
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        h = h.contiguous(memory_format=torch.channels_last)
    return h


def check_state_size(h: Tensor, x: Tensor, pool_mode: str = "floor") -> None:
    """With the published ``pool_mode="floor"`` the stride-2 pooling of h floors while strided convs
    round up: sides must be multiples of 32. ``pool_mode="ceil"`` pools h to the strided convs' size."""
    if h.shape[2:] != x.shape[2:]:
        hint = " or build the model with pool_mode='ceil'" if pool_mode == "floor" else ""
        raise ValueError(f"RLA state {tuple(h.shape)} and features {tuple(x.shape)} differ in size: input sides "
                         "must be multiples of 32 (the pooled state floors, the strided convolutions round up)"
                         f"{hint}")


class _RLACellResNet(nn.Module):
    """Shared body of RLAgru_ResNet and RLAlstm_ResNet. x (N, 3, H, W) -> logits (N, num_classes).

    Args:
        layers: bottleneck blocks per stage ((3, 4, 6, 3) for -50, (3, 4, 23, 3) for -101).
        num_classes: classifier outputs. rla_channel: k, channels of h (and c).
        se: squeeze-excitation in every block; eca: ECA kernel size per stage, or None.
        groups, width_per_group: ResNeXt cardinality / width. widths: planes per stage
            (default (64, 128, 256, 512)[:len(layers)]; smaller for tests).
        zero_init_last_bn: bn3 of every block starts at weight 0 (released default True).
        pool_mode: how h (and c) are 2x2-pooled at stride-2 blocks: "floor" (default, as released:
            input sides must be multiples of 32, else ValueError) or "ceil" (ceil-mode pooling to the
            strided convs' size, ceil(H / 2): any input size; same numbers where "floor" runs).
        backend: rla_ext backend of the fused block entries (None: the selection in force).
    """

    cell_type: type[nn.Module]

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, rla_channel: int = 32, *,
                 se: bool = False, eca: Sequence[int] | None = None, reduction: int = 16, groups: int = 1,
                 width_per_group: int = 64, zero_init_last_bn: bool = True, widths: Sequence[int] | None = None,
                 pool_mode: str = "floor", backend: str | None = None) -> None:
        super().__init__()
        widths, eca = stage_arguments(layers, widths, _WIDTHS, eca)
        self.pool_mode = check_pool_mode(pool_mode)
        self.rla_channel = rla_channel
        self.layers = tuple(int(n) for n in layers)
        self.backend = backend
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        opts = dict(rla_channel=rla_channel, groups=groups, base_width=width_per_group, se=se, reduction=reduction,
                    backend=backend)
        stages, conv_outs, cells, stage_bns = [], [], [], []
        for s, (planes, n) in enumerate(zip(widths, self.layers)):
            stride = 1 if s == 0 else 2
            out_planes = planes * RLABottleneck.expansion
            down = make_downsample(inplanes, out_planes, stride) if stride != 1 or inplanes != out_planes else None
            blocks = [RLABottleneck(inplanes, planes, stride, down, eca_kernel=eca[s], **opts)]
            inplanes = out_planes
            blocks += [RLABottleneck(inplanes, planes, eca_kernel=eca[s], **opts) for _ in range(1, n)]
            stages.append(nn.ModuleList(blocks))
            conv_outs.append(nn.Conv2d(out_planes, rla_channel, 1, bias=False))
            cells.append(self._make_cell(rla_channel))
            stage_bns.append(nn.ModuleList(nn.BatchNorm2d(rla_channel) for _ in range(n)))
        self.conv_outs = nn.ModuleList(conv_outs)
        self.recurrent_convs = nn.ModuleList(cells)
        self.stages = nn.ModuleList(stages)
        self.stage_bns = nn.ModuleList(stage_bns)
        self.num_features = inplanes + rla_channel
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():  # as released: He-normal (fan_out) convs incl. the cells'; norms (1, 0)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for stage in self.stages:
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)

    def _make_cell(self, k: int) -> nn.Module:
        raise NotImplementedError

    def set_backend(self, name: str | None) -> "_RLACellResNet":
        """Use backend `name` for every fused op of this model (None: follow rla_ext's selection)."""
        self.backend = name
        for m in self.modules():
            if isinstance(m, (RLABottleneck, ConvGRUCell, ConvLSTMCell)):
                m.backend = name
        return self

    def stem(self, x: Tensor) -> Tensor:
        """x (N, 3, H, W) -> (N, 64, H/4, W/4)."""
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)

    def _cell_step(self, cell: nn.Module, a: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3, H, W) -> (x_T (N, C, H/32, W/32), h_T (N, k, H/32, W/32))."""
        x = self.stem(x)
        state = (zero_state(x, self.rla_channel),) * self.n_states
        for s, stage in enumerate(self.stages):
            conv_out, cell = self.conv_outs[s], self.recurrent_convs[s]
            for t, block in enumerate(stage):
                x = block(x, state[0])
                if block.pool_h:
                    state = tuple(pool_state(v, self.pool_mode) for v in state)
                check_state_size(state[0], x, self.pool_mode)
                a = torch.tanh(self.stage_bns[s][t](conv_out(x)))
                state = self._cell_step(cell, a, state)
        return x, state[0]

    def forward_head(self, x: Tensor, h: Tensor) -> Tensor:
        """fc(mean_hw(cat(x, h))): the pooled parts, concatenated (equal to pooling the concatenation)."""
        return self.fc(torch.cat((x.mean(dim=(2, 3)), h.mean(dim=(2, 3))), dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(*self.forward_features(x))


class RLAgru_ResNet(_RLACellResNet):  # noqa: N801  (the released class name)
    """RLA-ResNet whose per-stage aggregation is a :class:`~rla_ext.nn.conv_rnn.ConvGRUCell`.
    (N, 3, H, W) -> (N, num_classes), H and W multiples of 32 (any size with ``pool_mode="ceil"``).
    Arguments: see the module docstring and :class:`_RLACellResNet`."""

    n_states = 1

    def _make_cell(self, k: int) -> nn.Module:
        return ConvGRUCell(k, k, 3, backend=self.backend)

    def _cell_step(self, cell: nn.Module, a: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (cell(a, state[0]),)


class RLAlstm_ResNet(_RLACellResNet):  # noqa: N801  (the released class name)
    """RLA-ResNet whose per-stage aggregation is a :class:`~rla_ext.nn.conv_rnn.ConvLSTMCell`; the cell
    state c (k channels) travels beside h and is pooled with it. (N, 3, H, W) -> (N, num_classes)."""

    n_states = 2

    def _make_cell(self, k: int) -> nn.Module:
        return ConvLSTMCell(k, k, (3, 3), backend=self.backend)

    def _cell_step(self, cell: nn.Module, a: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return cell(a, (state[0], state[1]))




def _constructor(cls: type[_RLACellResNet], name: str, layers: tuple[int, ...], eca: bool
                 ) -> Callable[..., _RLACellResNet]:
    def build(num_classes: int = 1000, rla_channel: int = 32, *, backend: str | None = None,
              **kwargs: Any) -> _RLACellResNet:
        if eca:
            kwargs.setdefault("eca", ECA_KERNELS)
        return cls(layers, num_classes, rla_channel, backend=backend, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{cls.__name__}-{50 if layers[2] == 6 else 101}{' with ECA (5,5,5,7)' if eca else ''} "
                     f"(released ``{name}``): (N, 3, 224, 224) -> (N, num_classes).")
    return build


def recurrent_constructors() -> dict[str, Callable[..., _RLACellResNet]]:
    """The released names: rlagru_resnet{50,101}[_eca], rlalstm_resnet50."""
    out = {}
    for depth, layers in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))):
        for eca in (False, True):
            name = f"rlagru_resnet{depth}{'_eca' if eca else ''}"
            out[name] = _constructor(RLAgru_ResNet, name, layers, eca)
    out["rlalstm_resnet50"] = _constructor(RLAlstm_ResNet, "rlalstm_resnet50", (3, 4, 6, 3), False)
    return out


__all__ = ["RLAgru_ResNet", "RLAlstm_ResNet", "zero_state", "check_state_size", "recurrent_constructors"]
