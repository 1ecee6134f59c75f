"""Timing, copy bandwidth and memory measurement, on CUDA or CPU.

GPU timings come from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) when
triton imports, else from our own CUDA-event loop. CPU timings are perf_counter around single
calls after warmup. Either way the result is the distribution of per-call times in ms.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

K = TypeVar("K")


@dataclass(frozen=True)
class Timing:
    """Per-call wall time in milliseconds."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    n: int  # calls timed (do_bench: its own repeat count)
    method: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _from_samples(samples: list[float], method: str) -> Timing:
    s = sorted(samples)
    if len(s) >= 2:
        q25, _, q75 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q25 = q75 = s[0]
    return Timing(statistics.median(s), q25, q75, s[0], s[-1], len(s), method)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10,
              budget_s: float | None = None) -> Timing:
    """Time single calls: `warmup` untimed, then up to `repeats` timed (fewer if `budget_s` runs out)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples: list[float] = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return _from_samples(samples, "cuda-events" if device.type == "cuda" else "perf_counter")


def time_op(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10,
            budget_s: float | None = None, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """Time a short op: do_bench on CUDA (warmup_ms / rep_ms), `time_loop` otherwise."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75, 0.0, 1.0])
            # do_bench sizes its repeat count from an estimate; report that count.
            est = max(q[0], 1e-3)
            return Timing(q[0], q[1], q[2], q[3], q[4], max(1, int(rep_ms / est)), "triton.do_bench")
    return time_loop(fn, device, warmup=warmup, repeats=repeats, budget_s=budget_s)


def time_interleaved(fns: Mapping[K, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                     repeats: int = 10, budget_s: float | None = None,
                     gpu_timer: Callable[..., Timing] | None = None) -> dict[K, Timing]:
    """Time several implementations of one case against each other: {name: Timing}.

    On the CPU they take turns call by call (the order reversed every round), so load from other
    processes on a shared machine lands on all of them alike and their ratio stays meaningful even
    when the absolute times drift. `budget_s` is per implementation. On CUDA each is timed on its
    own by `gpu_timer` (default `time_op`; CUDA events isolate it from the host).
    """
    if device.type == "cuda":
        timer = gpu_timer or time_op
        return {name: timer(fn, device, warmup=warmup, repeats=repeats, budget_s=budget_s)
                for name, fn in fns.items()}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[K, list[float]] = {name: [] for name in names}
    deadline = None if budget_s is None else time.perf_counter() + budget_s * len(names)
    for i in range(max(1, repeats)):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return {name: _from_samples(v, "perf_counter, interleaved") for name, v in samples.items()}


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict[str, float]:
    """Achievable bandwidth from a large copy: read + write of `nbytes`, GB/s (1e9 bytes)."""
    if nbytes is None:
        nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    if device.type == "cuda":
        fn = src.clone  # the caching allocator hands back the same block: a pure device copy
    else:
        # A CPU clone gets fresh pages from the OS each call and would time page faults, not copying.
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    timing = time_op(fn, device, warmup=2, repeats=10)
    gbps = 2 * src.numel() * 4 / (timing.median * 1e-3) / 1e9
    return {"bytes": float(src.numel() * 4), "median_ms": timing.median, "gbps": gbps}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra device memory one call needs above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward_bytes(forward: Callable[[], object], resident: set[int]) -> int:
    """Bytes of the tensors autograd keeps for backward during `forward`, excluding `resident` storages.

    Counted once per storage: several saved views of one buffer cost its memory once. Storages in
    `resident` (the inputs and parameters) are left out because they exist anyway.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in resident:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())
