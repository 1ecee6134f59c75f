"""One RLA-ResNet-50 training step per provider, beside a plain ResNet-50.

On CPU the batch is 2 at 64x64 (sizes must halve evenly down to stage 4) and the compiled model is skipped unless
RLA_BENCH_MODEL_COMPILE=1: compiling ResNet-50 there takes minutes.
"""
from __future__ import annotations

import os

import pytest

from benchmarks import cases
from benchmarks.conftest import run_benchmark
from benchmarks.model_step import make_train_step


@pytest.mark.parametrize("model", ["plain", "rla"])
def test_train_step(benchmark, case_cache, device, model, provider, dtype):
    gpu = device.type == "cuda"
    if cases.is_compiled(provider) and not gpu and os.environ.get("RLA_BENCH_MODEL_COMPILE") != "1":
        pytest.skip("compiling ResNet-50 on CPU takes minutes; set RLA_BENCH_MODEL_COMPILE=1 to include it")
    batch, size = (128, 224) if gpu else (2, 64)
    ts = case_cache(("model", model, provider, dtype),
                    lambda: make_train_step(model, provider, batch=batch, dtype=dtype, device=device,
                                            image_size=size))
    benchmark.extra_info.update(batch=batch, image_size=size)
    run_benchmark(benchmark, ts.step, device, rounds=10 if gpu else 2, warmup_rounds=3 if gpu else 1)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
