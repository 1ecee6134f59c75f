"""Host time per op call: each op at a tiny shape (N=1, C=8, k=4, 4x4), where the arithmetic is
negligible and what is timed is the Python between the user's call and the kernels, the dispatcher,
autograd and the launches. A fused call must cost less host time than the eager chain it replaces;
at RLA-ResNet's small stages on CPU, and at fine-tuning batch sizes on a GPU, this is the budget."""
from __future__ import annotations

from benchmarks import cases
from benchmarks.conftest import run_benchmark
from benchmarks.shapes import Stage

TINY = Stage(channels=8, size=4, width=8)
TINY_K = 4


def test_host_time(benchmark, case_cache, device, op, provider, dtype, pass_):
    case = case_cache(("host", op, provider, dtype),
                      lambda: cases.make_op_case(op, TINY, provider, batch=1, dtype=dtype, device=device, k=TINY_K))
    benchmark.extra_info.update(shape=f"N1 C{TINY.channels} k{TINY_K} {TINY.size}x{TINY.size}")
    run_benchmark(benchmark, case.run(pass_), device, rounds=200, warmup_rounds=20)
