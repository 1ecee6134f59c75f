"""Sizes and names of the model zoo (the published checkpoint layout), per-depth reading, AMP."""
from __future__ import annotations

import pytest
import torch

import rla_ext
from rla_ext import models


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_rla_resnet50_size_is_published():
    m = models.rla_resnet50()
    assert _n_params(m) == 25_870_696
    assert len(m.state_dict()) == 413


def test_plain_resnet50_is_resnet50_without_rla():
    assert _n_params(models.plain_resnet50()) == 25_557_032
    assert models.plain_resnet50(num_classes=10).fc.out_features == 10


def test_rla_resnet50_names_follow_the_checkpoint_layout():
    keys = set(models.rla_resnet50().state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    want = {"conv1.weight", "fc.weight", "fc.bias"} | {f"{p}.{s}" for p in ("bn1", "bn2") for s in bn}
    for s, n in enumerate((3, 4, 6, 3)):
        want |= {f"conv_outs.{s}.weight", f"recurrent_convs.{s}.weight"}
        for t in range(n):
            want |= {f"stage_bns.{s}.{t}.{x}" for x in bn}
            want |= {f"stages.{s}.{t}.conv{i}.weight" for i in (1, 2, 3)}
            want |= {f"stages.{s}.{t}.bn{i}.{x}" for i in (1, 2, 3) for x in bn}
        want |= {"stages.%d.0.downsample.0.weight" % s} | {f"stages.{s}.0.downsample.1.{x}" for x in bn}
    assert keys == want


def test_block_conv1_reads_x_and_h():
    m = models.rla_resnet50()
    assert tuple(m.stages[0][0].conv1.weight.shape) == (64, 64 + 32, 1, 1)
    assert tuple(m.stages[1][1].conv1.weight.shape) == (128, 512 + 32, 1, 1)
    assert tuple(m.fc.weight.shape) == (1000, 2048 + 32)


@pytest.mark.parametrize("name,depth,groups", [("rla_resnet101", 33, 1), ("rla_resnet152", 50, 1),
                                               ("rla_resnext50_32x4d", 16, 32), ("rla_resnext101_32x4d", 33, 32)])
def test_depth_and_groups(name, depth, groups):
    m = models.get_model(name)
    assert m.depth == depth
    assert m.stages[2][0].conv2.groups == groups
    assert len(m.stage_bns[2]) == m.layers[2]


def test_attention_variants_use_the_released_names():
    eca = models.rla_ecanet50().state_dict()
    kernels = [eca[f"stages.{s}.0.eca.conv.weight"].shape[-1] for s in range(4)]
    assert kernels == [5, 5, 5, 7]
    se = models.rla_senet50().state_dict()
    assert tuple(se["stages.3.2.se.fc.0.weight"].shape) == (128, 2048)
    assert tuple(se["stages.3.2.se.fc.2.weight"].shape) == (2048, 128)
    assert models.rla_resnet50_eca is models.rla_ecanet50


def test_registry_builds_every_name():
    for name in models.list_models():
        if name.endswith(("101", "152", "101_32x4d", "_se", "_eca", "164_bottleneck", "110", "161", "169", "201",
                          "190", "250")):
            continue  # large; built by other tests or identical code paths
        m = models.get_model(name, num_classes=7)
        head = m.fc if hasattr(m, "fc") else m.classifier     # MobileNetV2 / DenseNet: classifier
        assert (head[-1] if isinstance(head, torch.nn.Sequential) else head).out_features == 7
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("rla_resnet51")


def test_zero_init_last_bn():
    m = models.rla_resnet20(zero_init_last_bn=True)
    assert all(not b.bn2.weight.detach().any() for stage in m.stages for b in stage)
    b = models.RLAResNet([2, 1], 10, 8, widths=(16, 32), zero_init_last_bn=True)
    assert not b.stages[0][1].bn3.weight.detach().any()


def test_h_is_zero_initial_state_of_input_dtype():
    m = models.rla_resnet20()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    h = m.initial_state(x)
    assert h.shape == (2, 16, 8, 8) and h.dtype == torch.float64 and not h.any()
    assert h.is_contiguous(memory_format=torch.channels_last)


def test_per_depth_features_and_early_exit():
    torch.manual_seed(0)
    m = models.rla_resnet20(10, 8).eval()
    x = torch.randn(3, 3, 16, 16)
    states = m.forward_features_per_depth(x)
    assert len(states) == m.depth == 9
    assert [tuple(h.shape[2:]) for h in states[::3]] == [(16, 16), (8, 8), (4, 4)]
    _, h_last = m.forward_features(x)
    torch.testing.assert_close(states[-1], h_last)
    heads = m.make_early_exit_heads().eval()
    logits = m.early_exit_logits(x, heads)
    assert len(logits) == 9 and all(t.shape == (3, 10) for t in logits)
    with pytest.raises(ValueError, match="one per depth"):
        m.early_exit_logits(x, heads[:3])


def test_per_module_backend_reaches_the_ops():
    m = models.rla_resnet20(10, 8)
    x = torch.randn(2, 3, 8, 8)
    m.set_backend("cuda")  # never available for CPU tensors
    with pytest.raises(rla_ext.BackendUnavailableError):
        m(x)
    m.set_backend(None)
    with rla_ext.use_backend("torch"):
        assert m(x).shape == (2, 10)


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    m = models.rla_resnet29_bottleneck(10, 8)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert m.stages[0][0].conv1.weight.grad is not None
    assert m.conv_outs[0].weight.grad.dtype == torch.float32
