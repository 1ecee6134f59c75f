"""The ops' ``process_group=`` argument in one process: validation, and a one-rank group changes nothing.
(Two-rank behaviour: tests/nn/test_sync_batchnorm.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rla_ext.ops import concat_conv_bn_act, rla_update
from rla_testing import clone_inputs, fused_backends, make_ccba_inputs, make_update_inputs, run_op


def test_process_group_without_init_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    inputs = make_ccba_inputs(2, 3, 2, 4, (2, 2), torch.float32, "cpu", "contiguous")
    with pytest.raises(RuntimeError, match="process_group: .*not initialised"):
        concat_conv_bn_act(**inputs, training=True, process_group=object())


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", *fused_backends("cpu")])
def test_one_rank_group_is_bitwise_the_local_op(one_rank_group, backend):
    ccba = make_ccba_inputs(2, 3, 2, 4, (3, 3), torch.float64, "cpu", "contiguous")
    upd = make_update_inputs(2, 3, 2, (3, 3), True, torch.float64, "cpu", "contiguous")
    for op, inputs, kw in ((concat_conv_bn_act, ccba, {}), (rla_update, upd, dict(pool=True))):
        a = run_op(op, clone_inputs(inputs), backend=backend, training=True, **kw)
        b = run_op(op, clone_inputs(inputs), backend=backend, training=True, process_group=one_rank_group, **kw)
        assert torch.equal(a[0], b[0])
        for part in (1, 2):
            for name in a[part]:
                assert torch.equal(a[part][name], b[part][name]), name
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup"):
        concat_conv_bn_act(**ccba, training=True, process_group="world", backend=backend)


def test_sync_batchnorm_module_with_one_rank_is_batchnorm(one_rank_group):
    from rla_ext.nn import SyncBatchNorm2d
    ref = torch.nn.BatchNorm2d(3).double().train()
    sync = SyncBatchNorm2d(3).double().train()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, ref.running_var, rtol=0, atol=0)
