"""RLA-ResNet (Zhao, Fang & Li, NeurIPS 2021) on the fused ops, with the published checkpoint names.

Data flow (N images):
    stem -> x (N, C0, H, W);  h = zeros (N, k, H, W)
    for each stage s, block t:  x = block(x, h)                      # conv1 reads cat(x, h)
                                h = rec3x3_s(tanh(bn_{s,t}(pool?(h) + out1x1_s(x))))
    head: h = relu(bn2(h)); logits = fc(mean_hw(cat(x, h)))

Module names: conv1, bn1, stages.{s}.{t}, conv_outs.{s}, recurrent_convs.{s}, stage_bns.{s}.{t},
bn2, fc (exactly the released checkpoints'); SE / ECA live at stages.{s}.{t}.se.fc.{0,2} and
stages.{s}.{t}.eca.conv, also as released. With ``shared_blocks=True`` (the shared-block
recurrence) stage s holds only two blocks, stages.{s}.0 and the shared stages.{s}.1, and the
BatchNorms of steps 2.. of the shared block live at step_norms.{s}.{t-2}.{i}.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext import _backend
from rla_ext.nn import (EarlyExitHead, RLABasicBlock, RLABottleneck, boundary_pays, make_downsample, rla_boundary,
                        rla_step)
from rla_ext.ops._validation import check_pool_mode

_WIDTHS = {"imagenet": (64, 128, 256, 512), "cifar": (16, 32, 64)}


def stage_arguments(layers: Sequence[int], widths: Sequence[int] | None, default_widths: Sequence[int],
                    eca: Sequence[int] | None) -> tuple[tuple[int, ...], list]:
    """(widths, eca) of a ResNet-style constructor, checked: one positive block count, width and
    ECA kernel size (None: no ECA) per stage."""
    widths = tuple(widths) if widths is not None else tuple(default_widths[:len(layers)])
    if len(widths) != len(layers) or not layers or min(layers) < 1:
        raise ValueError(f"layers {tuple(layers)} and widths {widths}: expected one positive block count per "
                         "stage width")
    eca = [None] * len(layers) if eca is None else list(eca)
    if len(eca) != len(layers):
        raise ValueError(f"eca: expected one kernel size per stage ({len(layers)}), got {eca}")
    return widths, eca


class RLAResNet(nn.Module):
    """An RLA-ResNet. x (N, in_channels, H, W) -> logits (N, num_classes).

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3) for RLA-ResNet-50.
        num_classes: classifier outputs. rla_channel: k, the channels of the RLA state h.
        block: RLABottleneck (default) or RLABasicBlock.
        se: squeeze-excitation in every block. eca: ECA kernel size per stage (or None).
        groups, width_per_group: ResNeXt cardinality and width (32, 4 for 32x4d).
        zero_init_last_bn: start every residual branch's last BatchNorm at weight 0.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
        widths: planes per stage (default (64,128,256,512) or (16,32,64) for the cifar stem).
        shared_blocks: every block of a stage after the first reuses one set of block weights;
            each step keeps its own BatchNorms (block and RLA).
        pool_mode: how the RLA state h is 2x2-pooled at each stage's first (stride-2) block.
            "floor" (default): as published; the pooled h drops an odd last row / column while the
            strided convs round up, so input sides must be multiples of 32 (2**(stages - 1) with the
            cifar stem) or the update raises ValueError. "ceil": ceil-mode pooling (edge windows
            average what they cover) to the strided convs' size, ceil(H / 2): any input size runs.
            Same numbers as "floor" wherever "floor" runs; no parameter changes (checkpoints load).
        backend: rla_ext backend for every fused op in the network (None: selection in force).
        fuse_boundary: between two bottlenecks (within a stage and across stages: every boundary but
            the last block's), run block t's RLA update and block t+1's entry as one op
            (``rla_ext.nn.rla_boundary``: y read once, one GEMM over y for both 1x1 convs).
            None (default): when the backend in force is "cpp" (the only one measured: the CUDA /
            Triton boundary kernels wait for a GPU run; True runs them) and at shapes where that was
            measured faster
            (``rla_ext.nn.boundary_pays``: the large early stages); True: at every such boundary;
            False: never. Same numbers either way, up to rounding.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, rla_channel: int = 32, *,
                 block: type[nn.Module] = RLABottleneck, se: bool = False, eca: Sequence[int] | None = None,
                 reduction: int = 16, groups: int = 1, width_per_group: int = 64,
                 zero_init_last_bn: bool = False, stem: str = "imagenet", widths: Sequence[int] | None = None,
                 in_channels: int = 3, shared_blocks: bool = False, pool_mode: str = "floor",
                 backend: str | None = None, fuse_boundary: bool | None = None) -> None:
        super().__init__()
        if stem not in _WIDTHS:
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
        widths, eca = stage_arguments(layers, widths, _WIDTHS[stem], eca)
        self.pool_mode = check_pool_mode(pool_mode)
        self.rla_channel = rla_channel
        self.stem_kind = stem
        self.layers = tuple(int(n) for n in layers)
        self.shared_blocks = shared_blocks
        self.backend = backend
        self.fuse_boundary = fuse_boundary

        inplanes = 64 if stem == "imagenet" else widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, inplanes, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, inplanes, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)

        opts = dict(rla_channel=rla_channel, groups=groups, base_width=width_per_group, se=se, reduction=reduction,
                    backend=backend)
        stages, conv_outs, recurrent_convs, stage_bns, step_norms = [], [], [], [], []
        for s, (planes, n) in enumerate(zip(widths, self.layers)):
            stride = 1 if s == 0 else 2
            out_planes = planes * block.expansion
            down = make_downsample(inplanes, out_planes, stride) if stride != 1 or inplanes != out_planes else None
            blocks = [block(inplanes, planes, stride, down, eca_kernel=eca[s], **opts)]
            inplanes = out_planes
            n_built = min(n, 2) if shared_blocks else n
            blocks += [block(inplanes, planes, eca_kernel=eca[s], **opts) for _ in range(1, n_built)]
            stages.append(nn.ModuleList(blocks))
            if shared_blocks:
                step_norms.append(nn.ModuleList(
                    nn.ModuleList(nn.BatchNorm2d(m.num_features) for m in blocks[1].norms()) for _ in range(2, n)))
            conv_outs.append(nn.Conv2d(out_planes, rla_channel, 1, bias=False))
            recurrent_convs.append(nn.Conv2d(rla_channel, rla_channel, 3, padding=1, bias=False))
            stage_bns.append(nn.ModuleList(nn.BatchNorm2d(rla_channel) for _ in range(n)))
        self.stages = nn.ModuleList(stages)
        self.conv_outs = nn.ModuleList(conv_outs)
        self.recurrent_convs = nn.ModuleList(recurrent_convs)
        self.stage_bns = nn.ModuleList(stage_bns)
        if shared_blocks:
            self.step_norms = nn.ModuleList(step_norms)
        self.bn2 = nn.BatchNorm2d(rla_channel)
        self.num_features = inplanes + rla_channel
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_last_bn)

    def _init_weights(self, zero_init_last_bn: bool) -> None:
        # As released: He-normal (fan_out) for every 2-D conv, including the RLA convs; BN = (1, 0);
        # linear layers and ECA's 1-D conv keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for s in range(len(self.stages)):
                for t in range(self.layers[s]):
                    block, norms = self._block_at(s, t)
                    nn.init.zeros_((norms or block.norms())[-1].weight)

    # ---------------------------------------------------------------- backend selection
    def set_backend(self, name: str | None) -> "RLAResNet":
        """Use backend `name` for every fused op of this model (None: follow rla_ext's selection)."""
        for m in self.modules():
            if hasattr(m, "backend") and (m is self or isinstance(m, (RLABottleneck, RLABasicBlock))):
                m.backend = name
        return self

    # ---------------------------------------------------------------- forward pieces
    def _block_at(self, s: int, t: int) -> tuple[nn.Module, Sequence[nn.Module] | None]:
        blocks = self.stages[s]
        if not self.shared_blocks or t < 2:
            return blocks[t], None
        return blocks[1], self.step_norms[s][t - 2]

    def stem(self, x: Tensor) -> Tensor:
        """x (N, in, H, W) -> (N, C0, H/4, W/4) (imagenet stem) or (N, C0, H, W) (cifar stem)."""
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem_kind == "imagenet":
            x = F.max_pool2d(x, 3, stride=2, padding=1)
        return x

    def initial_state(self, x: Tensor) -> Tensor:
        """h_0 = zeros (N, k, H, W) with x's dtype, device and memory format."""
        n, _, height, width = x.shape
        h = x.new_zeros((n, self.rla_channel, height, width))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            h = h.contiguous(memory_format=torch.channels_last)
        return h

    def _following_block(self, s: int, t: int) -> tuple[nn.Module, Sequence[nn.Module] | None] | None:
        """The block that reads block (s, t)'s output next (the next stage's first across a stage
        boundary), with its BatchNorms as _block_at gives them; None after the last block."""
        if t + 1 < self.layers[s]:
            return self._block_at(s, t + 1)
        return self._block_at(s + 1, 0) if s + 1 < len(self.stages) else None

    def fuses_boundary(self) -> bool:
        """Whether run_blocks fuses block boundaries (see ``fuse_boundary``; with None, only where
        ``boundary_pays``)."""
        if self.fuse_boundary is not None:
            return self.fuse_boundary
        return (self.backend if self.backend is not None else _backend.get_backend()) == "cpp"

    def run_blocks(self, x: Tensor, h: Tensor, states: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Every block and RLA update from stem output x and h_0 -> (x_T, h_T).

        When ``states`` is a list, h_t after every block is appended to it (per-depth reading).
        """
        fuse = self.fuses_boundary()
        entry = None  # the next block's entry output, when the boundary op computed it
        for s in range(len(self.stages)):
            conv_out, rec = self.conv_outs[s], self.recurrent_convs[s]
            for t in range(self.layers[s]):
                block, norms = self._block_at(s, t)
                x = block(x, h, norms) if entry is None else block(x, h, norms, entry=entry)
                entry = None
                following = self._following_block(s, t) if fuse else None
                if (following is not None and isinstance(following[0], RLABottleneck)
                        and (self.fuse_boundary or boundary_pays(x))):
                    h, entry = rla_boundary(h, x, conv_out, rec, self.stage_bns[s][t], *following, pool=block.pool_h,
                                            pool_mode=self.pool_mode, backend=self.backend)
                else:
                    h = rla_step(h, x, conv_out, rec, self.stage_bns[s][t], pool=block.pool_h,
                                 pool_mode=self.pool_mode, backend=self.backend)
                if states is not None:
                    states.append(h)
        return x, h

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, in, H, W) -> (x_T (N, C, h, w), h_T (N, k, h, w)), the last block's output and state."""
        x = self.stem(x)
        return self.run_blocks(x, self.initial_state(x))

    def forward_head(self, x: Tensor, h: Tensor) -> Tensor:
        """(x_T, h_T) -> logits: fc(mean_hw(cat(x, relu(bn2(h))))). Pooling the parts separately
        equals pooling the concatenation, without building it."""
        h = F.relu(self.bn2(h))
        feats = torch.cat((x.mean(dim=(2, 3)), h.mean(dim=(2, 3))), dim=1)
        return self.fc(feats)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(*self.forward_features(x))

    # ---------------------------------------------------------------- per-depth reading
    @property
    def depth(self) -> int:
        """Number of RLA steps (blocks) in the network."""
        return sum(self.layers)

    def forward_features_per_depth(self, x: Tensor) -> list[Tensor]:
        """The aggregated RLA state after every block: a list of ``depth`` tensors h_t (N, k, H_t, W_t)."""
        x = self.stem(x)
        states: list[Tensor] = []
        self.run_blocks(x, self.initial_state(x), states)
        return states

    def make_early_exit_heads(self, num_classes: int | None = None) -> nn.ModuleList:
        """One :class:`EarlyExitHead` per depth (not part of the model's state; train them separately)."""
        num_classes = self.fc.out_features if num_classes is None else num_classes
        return nn.ModuleList(EarlyExitHead(self.rla_channel, num_classes) for _ in range(self.depth))

    def early_exit_logits(self, x: Tensor, heads: nn.ModuleList) -> list[Tensor]:
        """Logits (N, classes) of ``heads[t]`` applied to h_t, for every depth t."""
        states = self.forward_features_per_depth(x)
        if len(heads) != len(states):
            raise ValueError(f"heads: expected {len(states)} heads (one per depth), got {len(heads)}")
        return [head(h) for head, h in zip(heads, states)]
