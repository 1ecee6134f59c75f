"""Quick CPU check: median fwd+bwd time of the `cpp` and `torch` backends, both ops.

    python -m benchmarks.cpu_quick [--threads 2] [--reps 20] [--fmt channels_last] [--profile]

Defaults are the RLA-ResNet-50 stage-2 entry: batch 8, C=512, k=32, 28x28, C_out=128, float32,
channels_last, training mode. The two backends are called alternately, so load from other processes
hits both alike; on a shared machine compare the minima as well as the medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rla_ext import ops

from benchmarks import allocator

BACKENDS = ("torch", "cpp")


def time_alternating(fn, reps: int, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """{backend: (median ms, min ms)} of fn(backend), the backends taking turns call by call."""
    for _ in range(warmup):
        for b in BACKENDS:
            fn(b)
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i in range(reps):
        for b in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
            t0 = time.perf_counter()
            fn(b)
            times[b].append((time.perf_counter() - t0) * 1e3)
    return {b: (statistics.median(v), min(v)) for b, v in times.items()}


def make_cases(n: int, c: int, k: int, hw: int, co: int, dtype: torch.dtype, fmt: torch.memory_format) -> dict:
    g = torch.Generator().manual_seed(0)

    def act(*shape):
        return torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=fmt).requires_grad_()

    def param(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_()

    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x, h = act(n, c, hw, hw), act(n, k, hw, hw)
    w = param(co, c + k, scale=(c + k) ** -0.5)
    g1, b1 = param(co, dt=sd), param(co, dt=sd)
    rm1, rv1 = torch.zeros(co, dtype=sd), torch.ones(co, dtype=sd)
    up1 = torch.randn(n, co, hw, hw, generator=g).to(dtype).contiguous(memory_format=fmt)

    y = act(n, c, hw, hw)
    hs = {False: act(n, k, hw, hw), True: act(n, k, 2 * hw, 2 * hw)}
    wo, wr = param(k, c, scale=c ** -0.5), param(k, k, 3, 3, scale=(9 * k) ** -0.5)
    g2, b2 = param(k, dt=sd), param(k, dt=sd)
    rm2, rv2 = torch.zeros(k, dtype=sd), torch.ones(k, dtype=sd)
    up2 = torch.randn(n, k, hw, hw, generator=g).to(dtype).contiguous(memory_format=fmt)

    def op_a(backend):
        ops.concat_conv_bn_act(x, h, w, g1, b1, rm1, rv1, training=True, backend=backend).backward(up1)

    def op_b(backend, pool):
        ops.rla_update(hs[pool], y, wo, g2, b2, rm2, rv2, wr, pool=pool, training=True,
                       backend=backend).backward(up2)

    return {"concat_conv_bn_act": op_a,
            "rla_update pool=False": lambda b: op_b(b, False),
            "rla_update pool=True": lambda b: op_b(b, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--c", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--hw", type=int, default=28)
    p.add_argument("--cout", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--fmt", default="channels_last", choices=["channels_last", "contiguous"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per case and backend")
    p.add_argument("--system-malloc", action="store_true", help="leave the C allocator as configured "
                   "(default: glibc keeps freed memory, benchmarks/allocator.py)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"CPU allocator: {allocator.SYSTEM if a.system_malloc else allocator.keep_freed_memory()}")
    fmt = torch.channels_last if a.fmt == "channels_last" else torch.contiguous_format
    cases = make_cases(a.n, a.c, a.k, a.hw, a.cout, getattr(torch, a.dtype), fmt)
    print(f"threads={torch.get_num_threads()} N={a.n} C={a.c} k={a.k} {a.hw}x{a.hw} C_out={a.cout} "
          f"{a.fmt} {a.dtype}")
    for name, fn in cases.items():
        if a.only not in name:
            continue
        res = time_alternating(fn, a.reps)
        (tm, tmin), (cm, cmin) = res["torch"], res["cpp"]
        print(f"{name:24s} torch {tm:8.2f} ms (min {tmin:.2f})  cpp {cm:8.2f} ms (min {cmin:.2f})  "
              f"speedup {tm / cm:.2f}x (min/min {tmin / cmin:.2f}x)")
        if a.profile:
            for b in BACKENDS:
                with torch.profiler.profile() as prof:
                    for _ in range(3):
                        fn(b)
                print(f"--- {name}, backend {b}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
