"""pytest-benchmark suites (``make bench-suite`` = ``pytest -q benchmarks --benchmark-only``).

Configured by environment variables, so the same command works on the CPU machines and the GPU:
  RLA_BENCH_DEVICE   cuda | cpu (default: cuda if visible)
  RLA_BENCH_DTYPES   comma list (default: bfloat16 on cuda, float32 on cpu)
  RLA_BENCH_BATCH    op/block batch (default: 128 on cuda, 2 on cpu)
  RLA_BENCH_SHAPES   comma list of stages (default: every stage of each op's table in
                     benchmarks/shapes.py: RLA-ResNet-50's four for the bottleneck ops and the block,
                     the CIFAR basic-block entries for concat_conv3x3_bn_act; the boundary
                     rla_update_and_entry at RLA-ResNet-50's too); an op runs those of its own
  RLA_BENCH_ROUNDS   timed rounds per case (default: 20 on cuda, 3 on cpu)
  RLA_BENCH_MODEL_COMPILE=1  also compile the whole model on cpu (several minutes)
  RLA_BENCH_SYSTEM_MALLOC=1  on cpu, time with the C allocator as configured (default: glibc keeps
                     freed memory, benchmarks/allocator.py, as the CLI does)
Every provider is parametrised (unfused+<backend> only for the ops that fuse others); those that cannot
run here are skipped with the reason.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest
import torch

from benchmarks import allocator, cases
from benchmarks.cli import DTYPES
from benchmarks.shapes import STAGES, Stage, select_stages, stages_for

ALL_PROVIDERS = cases.PROVIDERS
_ALLOCATOR = pytest.StashKey[str]()


def bench_device() -> torch.device:
    name = os.environ.get("RLA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _gpu() -> bool:
    return bench_device().type == "cuda"


def bench_dtypes() -> list[torch.dtype]:
    text = os.environ.get("RLA_BENCH_DTYPES") or ("bfloat16" if _gpu() else "float32")
    return [DTYPES[d.strip()] for d in text.split(",") if d.strip()]


def bench_batch() -> int:
    return int(os.environ.get("RLA_BENCH_BATCH") or (128 if _gpu() else 2))


def bench_rounds() -> int:
    return int(os.environ.get("RLA_BENCH_ROUNDS") or (20 if _gpu() else 3))


def bench_stages(op: str | None = None) -> list[Stage]:
    """`op`'s stages (no op: RLA-ResNet-50's, the bottleneck block's), filtered by RLA_BENCH_SHAPES."""
    table = stages_for(op) if op is not None else STAGES
    text = os.environ.get("RLA_BENCH_SHAPES")
    return list(select_stages([s.strip() for s in text.split(",")], table) if text else table)


def _id(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return getattr(value, "label", None) or str(value)


def _provider_applies(argnames: list[str], combo: tuple) -> bool:
    """Whether a combination's provider applies to what it times: unfused+<backend> only to the ops that
    fuse others (cases.op_providers), not to other ops, blocks or models."""
    values = dict(zip(argnames, combo))
    if "provider" not in values:
        return True
    return bool(cases.op_providers(str(values.get("op", "")), [values["provider"]]))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One parametrisation over the axes a test asks for, with ``pass_`` varying fastest.

    Neighbouring tests then share everything but the pass, so ``case_cache`` builds (and compiles)
    each case once for both passes. A test asking for both ``op`` and ``stage`` gets each op at its
    own stages (one joint axis of (op, stage) pairs).
    """
    axes: dict[str, list[tuple]] = {"op": [(op,) for op in cases.OPS], "stage": [(s,) for s in bench_stages()],
                                    "provider": [(p,) for p in ALL_PROVIDERS], "dtype": [(d,) for d in bench_dtypes()],
                                    "pass_": [(p,) for p in cases.PASSES]}
    names = [n for n in axes if n in metafunc.fixturenames]
    if not names:
        return
    argnames = list(names)
    if "op" in names and "stage" in names:
        axes["op"] = [(op, s) for op in cases.OPS for s in bench_stages(op)]
        names.remove("stage")  # "op" now stands for the (op, stage) axis; "op" precedes "stage" in argnames
    combos = [sum(parts, ()) for parts in itertools.product(*(axes[n] for n in names))]
    combos = [c for c in combos if _provider_applies(argnames, c)]
    metafunc.parametrize(",".join(argnames), combos, ids=["-".join(_id(v) for v in c) for c in combos])


def pytest_configure(config: pytest.Config) -> None:
    if bench_device().type == "cpu" and os.environ.get("RLA_BENCH_SYSTEM_MALLOC") != "1":
        config.stash[_ALLOCATOR] = allocator.keep_freed_memory()


def pytest_report_header(config: pytest.Config) -> str:
    return f"CPU allocator: {config.stash.get(_ALLOCATOR, allocator.SYSTEM)}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def case_cache() -> Iterator[Callable[[tuple, Callable[[], object]], object]]:
    """get(key, build): the last built case if its key matches, else a fresh one (skipping if unavailable)."""
    slot: dict[str, object] = {}

    def get(key: tuple, build: Callable[[], object]) -> object:
        if slot.get("key") != key:
            slot.clear()
            if bench_device().type == "cuda":
                torch.cuda.empty_cache()
            try:
                slot["value"] = build()
            except cases.CaseUnavailable as e:
                slot["value"] = e
            slot["key"] = key
        value = slot["value"]
        if isinstance(value, cases.CaseUnavailable):
            pytest.skip(str(value))
        return value

    yield get
    slot.clear()


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` made synchronous, so pytest-benchmark's wall clock sees the GPU work."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def run_benchmark(benchmark, fn: Callable[[], object], device: torch.device, rounds: int | None = None,
                  warmup_rounds: int = 2) -> None:
    """pedantic mode: warmup outside the timing (compilation happens there), fixed rounds."""
    benchmark.pedantic(timed(fn, device), rounds=rounds or bench_rounds(), iterations=1,
                       warmup_rounds=warmup_rounds)
