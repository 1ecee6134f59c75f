"""RLA-ResNet's fused block boundary (RLAResNet(fuse_boundary=...), rla_ext.nn.rla_boundary): at every
boundary but the last block's (within and across stages), block t's RLA update and block t+1's entry
run as one rla_update_and_entry call; the network
computes the same numbers as with the two ops separate (float64: to rounding), in training and eval,
with shared blocks, per-depth states and BatchNorms in mixed modes."""
from __future__ import annotations

import pytest
import torch

import rla_ext
from rla_ext import models
from rla_ext.models.rla_resnet import RLAResNet
from rla_ext.nn import RLABottleneck


def _pair(**kw) -> tuple[RLAResNet, RLAResNet]:
    torch.manual_seed(0)
    fused = RLAResNet((2, 3), 7, 8, stem="cifar", widths=(4, 8), backend="cpp", fuse_boundary=True, **kw).double()
    plain = RLAResNet((2, 3), 7, 8, stem="cifar", widths=(4, 8), backend="cpp", fuse_boundary=False, **kw).double()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _boundary_calls(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "rla_ext::rla_update_and_entry_kernel_fwd")


def _step(model: RLAResNet, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.square().sum().backward()
    return out.detach()


@pytest.mark.parametrize("shared_blocks", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fused_boundary_is_the_two_ops(shared_blocks, fmt):
    fused, plain = _pair(shared_blocks=shared_blocks)
    x = torch.randn(3, 3, 8, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    # 5 blocks, 4 boundaries: 1 in the 2-block stage, 1 across the stages (the update after the last
    # block of stage 0 and the entry of stage 1's first, downsampling block), 2 in the 3-block stage.
    assert _boundary_calls(lambda: _step(fused, x)) == 4
    assert _boundary_calls(lambda: _step(plain, x)) == 0
    fused.zero_grad()
    plain.zero_grad()
    for _ in range(2):  # the second step runs on the running statistics the first one updated
        torch.testing.assert_close(_step(fused, x), _step(plain, x), rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    for (name, b), c in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)
    fused.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-10, atol=1e-12)
    states_f, states_p = [], []
    fused.run_blocks(fused.stem(x), fused.initial_state(fused.stem(x)), states_f)
    plain.run_blocks(plain.stem(x), plain.initial_state(plain.stem(x)), states_p)
    assert len(states_f) == len(states_p) == 5
    for a, b in zip(states_f, states_p):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_boundary_with_bn_modes_mixed_runs_the_two_ops():
    """A frozen (eval) bn1 after a training update BatchNorm: rla_boundary falls back to the two ops."""
    fused, plain = _pair()
    for m in (fused, plain):
        m.stages[1][1].bn1.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert _boundary_calls(lambda: _step(fused, x)) == 3
    _step(plain, x)
    fused.zero_grad()
    plain.zero_grad()
    torch.testing.assert_close(_step(fused, x), _step(plain, x), rtol=1e-10, atol=1e-12)
    for (name, b), c in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)


def test_rla_resnet50_fuses_all_15_boundaries_when_asked():
    m = models.rla_resnet50(backend="cpp")
    m.fuse_boundary = True
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _boundary_calls(lambda: m(x)) == 15


def test_fuse_boundary_default_follows_the_backend():
    torch.manual_seed(0)
    m = models.rla_resnet29_bottleneck(10, 8)
    assert not m.fuses_boundary()  # "auto": per-op choices, which the boundary op would bypass
    with rla_ext.use_backend("cpp"):
        assert m.fuses_boundary()
    m.set_backend("cpp")
    assert m.fuses_boundary()
    m.set_backend("torch")
    assert not m.fuses_boundary()
    m.fuse_boundary = True
    assert m.fuses_boundary()
    assert all(isinstance(b, RLABottleneck) for stage in m.stages for b in stage)


def test_default_fuses_only_where_boundary_pays():
    """fuse_boundary=None on cpp: the boundaries of stages with N*H*W >= 8*C (boundary_pays) only."""
    from rla_ext.nn import boundary_pays
    y = torch.empty(2, 16, 8, 8)
    assert boundary_pays(y) and not boundary_pays(torch.empty(2, 64, 4, 4))
    torch.manual_seed(0)
    m = RLAResNet((3, 3), 7, 8, stem="cifar", widths=(4, 16), backend="cpp").double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # stage 0: y (2, 16, 8, 8), 128 rows >= 8 * 16: its three boundaries fused (two inside, one into
    # stage 1); stage 1: y (2, 64, 4, 4), 32 rows < 8 * 64: none.
    assert _boundary_calls(lambda: _step(m, x)) == 3
    m.fuse_boundary = True
    assert _boundary_calls(lambda: _step(m, x)) == 5
