"""rla_ext.nn: BatchNorm bookkeeping, blocks and the RLA update against plain formulas (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rla_model_testing import backend_params
from rla_ext.nn import (EfficientChannelAttention, RLAAggregator, RLABasicBlock, RLABottleneck, SqueezeExcite,
                        bn_args, check_rla_convs, make_downsample, rla_step)

TOL = dict(rtol=1e-9, atol=1e-11)


def _bn_via_args(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    a = bn_args(bn)
    return F.batch_norm(x, a.running_mean, a.running_var, a.weight, a.bias, a.training, a.momentum, a.eps)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_bn_args_reproduces_batchnorm2d(momentum, track, training):
    torch.manual_seed(0)
    ours = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track).double()
    theirs = copy.deepcopy(ours)
    ours.train(training)
    theirs.train(training)
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(_bn_via_args(ours, x), theirs(x), **TOL)
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    if track:
        assert int(ours.num_batches_tracked) == (3 if training else 0)
    else:
        assert ours.running_mean is None and bn_args(ours).training  # batch stats even in eval


def test_bn_args_rejects_non_batchnorm():
    with pytest.raises(TypeError, match="BatchNorm"):
        bn_args(nn.GroupNorm(1, 4))


def _plain_bottleneck(b: RLABottleneck, x, h):
    out = F.relu(b.bn1(F.conv2d(torch.cat((x, h), 1), b.conv1.weight)))
    out = F.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(out))
    if b.se is not None:
        out = b.se(out)
    if b.eca is not None:
        out = b.eca(out)
    return F.relu(out + (x if b.downsample is None else b.downsample(x)))


def _plain_basic(b: RLABasicBlock, x, h):
    out = F.relu(b.bn1(b.conv1(torch.cat((x, h), 1))))
    out = b.bn2(b.conv2(out))
    return F.relu(out + (x if b.downsample is None else b.downsample(x)))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["bottleneck", "bottleneck_down_se", "bottleneck_eca_groups", "basic",
                                  "basic_down"])
@pytest.mark.parametrize("training", [True, False])
def test_block_matches_plain_formula(kind, backend, training):
    torch.manual_seed(1)
    k = 4
    if kind == "bottleneck":
        blk = RLABottleneck(16, 4, rla_channel=k, backend=backend)
    elif kind == "bottleneck_down_se":
        blk = RLABottleneck(16, 8, 2, make_downsample(16, 32, 2), rla_channel=k, se=True, reduction=4,
                            backend=backend)
    elif kind == "bottleneck_eca_groups":
        blk = RLABottleneck(16, 8, 1, make_downsample(16, 32, 1), rla_channel=k, groups=4, base_width=16,
                            eca_kernel=3, backend=backend)
    elif kind == "basic":
        blk = RLABasicBlock(8, 8, rla_channel=k, backend=backend)
    else:
        blk = RLABasicBlock(8, 16, 2, make_downsample(8, 16, 2), rla_channel=k, backend=backend)
    blk = blk.double().train(training)
    for m in blk.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(blk)
    cin = blk.conv1.in_channels - k
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, k, 8, 8, dtype=torch.float64, requires_grad=True)
    out = blk(x, h)
    plain = _plain_bottleneck if isinstance(blk, RLABottleneck) else _plain_basic
    expect = plain(ref, x, h)
    torch.testing.assert_close(out, expect, **TOL)
    g = torch.randn_like(out)
    gx, gh = torch.autograd.grad(out, (x, h), g)
    ex, eh = torch.autograd.grad(expect, (x, h), g)
    torch.testing.assert_close(gx, ex, **TOL)
    torch.testing.assert_close(gh, eh, **TOL)
    for (n, a), b in zip(blk.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TOL, msg=n)
    assert blk.pool_h == kind.endswith("down") or kind == "bottleneck_down_se"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("pool", [False, True])
def test_aggregator_matches_formula(backend, pool):
    torch.manual_seed(2)
    agg = RLAAggregator(12, 4, num_blocks=2, backend=backend).double()
    h = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = torch.randn(2, 12, 4 if pool else 8, 4 if pool else 8, dtype=torch.float64)
    ref = copy.deepcopy(agg)
    out = agg(h, y, step=1, pool=pool)
    hp = F.avg_pool2d(h, 2, 2) if pool else h
    expect = ref.recurrent_conv(torch.tanh(ref.bns[1](hp + ref.conv_out(y))))
    torch.testing.assert_close(out, expect, **TOL)
    torch.testing.assert_close(agg.bns[1].running_mean, ref.bns[1].running_mean, **TOL)
    assert int(agg.bns[1].num_batches_tracked) == 1 and int(agg.bns[0].num_batches_tracked) == 0


def test_check_rla_convs():
    check_rla_convs(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False))
    with pytest.raises(ValueError, match="conv_out"):
        check_rla_convs(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1, bias=False))
    with pytest.raises(ValueError, match="recurrent_conv"):
        check_rla_convs(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 4, 3, bias=False))


def test_rla_step_uses_bn_bookkeeping_in_eval():
    torch.manual_seed(3)
    out_c, rec = nn.Conv2d(6, 3, 1, bias=False).double(), nn.Conv2d(3, 3, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    h, y = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 6, 4, 4, dtype=torch.float64)
    out = rla_step(h, y, out_c, rec, bn)
    torch.testing.assert_close(out, rec(torch.tanh(bn(h + out_c(y)))), **TOL)


def test_attention_modules():
    torch.manual_seed(4)
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    se = SqueezeExcite(32, 8).double()
    gate = torch.sigmoid(se.fc[2](F.relu(se.fc[0](x.mean((2, 3))))))
    torch.testing.assert_close(se(x), x * gate[..., None, None], **TOL)
    eca = EfficientChannelAttention(32, 5).double()
    w = eca.conv.weight.view(5)
    d = F.pad(x.mean((2, 3)), (2, 2))
    mix = sum(w[j] * d[:, j:j + 32] for j in range(5))
    torch.testing.assert_close(eca(x), x * torch.sigmoid(mix)[..., None, None], **TOL)
    with pytest.raises(ValueError, match="odd"):
        EfficientChannelAttention(8, 4)
