"""benchmarks.timing.time_interleaved: the providers of one case take turns on the CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:  # see test_cli.py: the real `benchmarks` package must win
    sys.path.insert(0, str(ROOT))

from benchmarks import timing  # noqa: E402


def test_interleaved_calls_alternate_and_reverse_each_round():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("eager", "cpp", "triton")}
    result = timing.time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=4)
    assert calls[:3] == ["eager", "cpp", "triton"]  # warmup
    timed = calls[3:]
    assert timed == ["eager", "cpp", "triton", "triton", "cpp", "eager"] * 2
    assert set(result) == set(fns)
    for t in result.values():
        assert t.n == 4 and t.method == "perf_counter, interleaved"
        assert 0.0 <= t.min <= t.q25 <= t.median <= t.q75 <= t.max


def test_interleaved_budget_stops_every_provider_at_the_same_round():
    import time

    fns = {"slow": lambda: time.sleep(0.02), "fast": lambda: None}
    result = timing.time_interleaved(fns, torch.device("cpu"), warmup=0, repeats=1000, budget_s=0.05)
    assert result["slow"].n == result["fast"].n < 1000
