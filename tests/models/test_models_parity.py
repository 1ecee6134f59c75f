"""The fused models against an independent plain-PyTorch RLA-ResNet (published math), float64:
same weights in -> same logits, running statistics and gradients, train and eval, every backend."""
from __future__ import annotations

import copy

import pytest
import torch

from rla_model_testing import assert_grads_close, assert_states_close, backend_params
from published_rla import RefBasic, RefBottleneck, RefRLANet, randomize_
from rla_ext import models
from rla_ext.nn import RLABasicBlock

pytestmark = pytest.mark.isa_sensitive  # rerun on a lower ISA by scripts/test_lower_isa.py

TOL = dict(rtol=1e-7, atol=1e-9)


def _pair(model: torch.nn.Module, ref: torch.nn.Module, seed: int = 0):
    model = randomize_(model.double(), seed)
    ref = ref.double()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


@pytest.mark.parametrize("backend", backend_params(heavy=True))
def test_rla_resnet50_matches_published_math(backend):
    torch.manual_seed(0)
    model, ref = _pair(models.rla_resnet50(backend=backend), RefRLANet([3, 4, 6, 3]))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        ref.train(training)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), **TOL)
        assert_states_close(model, ref, **TOL)


SMALL = {
    "bottleneck": (lambda b: models.RLAResNet([1, 1, 1, 1], 10, 8, widths=(16, 32, 64, 128), backend=b),
                   lambda: RefRLANet([1, 1, 1, 1], 10, 8, widths=(16, 32, 64, 128)), 64),
    "resnext_se": (lambda b: models.RLAResNet([2, 1], 10, 8, groups=4, width_per_group=4, se=True,
                                              widths=(32, 64), backend=b),
                   lambda: RefRLANet([2, 1], 10, 8, groups=4, base_width=4, se=True, widths=(32, 64)), 32),
    "eca": (lambda b: models.RLAResNet([1, 2], 10, 8, eca=(3, 5), widths=(16, 32), backend=b),
            lambda: RefRLANet([1, 2], 10, 8, eca=[3, 5], widths=(16, 32)), 32),
    "cifar_basic": (lambda b: models.rla_resnet20(10, 8, backend=b),
                    lambda: RefRLANet([3, 3, 3], 10, 8, block=RefBasic, cifar=True), 16),
    "cifar_bottleneck": (lambda b: models.rla_resnet29_bottleneck(10, 8, backend=b),
                         lambda: RefRLANet([3, 3, 3], 10, 8, block=RefBottleneck, cifar=True), 16),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("arch", list(SMALL))
def test_small_models_forward_backward(arch, backend):
    build, build_ref, size = SMALL[arch]
    if backend == "triton":  # interpreted on CPU: keep to the two block kinds, at a smaller size
        if arch not in ("bottleneck", "cifar_basic"):
            pytest.skip("Triton's CPU interpreter is slow; bottleneck and cifar_basic cover its kernels")
        size //= 2
    torch.manual_seed(1)
    model, ref = _pair(build(backend), build_ref(), seed=2)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    target = torch.randn(2, 10, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        ref.train(training)
        model.zero_grad()
        ref.zero_grad()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = model(xa), ref(xb)
        torch.testing.assert_close(out_a, out_b, **TOL)
        (out_a * target).sum().backward()
        (out_b * target).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        assert_grads_close(model, ref, **TOL)
        assert_states_close(model, ref, **TOL)


@pytest.mark.parametrize("backend", backend_params())
def test_channels_last_matches(backend):
    torch.manual_seed(3)
    model, ref = _pair(models.RLAResNet([1, 1], 10, 8, widths=(64, 128), backend=backend), RefRLANet(
        [1, 1], 10, 8, widths=(64, 128)))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model, ref = model.to(memory_format=torch.channels_last), ref
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref(x), **TOL)


def test_momentum_none_and_no_running_stats_follow_batchnorm():
    """BatchNorm options reach the fused ops exactly as nn.BatchNorm2d applies them."""
    torch.manual_seed(4)
    model, ref = _pair(models.rla_resnet20(10, 8), RefRLANet([3, 3, 3], 10, 8, block=RefBasic, cifar=True))
    ref_modules = dict(ref.named_modules())
    for i, (name, m) in enumerate(model.named_modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = ref_modules[name].momentum = None if i % 2 else 0.3
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(model(x), ref(x), **TOL)
    assert_states_close(model, ref, **TOL)
    assert int(model.stage_bns[0][0].num_batches_tracked) == 6


def test_track_running_stats_false_uses_batch_stats_in_eval():
    torch.manual_seed(5)

    def no_stats(module):
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        return module

    model = no_stats(models.RLAResNet([1, 1], 10, 8, widths=(64, 128)).double())
    ref = no_stats(RefRLANet([1, 1], 10, 8, widths=(64, 128)).double())
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), **TOL)
    assert all(b is None for n, b in model.named_buffers()) or not list(model.buffers())


def test_shared_blocks_equal_unshared_with_tied_weights():
    """The shared-block recurrence is the ordinary network with blocks 1.. of a stage tied."""
    torch.manual_seed(6)
    shared = randomize_(models.rla_resnet20(10, 8, shared_blocks=True).double(), 7)
    plain = models.rla_resnet20(10, 8).double()
    sd = {}
    for k, v in shared.state_dict().items():
        parts = k.split(".")
        if parts[0] == "stages" and parts[2] == "1":
            for t in range(1, 3):
                sd[".".join(parts[:2] + [str(t)] + parts[3:])] = v
        elif parts[0] == "step_norms":   # step_norms.{s}.{t-2}.{i}.* -> stages.{s}.{t}.bn{i+1}.*
            s, t, i = int(parts[1]), int(parts[2]) + 2, int(parts[3])
            sd[f"stages.{s}.{t}.bn{i + 1}." + ".".join(parts[4:])] = v
        else:
            sd[k] = v
    plain.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for training in (True, False):
        shared.train(training)
        plain.train(training)
        torch.testing.assert_close(shared(x), plain(x), **TOL)


def test_shared_blocks_parameters_do_not_grow_with_depth():
    def conv_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if "bn" not in n and "norm" not in n)

    def bn_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if "bn" in n or "norm" in n)

    small = models.rla_resnet_cifar(20, shared_blocks=True)
    deep = models.rla_resnet_cifar(110, shared_blocks=True)
    assert conv_params(small) == conv_params(deep)
    # only per-step BatchNorms are added with depth
    assert bn_params(deep) > bn_params(small)
    assert sum(p.numel() for p in models.rla_resnet_cifar(110).parameters()) > 5 * conv_params(deep)
