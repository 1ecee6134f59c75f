"""Synchronised BatchNorm over 2 gloo processes: 2 ranks x batch 2 (or 3 + 1) must equal 1 process x batch 4.

One spawn (module fixture) runs every scenario on both ranks and records, per rank, "ok" or the
failure; the tests below assert on those records. Checked per scenario: each rank's output slice,
its input-gradient slice, the running statistics, and the parameter gradients summed over ranks,
against a single process on the whole batch; on the fused backends, one all-reduce of per-channel
sums per op in forward and one in backward; for DDP, a few training steps give identical weights on
both ranks and equal a single process trained on the whole batch. The compiled scenario runs both
ops under torch.compile(fullgraph=True) on uneven batches (aot_eager here; inductor in a second,
slow spawn, with the whole synchronised model compiled by aot_eager). Workers: tests/rla_distributed.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from rla_distributed import (SCENARIOS_DDP, WORLD, compiled_scenarios, model_scenarios, op_scenarios,
                             slow_scenarios, small_model, worker)
from rla_ext.nn import convert_sync_batchnorm

pytestmark = pytest.mark.distributed


def _spawn(tmp_path_factory, suite: str) -> list[dict]:
    """Run the worker's `suite` on WORLD gloo processes; -> each rank's {scenario: "ok" or the failure}."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp(f"sync_bn_{suite}")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp), suite), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, "default")


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, "slow")


def _assert_ok(results: list[dict], name: str) -> None:
    for rank, res in enumerate(results):
        assert name in res, f"rank {rank} did not run {name}"
        assert res[name] == "ok", f"rank {rank}:\n{res[name]}"


@pytest.mark.parametrize("name", op_scenarios())
def test_ops_two_ranks_equal_one_process(results, name):
    _assert_ok(results, name)


@pytest.mark.parametrize("name", model_scenarios())
def test_model_two_ranks_equal_one_process(results, name):
    _assert_ok(results, name)


@pytest.mark.parametrize("name", compiled_scenarios("aot_eager"))
def test_compiled_ops_two_ranks_equal_one_process(results, name):
    _assert_ok(results, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", slow_scenarios())
def test_compiled_slow_two_ranks_equal_one_process(slow_results, name):
    _assert_ok(slow_results, name)


@pytest.mark.parametrize("name", SCENARIOS_DDP)
def test_ddp_training_steps_match(results, name):
    _assert_ok(results, name)


def test_convert_keeps_state_and_single_process_is_plain_batchnorm():
    ref = small_model("torch").train()
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    for (k, a), (k2, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # Without an initialised process group the module is exactly nn.BatchNorm2d.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
