"""Worker side of tests/nn/test_sync_batchnorm.py: run in processes started by torch.multiprocessing.spawn,
which must import the worker by module name (a test module imported by pytest may not be importable
that way, a helper on the tests path is)."""
from __future__ import annotations

import copy
import json
import os
import traceback

import torch

import rla_ext
from rla_ext.nn import SyncBatchNorm2d, convert_sync_batchnorm

WORLD = 2
PER_RANK = 2


def _backends() -> list[str]:
    return [b for b in rla_ext.available_backends("cpu") if b != "torch"]


def op_scenarios() -> list[str]:
    names = []
    for op in ("concat_conv_bn_act", "rla_update"):
        for b in ["torch", *_backends()]:
            for dtype in ("float64", "float32"):
                if b == "triton" and dtype == "float32":
                    continue  # the interpreter is slow; float64 covers its arithmetic
                names.append(f"{op}-{b}-{dtype}")
    return names


def model_scenarios() -> list[str]:
    return [f"model-{b}" for b in ["torch", *_backends()]]


SCENARIOS_DDP = ["ddp-cifar"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def _run(op, inputs: dict, upstream: torch.Tensor, **kw) -> tuple[torch.Tensor, dict]:
    out = op(**inputs, **kw)
    (out * upstream).sum().backward()
    return out.detach(), {n: t.grad for n, t in inputs.items() if t is not None and t.requires_grad}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _check_op(name: str, rank: int) -> None:
    import torch.distributed as dist

    from rla_ext.ops import concat_conv_bn_act, rla_update
    from rla_testing import clone_inputs, make_ccba_inputs, make_update_inputs

    opname, backend, dt = name.split("-")
    dtype = getattr(torch, dt)
    n = WORLD * PER_RANK
    fmt = "channels_last" if dt == "float32" else "contiguous"
    if opname == "concat_conv_bn_act":
        op, per_sample = concat_conv_bn_act, ("x", "h")
        inputs = make_ccba_inputs(n, 6, 3, 5, (3, 4), dtype, "cpu", fmt, seed=7)
        kw = dict(training=True, momentum=0.3, eps=1e-5, activation="relu")
        out_shape = (n, 5, 3, 4)
    else:
        op, per_sample = rla_update, ("h", "y")
        inputs = make_update_inputs(n, 6, 3, (3, 4), True, dtype, "cpu", fmt, seed=8)
        kw = dict(pool=True, training=True, momentum=0.3, eps=1e-5)
        out_shape = (n, 3, 3, 4)
    up = torch.randn(out_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)

    full = clone_inputs(inputs)
    out_full, g_full = _run(op, full, up, backend=backend, **kw)
    local = clone_inputs({k: (_slice(v, rank) if k in per_sample else v) for k, v in inputs.items()})
    out_loc, g_loc = _run(op, local, _slice(up, rank), backend=backend, process_group=dist.group.WORLD, **kw)

    _close(out_loc, _slice(out_full, rank), dtype, "output slice")
    for k in ("running_mean", "running_var"):
        _close(local[k], full[k], dtype, k)
    for k, g in g_loc.items():
        if k in per_sample:
            _close(g, _slice(g_full[k], rank), dtype, f"grad {k} slice")
        else:
            summed = g.clone()
            dist.all_reduce(summed)
            _close(summed, g_full[k], dtype, f"grad {k} summed over ranks")


def small_model(backend: str) -> torch.nn.Module:
    from rla_ext.models import rla_resnet_cifar
    torch.manual_seed(0)
    # Bottleneck blocks: bn1 goes through the fused concat op, bn2/bn3 and the stem/head BNs through
    # SyncBatchNorm2d.forward, stage_bns through the fused update.
    return rla_resnet_cifar(11, num_classes=5, rla_channel=4, bottleneck=True, widths=(4, 8, 8),
                            backend=backend).double()


def _check_model(name: str, rank: int) -> None:
    import torch.distributed as dist

    backend = name.split("-")[1]
    ref = small_model(backend).train()
    model = convert_sync_batchnorm(copy.deepcopy(ref)).train()
    assert sum(isinstance(m, SyncBatchNorm2d) for m in model.modules()) == \
        sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
    assert ref.state_dict().keys() == model.state_dict().keys()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=g, dtype=torch.float64)
    up = torch.randn(WORLD * PER_RANK, 5, generator=g, dtype=torch.float64)
    x_full = x.clone().requires_grad_()
    out_full = ref(x_full)
    (out_full * up).sum().backward()
    x_loc = _slice(x, rank).clone().requires_grad_()
    out_loc = model(x_loc)
    (out_loc * _slice(up, rank)).sum().backward()
    tol = torch.float64
    _close(out_loc, _slice(out_full, rank).detach(), tol, "logits slice")
    _close(x_loc.grad, _slice(x_full.grad, rank), tol, "input grad slice")
    sd_ref = ref.state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            _close(v, sd_ref[k], tol, k)
        else:
            assert torch.equal(v, sd_ref[k]), k
    p_ref = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        summed = p.grad.clone()
        dist.all_reduce(summed)
        _close(summed, p_ref[k].grad, tol, f"grad {k} summed over ranks")


def _check_ddp(name: str, rank: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = small_model(None).train()
    model = DDP(convert_sync_batchnorm(copy.deepcopy(ref)).train())
    g = torch.Generator().manual_seed(11)
    steps = 3
    xs = torch.randn(steps, WORLD * PER_RANK, 3, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 5, (steps, WORLD * PER_RANK), generator=g)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        # DDP averages gradients over ranks: the mean of the ranks' mean losses is the whole batch's mean.
        opt_ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(xs[i]), ys[i]).backward()
        opt_ref.step()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(_slice(xs[i], rank)), _slice(ys[i], rank)).backward()
        opt.step()
    flat = torch.cat([t.detach().reshape(-1) for t in model.module.state_dict().values() if t.is_floating_point()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered[1:]), "weights differ between ranks"
    sd_ref = ref.state_dict()
    for k, v in model.module.state_dict().items():
        if v.is_floating_point():
            _close(v, sd_ref[k], torch.float64, k)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    checks = [(n, _check_op) for n in op_scenarios()] + [(n, _check_model) for n in model_scenarios()] + \
        [(n, _check_ddp) for n in SCENARIOS_DDP]
    try:
        for name, check in checks:
            try:
                check(name, rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - recorded and reported by the test of that scenario
                results[name] = traceback.format_exc()
            # Both ranks finish a scenario before the next starts, so a failure on one rank does not
            # leave the other waiting in a collective of a different scenario.
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


