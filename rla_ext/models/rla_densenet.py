"""RLA-DenseNet: DenseNet-BC with a recurrent layer aggregation state (ours; the released code has
none). The equations are in docs/MODELS.md; in short, per dense block b and layer t::

    F_t   = cat(x_0, x_1, ..., x_{t-1})                                  # the dense block's features
    z_t   = relu(norm2(conv1(cat(relu(norm1(F_t)), h_{t-1}))))           # 1x1 over [features, state]
    x_t   = conv2(z_t)                                                   # 3x3, growth_rate channels
    h_t   = rec_b(tanh(bn_{b,t}(h_{t-1} + out_b(x_t))))                 # out_b 1x1, rec_b 3x3: shared in b
    transition: F <- avgpool2(conv(relu(norm(F))))  (compression 0.5);  h <- avgpool2(h)  (both in pool_mode)
    head: logits = classifier(cat(mean_hw(relu(norm5(F))), mean_hw(relu(bn2(h)))))

The layer's 1x1 bottleneck reads the concatenation of its features and the state (the paper's
"concatenation + 1x1 conv" aggregation): it is ``rla_ext.ops.concat_conv_bn_act`` (no concat built).
The state update is ``rla_ext.ops.rla_update``. Both honour the backend selection.

Names: conv0 / norm0 (stem), blocks.{b}.{t}.{norm1,conv1,norm2,conv2}, transitions.{b}.{norm,conv},
conv_outs.{b}, recurrent_convs.{b}, stage_bns.{b}.{t}, norm5, bn2, classifier.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rla_ext.models.rla_recurrent import check_state_size, zero_state
from rla_ext.nn import bn_args, rla_step
from rla_ext.nn.sync_batchnorm import process_group_of
from rla_ext.ops import concat_conv_bn_act
from rla_ext.ops._validation import check_pool_mode, pool_state


class RLADenseLayer(nn.Module):
    """One DenseNet-BC layer reading the RLA state. ``forward(F, h)``: F (N, C_in, H, W) the block's
    concatenated features, h (N, k, H, W) -> x_t (N, growth_rate, H, W)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, rla_channel: int,
                 backend: str | None = None) -> None:
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels + rla_channel, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        self.backend = backend

    def forward(self, features: Tensor, h: Tensor) -> Tensor:
        a = F.relu(self.norm1(features))
        b = bn_args(self.norm2)
        w = self.conv1.weight
        z = concat_conv_bn_act(a, h, w if w.dtype == a.dtype else w.to(a.dtype), b.weight, b.bias, b.running_mean,
                               b.running_var, training=b.training, momentum=b.momentum, eps=b.eps, activation="relu",
                               backend=self.backend, process_group=process_group_of(self.norm2))
        return self.conv2(z)


class RLATransition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv (compression) -> 2x2 average pool. (N, C, H, W) -> (N, C_out, H/2, W/2),
    the pool in ``pool_mode`` ("floor": H // 2, as torchvision's DenseNet; "ceil": ceil(H / 2))."""

    def __init__(self, in_channels: int, out_channels: int, pool_mode: str = "floor") -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool_mode = check_pool_mode(pool_mode)

    def forward(self, x: Tensor) -> Tensor:
        return pool_state(self.conv(F.relu(self.norm(x))), self.pool_mode)


class RLADenseNet(nn.Module):
    """RLA-DenseNet-BC. x (N, 3, H, W) -> logits (N, num_classes).

    Args:
        block_config: layers per dense block ((6, 12, 24, 16) for -121, (16, 16, 16) for CIFAR BC-100).
        growth_rate: channels each layer adds. num_init_features: stem output channels.
        bn_size: bottleneck width factor (width = bn_size * growth_rate). compression: transition
            channel factor. num_classes: outputs. rla_channel: k, the channels of h.
        stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (3x3 conv only).
        pool_mode: the rounding of the transitions' 2x2 average pool, which pools the features F and
            the RLA state h alike, so every input size runs in both modes: "floor" (default, as
            torchvision's DenseNet: an odd last row / column is dropped) or "ceil" (ceil(H / 2); edge
            windows average what they cover). The two agree at sides that stay even (multiples of 32
            for the imagenet stem, of 2**(blocks - 1) for the cifar stem).
        backend: rla_ext backend of the fused ops (None: the selection in force).
    """

    def __init__(self, block_config: Sequence[int] = (6, 12, 24, 16), growth_rate: int = 32,
                 num_init_features: int = 64, bn_size: int = 4, compression: float = 0.5, num_classes: int = 1000,
                 rla_channel: int = 32, *, stem: str = "imagenet", pool_mode: str = "floor",
                 backend: str | None = None) -> None:
        super().__init__()
        self.pool_mode = check_pool_mode(pool_mode)
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
        if not block_config or min(block_config) < 1:
            raise ValueError(f"block_config: expected positive layer counts, got {tuple(block_config)}")
        self.stem_kind = stem
        self.rla_channel = k = rla_channel
        self.block_config = tuple(int(n) for n in block_config)
        self.backend = backend
        c = num_init_features
        if stem == "imagenet":
            self.conv0 = nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)
            self.norm0 = nn.BatchNorm2d(c)
        else:
            self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        blocks, transitions, conv_outs, recs, stage_bns = [], [], [], [], []
        for b, n in enumerate(self.block_config):
            blocks.append(nn.ModuleList(RLADenseLayer(c + t * growth_rate, growth_rate, bn_size, k, backend)
                                        for t in range(n)))
            conv_outs.append(nn.Conv2d(growth_rate, k, 1, bias=False))
            recs.append(nn.Conv2d(k, k, 3, padding=1, bias=False))
            stage_bns.append(nn.ModuleList(nn.BatchNorm2d(k) for _ in range(n)))
            c += n * growth_rate
            if b != len(self.block_config) - 1:
                transitions.append(RLATransition(c, int(c * compression), self.pool_mode))
                c = int(c * compression)
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.conv_outs = nn.ModuleList(conv_outs)
        self.recurrent_convs = nn.ModuleList(recs)
        self.stage_bns = nn.ModuleList(stage_bns)
        self.norm5 = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(k)
        self.num_features = c + k
        self.classifier = nn.Linear(c + k, num_classes)
        for m in self.modules():  # torchvision DenseNet's initialisation, RLA convs included
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def set_backend(self, name: str | None) -> "RLADenseNet":
        """Use backend `name` for every fused op of this model (None: follow rla_ext's selection)."""
        self.backend = name
        for m in self.modules():
            if isinstance(m, RLADenseLayer):
                m.backend = name
        return self

    def stem(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, num_init_features, H/4, W/4) (imagenet) or (N, ., H, W) (cifar)."""
        x = self.conv0(x)
        if self.stem_kind == "imagenet":
            x = F.max_pool2d(F.relu(self.norm0(x)), 3, stride=2, padding=1)
        return x

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (F (N, C, h, w) the last block's features, h (N, k, h, w) the state)."""
        x = self.stem(x)
        h = zero_state(x, self.rla_channel)
        for b, layers in enumerate(self.blocks):
            feats = [x]
            for t, layer in enumerate(layers):
                new = layer(feats[0] if len(feats) == 1 else torch.cat(feats, 1), h)
                h = rla_step(h, new, self.conv_outs[b], self.recurrent_convs[b], self.stage_bns[b][t],
                             backend=self.backend)
                feats.append(new)
            x = torch.cat(feats, 1)
            if b < len(self.transitions):
                x = self.transitions[b](x)
                h = pool_state(h, self.transitions[b].pool_mode)  # the same pooling as the features'
                check_state_size(h, x, self.pool_mode)
        return x, h

    def forward_head(self, x: Tensor, h: Tensor) -> Tensor:
        """classifier(cat(mean_hw(relu(norm5(x))), mean_hw(relu(bn2(h)))))."""
        x = F.relu(self.norm5(x)).mean(dim=(2, 3))
        h = F.relu(self.bn2(h)).mean(dim=(2, 3))
        return self.classifier(torch.cat((x, h), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(*self.forward_features(x))


_IMAGENET = {121: ((6, 12, 24, 16), 32, 64), 169: ((6, 12, 32, 32), 32, 64), 201: ((6, 12, 48, 32), 32, 64),
             161: ((6, 12, 36, 24), 48, 96)}
_CIFAR = {100: 12, 250: 24, 190: 40}  # DenseNet-BC depth -> growth rate (the canonical BC configurations)


def rla_densenet_cifar(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, rla_channel: int = 16, *,
                       backend: str | None = None, **kwargs: Any) -> RLADenseNet:
    """A CIFAR-size RLA-DenseNet-BC: three dense blocks of (depth - 4) / 6 layers, 2 * growth_rate stem
    channels. (N, 3, 32, 32) -> (N, num_classes)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth: expected 6n + 4 for DenseNet-BC, got {depth}")
    n = (depth - 4) // 6
    kwargs.setdefault("num_init_features", 2 * growth_rate)
    return RLADenseNet((n, n, n), growth_rate, num_classes=num_classes, rla_channel=rla_channel, stem="cifar",
                       backend=backend, **kwargs)


def _imagenet(depth: int) -> Callable[..., RLADenseNet]:
    cfg, growth, init = _IMAGENET[depth]

    def build(num_classes: int = 1000, rla_channel: int = 32, *, backend: str | None = None,
              **kwargs: Any) -> RLADenseNet:
        return RLADenseNet(cfg, growth, init, num_classes=num_classes, rla_channel=rla_channel, backend=backend,
                           **kwargs)

    build.__doc__ = f"RLA-DenseNet-{depth} (blocks {cfg}, growth {growth}): (N, 3, 224, 224) -> (N, num_classes)."
    return build


def _cifar(depth: int) -> Callable[..., RLADenseNet]:
    def build(num_classes: int = 10, rla_channel: int = 16, *, backend: str | None = None,
              **kwargs: Any) -> RLADenseNet:
        return rla_densenet_cifar(depth, _CIFAR[depth], num_classes, rla_channel, backend=backend, **kwargs)

    build.__doc__ = (f"CIFAR-size RLA-DenseNet-BC-{depth} (growth {_CIFAR[depth]}): (N, 3, 32, 32) -> "
                     "(N, num_classes).")
    return build


def densenet_constructors() -> dict[str, Callable[..., RLADenseNet]]:
    """rla_densenet{121,161,169,201} (ImageNet), rla_densenet_bc{100,190,250} (CIFAR), rla_densenet_cifar."""
    out: dict[str, Callable[..., RLADenseNet]] = {f"rla_densenet{d}": _imagenet(d) for d in sorted(_IMAGENET)}
    out.update({f"rla_densenet_bc{d}": _cifar(d) for d in sorted(_CIFAR)})
    out["rla_densenet_cifar"] = rla_densenet_cifar
    return out


__all__ = ["RLADenseNet", "RLADenseLayer", "RLATransition", "rla_densenet_cifar", "densenet_constructors"]
