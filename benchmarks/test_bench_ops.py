"""The fused ops, each at its own stage shapes (benchmarks.shapes.OP_STAGES), per provider, dtype and pass
(training mode)."""
from __future__ import annotations

from benchmarks import cases
from benchmarks.conftest import bench_batch, run_benchmark


def test_op(benchmark, case_cache, device, op, stage, provider, dtype, pass_):
    case = case_cache(("op", op, stage, provider, dtype),
                      lambda: cases.make_op_case(op, stage, provider, batch=bench_batch(), dtype=dtype, device=device))
    traffic = case.traffic(pass_)
    benchmark.extra_info.update(bytes_moved=traffic.total, batch=bench_batch())
    run_benchmark(benchmark, case.run(pass_), device)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = traffic.total / benchmark.stats.stats.median / 1e9
