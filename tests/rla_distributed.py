"""Worker side of tests/nn/test_sync_batchnorm.py: run in processes started by torch.multiprocessing.spawn,
which must import the worker by module name (a test module imported by pytest may not be importable
that way, a helper on the tests path is)."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import traceback
from collections.abc import Callable, Iterator

import torch

import rla_ext
from rla_ext.nn import SyncBatchNorm2d, convert_sync_batchnorm

WORLD = 2
PER_RANK = 2
EVEN = (PER_RANK,) * WORLD
# Rank 0 holds three samples and rank 1 one: the pooled statistics must weigh each rank by its count.
UNEVEN = (3, 1)


def _backends() -> list[str]:
    return [b for b in rla_ext.available_backends("cpu") if b != "torch"]


def op_scenarios() -> list[str]:
    """Names "op-backend-dtype" (EVEN batches), and "op-backend-float64-uneven" (UNEVEN batches)."""
    names = []
    for op in ("concat_conv_bn_act", "rla_update"):
        for b in ["torch", *_backends()]:
            for dtype in ("float64", "float32"):
                if b == "triton" and dtype == "float32":
                    continue  # the interpreter is slow; float64 covers its arithmetic
                names.append(f"{op}-{b}-{dtype}")
            names.append(f"{op}-{b}-float64-uneven")
    return names


def compiled_scenarios(compiler: str) -> list[str]:
    """The cpp ops under torch.compile(fullgraph=True, backend=compiler), when cpp is built."""
    return [f"compiled-{compiler}"] if "cpp" in _backends() else []


def slow_scenarios() -> list[str]:
    """The second spawn's: the ops compiled by inductor, and the whole model under aot_eager."""
    return compiled_scenarios("inductor") + (["model-cpp-compiled"] if "cpp" in _backends() else [])


def model_scenarios() -> list[str]:
    return [f"model-{b}" for b in ["torch", *_backends()]]


SCENARIOS_DDP = ["ddp-cifar"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _slice(t: torch.Tensor, rank: int, split: tuple[int, ...] = EVEN) -> torch.Tensor:
    """This rank's samples of a whole-batch tensor, `split` giving each rank's batch size."""
    start = sum(split[:rank])
    return t[start:start + split[rank]]


@contextlib.contextmanager
def _counting_all_reduces(calls: list[int]) -> Iterator[None]:
    """Record the size of every exchange the fused ops' synchronised BatchNorm makes."""
    from rla_ext.ops import _distributed

    real = _distributed.all_reduce_sum

    def counted(t: torch.Tensor, group: object) -> torch.Tensor:
        calls.append(t.numel())
        return real(t, group)

    _distributed.all_reduce_sum = counted
    try:
        yield
    finally:
        _distributed.all_reduce_sum = real


def _run(op, inputs: dict, upstream: torch.Tensor, **kw) -> tuple[torch.Tensor, list[int], list[int]]:
    """Forward and backward; -> (output, sizes of the forward's all-reduces, sizes of the backward's)."""
    fwd, bwd = [], []
    with _counting_all_reduces(fwd):
        out = op(**inputs, **kw)
    with _counting_all_reduces(bwd):
        (out * upstream).sum().backward()
    return out.detach(), fwd, bwd


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _compare(rank: int, split: tuple[int, ...], dtype: torch.dtype, per_sample: set[str],
             out_loc: torch.Tensor, out_full: torch.Tensor, local: dict, full: dict) -> None:
    """This rank's run against one process on the whole batch: the output and the per-sample inputs'
    gradients slice by slice, the running statistics (the inputs without grad) equal, the parameter
    gradients summed over ranks (what DDP does)."""
    import torch.distributed as dist

    _close(out_loc, _slice(out_full, rank, split), dtype, "output slice")
    for k, t in local.items():
        if t is None:
            continue
        if not t.requires_grad:
            _close(t, full[k], dtype, k)
        elif k in per_sample:
            _close(t.grad, _slice(full[k].grad, rank, split), dtype, f"grad {k} slice")
        else:
            summed = t.grad.clone()
            dist.all_reduce(summed)
            _close(summed, full[k].grad, dtype, f"grad {k} summed over ranks")


def _check_op(name: str, rank: int) -> None:
    import torch.distributed as dist

    from rla_ext.ops import concat_conv_bn_act, rla_update
    from rla_testing import clone_inputs, make_ccba_inputs, make_update_inputs

    opname, backend, dt, *variant = name.split("-")
    split = UNEVEN if variant == ["uneven"] else EVEN
    dtype = getattr(torch, dt)
    n = sum(split)
    fmt = "channels_last" if dt == "float32" else "contiguous"
    if opname == "concat_conv_bn_act":
        op, per_sample = concat_conv_bn_act, {"x", "h"}
        inputs = make_ccba_inputs(n, 6, 3, 5, (3, 4), dtype, "cpu", fmt, seed=7)
        kw = dict(training=True, momentum=0.3, eps=1e-5, activation="relu")
        out_shape = (n, 5, 3, 4)
    else:
        op, per_sample = rla_update, {"h", "y"}
        inputs = make_update_inputs(n, 6, 3, (3, 4), True, dtype, "cpu", fmt, seed=8)
        kw = dict(pool=True, training=True, momentum=0.3, eps=1e-5)
        out_shape = (n, 3, 3, 4)
    up = torch.randn(out_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)

    full = clone_inputs(inputs)
    out_full, _, _ = _run(op, full, up, backend=backend, **kw)
    local = clone_inputs({k: (_slice(v, rank, split) if k in per_sample else v) for k, v in inputs.items()})
    out_loc, fwd, bwd = _run(op, local, _slice(up, rank, split), backend=backend,
                             process_group=dist.group.WORLD, **kw)
    _compare(rank, split, dtype, per_sample, out_loc, out_full, local, full)
    if backend != "torch":
        # The fused path exchanges per-channel sums only: (count, sum, sum of squares) in forward, the
        # two BN-gradient sums in backward, one all-reduce each.
        c = out_shape[1]
        assert (fwd, bwd) == ([1 + 2 * c], [2 * c]), f"all-reduce sizes: forward {fwd}, backward {bwd}"


def _entry_then_update(a: dict, u: dict, group: object | None) -> torch.Tensor:
    """A block entry feeding an RLA update as its y, both on the cpp backend, synchronised over `group`."""
    from rla_ext.ops import concat_conv_bn_act, rla_update

    z = concat_conv_bn_act(**a, training=True, momentum=0.3, eps=1e-5, activation="relu", backend="cpp",
                           process_group=group)
    return rla_update(**u, y=z, pool=True, training=True, momentum=0.3, eps=1e-5, backend="cpp",
                      process_group=group)


def _check_compiled(name: str, rank: int) -> None:
    """torch.compile(fullgraph=True) of both synchronised ops on UNEVEN batches: one graph holding the
    four all-reduces (one per BatchNorm forward, one per backward), and the compiled step on each rank
    equal to one eager process on the whole batch (output, every gradient, running statistics)."""
    import torch.distributed as dist
    from torch._dynamo.backends.registry import lookup_backend

    from rla_testing import clone_inputs, make_ccba_inputs, make_update_inputs

    compiler = name.split("-", 1)[1]
    split, dtype = UNEVEN, torch.float64
    n = sum(split)
    a = make_ccba_inputs(n, 6, 3, 5, (3, 4), dtype, "cpu", "contiguous", seed=7)
    u = make_update_inputs(n, 5, 3, (3, 4), True, dtype, "cpu", "contiguous", seed=8)
    del u["y"]  # the entry's output
    up = torch.randn(n, 3, 3, 4, generator=torch.Generator().manual_seed(3), dtype=dtype)

    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return lookup_backend(compiler)(gm, example_inputs)

    step = torch.compile(_entry_then_update, fullgraph=True, backend=counting_backend)
    full_a, full_u = clone_inputs(a), clone_inputs(u)
    out_full = _entry_then_update(full_a, full_u, None)
    (out_full * up).sum().backward()
    loc_a = clone_inputs({k: (_slice(v, rank, split) if k in ("x", "h") else v) for k, v in a.items()})
    loc_u = clone_inputs({k: (_slice(v, rank, split) if k == "h" else v) for k, v in u.items()})
    out_loc = step(loc_a, loc_u, dist.group.WORLD)
    (out_loc * _slice(up, rank, split)).sum().backward()

    assert len(graphs) == 1, f"{len(graphs)} graphs compiled"
    collectives = [node.target for gm in graphs[0].modules() if isinstance(gm, torch.fx.GraphModule)
                   for node in gm.graph.nodes if "_c10d_functional.all_reduce" in str(node.target)]
    assert len(collectives) == 4, f"all-reduces in the graph: {collectives}"
    prefixed = lambda p, d: {f"{p}.{k}": t for k, t in d.items()}  # noqa: E731
    _compare(rank, split, dtype, {"entry.x", "entry.h", "update.h"}, out_loc.detach(), out_full.detach(),
             {**prefixed("entry", loc_a), **prefixed("update", loc_u)},
             {**prefixed("entry", full_a), **prefixed("update", full_u)})


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
    # "model-{backend}-compiled": the synchronised model (fused ops and SyncBatchNorm2d) traced whole.
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if name.endswith("-compiled") else model
    out_loc = run(x_loc)
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


def _checks(suite: str) -> list[tuple[str, Callable[[str, int], None]]]:
    """The scenarios of a spawn: "default" (quick) or "slow" (slow_scenarios)."""
    if suite == "slow":
        return [(n, _check_model if n.startswith("model-") else _check_compiled) for n in slow_scenarios()]
    return ([(n, _check_op) for n in op_scenarios()]
            + [(n, _check_compiled) for n in compiled_scenarios("aot_eager")]
            + [(n, _check_model) for n in model_scenarios()] + [(n, _check_ddp) for n in SCENARIOS_DDP])


def worker(rank: int, init_file: str, out_dir: str, suite: str = "default") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name, check in _checks(suite):
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
