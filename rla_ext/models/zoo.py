"""Named constructors (the published model zoo plus small-image variants) and a name registry.

Every constructor takes ``num_classes``, ``rla_channel``, ``backend`` and any other
:class:`RLAResNet` keyword (``zero_init_last_bn``, ``shared_blocks``, ...).
ECA variants use the published kernel sizes (5, 5, 5, 7); SE uses reduction 16.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from rla_ext.models.plain import plain_resnet50
from rla_ext.models.rla_densenet import densenet_constructors
from rla_ext.models.rla_mobilenetv2 import mobilenetv2_constructors
from rla_ext.models.rla_recurrent import recurrent_constructors
from rla_ext.models.rla_resnet import RLAResNet
from rla_ext.nn import RLABasicBlock, RLABottleneck

ECA_KERNELS = (5, 5, 5, 7)
_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
MODELS: dict[str, Callable[..., nn.Module]] = {}


def _register(name: str, fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    fn.__name__ = name
    fn.__qualname__ = name
    MODELS[name] = fn
    globals()[name] = fn
    return fn


def _imagenet(depth: int, *, resnext: bool = False, se: bool = False, eca: bool = False) -> Callable[..., RLAResNet]:
    variant = ("RLA-ResNeXt" if resnext else "RLA-ResNet") + f"-{depth}" + ("-32x4d" if resnext else "")
    variant += " with SE" if se else " with ECA (5,5,5,7)" if eca else ""

    def build(num_classes: int = 1000, rla_channel: int = 32, *, backend: str | None = None,
              **kwargs: Any) -> RLAResNet:
        opts: dict[str, Any] = dict(se=se, eca=ECA_KERNELS if eca else None)
        if resnext:
            opts.update(groups=32, width_per_group=4)
        opts.update(kwargs)
        return RLAResNet(_DEPTHS[depth], num_classes, rla_channel, block=RLABottleneck, backend=backend, **opts)

    build.__doc__ = f"{variant} for 224x224 images: (N, 3, 224, 224) -> (N, num_classes)."
    return build


for _d in (50, 101, 152):
    _register(f"rla_resnet{_d}", _imagenet(_d))
    _register(f"rla_ecanet{_d}", _imagenet(_d, eca=True))
    _register(f"rla_senet{_d}", _imagenet(_d, se=True))
    # The released code's own names for the ECA variants.
    MODELS[f"rla_resnet{_d}_eca"] = MODELS[f"rla_ecanet{_d}"]
for _d in (50, 101):
    _register(f"rla_resnext{_d}_32x4d", _imagenet(_d, resnext=True))
    _register(f"rla_resnext{_d}_32x4d_se", _imagenet(_d, resnext=True, se=True))
    _register(f"rla_resnext{_d}_32x4d_eca", _imagenet(_d, resnext=True, eca=True))


def rla_resnet_cifar(depth: int = 20, num_classes: int = 10, rla_channel: int = 16, *, bottleneck: bool = False,
                     backend: str | None = None, **kwargs: Any) -> RLAResNet:
    """A CIFAR-size RLA-ResNet for 32x32 (or smaller) images: 3x3 stem, three stages (16, 32, 64).

    Basic blocks: depth = 6n + 2 (20, 32, 44, 56, 110). Bottleneck blocks (whose entry is the fused
    concat op): depth = 9n + 2 (29, 47, 164). (N, 3, 32, 32) -> (N, num_classes).
    The published work has no CIFAR model; k = 16 is our default for these narrow networks.
    """
    per, block = (9, RLABottleneck) if bottleneck else (6, RLABasicBlock)
    if depth < per + 2 or (depth - 2) % per:
        raise ValueError(f"depth: expected {per}n + 2 for {'bottleneck' if bottleneck else 'basic'} blocks, "
                         f"got {depth}")
    n = (depth - 2) // per
    kwargs.setdefault("stem", "cifar")
    return RLAResNet((n, n, n), num_classes, rla_channel, block=block, backend=backend, **kwargs)


def _cifar(depth: int, bottleneck: bool = False) -> Callable[..., RLAResNet]:
    def build(num_classes: int = 10, rla_channel: int = 16, *, backend: str | None = None,
              **kwargs: Any) -> RLAResNet:
        return rla_resnet_cifar(depth, num_classes, rla_channel, bottleneck=bottleneck, backend=backend, **kwargs)

    kind = "bottleneck" if bottleneck else "basic"
    build.__doc__ = f"CIFAR-size RLA-ResNet-{depth} ({kind} blocks): (N, 3, 32, 32) -> (N, num_classes)."
    return build


for _d in (20, 32, 44, 56, 110):
    _register(f"rla_resnet{_d}", _cifar(_d))
for _d in (29, 47, 164):
    _register(f"rla_resnet{_d}_bottleneck", _cifar(_d, bottleneck=True))
MODELS["rla_resnet_cifar"] = rla_resnet_cifar
MODELS["plain_resnet50"] = plain_resnet50
# The released aggregation-cell and MobileNetV2 variants, under the released names; RLA-DenseNet (ours).
for _name, _fn in {**recurrent_constructors(), **mobilenetv2_constructors(), **densenet_constructors()}.items():
    _register(_name, _fn)


def list_models() -> list[str]:
    """Every registered constructor name."""
    return sorted(MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with constructor keywords `kwargs`."""
    try:
        fn = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    return fn(**kwargs)
