"""A full RLA bottleneck (op A, 3x3 and 1x1 convs, residual, op B) per stage shape and provider."""
from __future__ import annotations

from benchmarks.block import make_block_case
from benchmarks.conftest import bench_batch, run_benchmark


def test_block(benchmark, case_cache, device, stage, provider, dtype, pass_):
    case = case_cache(("block", stage, provider, dtype),
                      lambda: make_block_case(stage, provider, batch=bench_batch(), dtype=dtype, device=device))
    benchmark.extra_info["batch"] = bench_batch()
    run_benchmark(benchmark, case.run(pass_), device)
