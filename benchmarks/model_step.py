"""End-to-end case: one training step (forward, loss, backward, SGD step) of a whole network.

``rla`` is RLA-ResNet-50 from rla_ext.models (with the provider's backend, or compiled), ``plain``
is the same package's ResNet-50 without RLA, the baseline that shows what RLA costs. The other RLA
families (``rlagru``, ``rlalstm``: RLA-ResNet-50 with a ConvGRU / ConvLSTM cell; ``rla_mnv2``,
``dsrla_mnv2``: (ds)RLA-MobileNetV2; ``rla_densenet121``) are picked with the CLI's --e2e-models. The models
are imported lazily: when rla_ext.models is not there the case raises CaseUnavailable with why.
The whole model is cast to the benchmark dtype (pure low-precision training), identical for every
provider, because the fused ops take one dtype for all activations.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cases import COMPILE, CaseUnavailable, check_provider, compile_module, is_compiled
from benchmarks.shapes import RLA_CHANNELS

# model key -> the rla_ext.models constructor it builds (the name reported in the results).
FACTORIES = {"rla": "rla_resnet50", "plain": "plain_resnet50", "rlagru": "rlagru_resnet50",
             "rlalstm": "rlalstm_resnet50", "rla_mnv2": "rla_mobilenetv2", "dsrla_mnv2": "dsrla_mobilenetv2",
             "rla_densenet121": "rla_densenet121"}
MODELS = tuple(FACTORIES)
# Models without RLA ops: eager (and compiled) only.
PLAIN_MODELS = ("plain",)


def build_model(model: str, backend: str, num_classes: int = 1000) -> nn.Module:
    try:
        from rla_ext import models
    except ImportError as e:
        raise CaseUnavailable(f"rla_ext.models is not available ({e})") from None
    if model not in FACTORIES:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    factory = getattr(models, FACTORIES[model], None)
    if factory is None:
        raise CaseUnavailable(f"rla_ext.models has no {FACTORIES[model]}")
    if model in PLAIN_MODELS:
        return factory(num_classes=num_classes)
    return factory(num_classes=num_classes, rla_channel=RLA_CHANNELS, backend=backend)


@dataclass
class TrainStep:
    """A zero-argument training step and what it processes per call."""

    step: Callable[[], None]
    forward_loss: Callable[[], torch.Tensor]  # the step's forward alone, for measuring what it saves
    batch: int
    model: nn.Module


def make_train_step(model: str, provider: str, *, batch: int, dtype: torch.dtype, device: torch.device | str,
                    image_size: int = 224, channels_last: bool = True, num_classes: int = 1000,
                    compile_mode: str | None = None, seed: int = 0) -> TrainStep:
    """A training step of `model` (a key of FACTORIES) for one provider."""
    device = torch.device(device)
    backend = check_provider(provider, device)
    if model in PLAIN_MODELS and provider not in ("eager", COMPILE):
        raise CaseUnavailable("the plain ResNet-50 has no RLA ops, so fused backends do not apply")
    torch.manual_seed(seed)
    net = build_model(model, backend, num_classes).to(device=device, dtype=dtype).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    images = torch.randn(batch, 3, image_size, image_size, device=device).to(dtype=dtype, memory_format=fmt)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    forward = compile_module(net, device, compile_mode) if is_compiled(provider) else net

    def forward_loss() -> torch.Tensor:
        return F.cross_entropy(forward(images), labels)

    def step() -> None:
        forward_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return TrainStep(step=step, forward_loss=forward_loss, batch=batch, model=net)
