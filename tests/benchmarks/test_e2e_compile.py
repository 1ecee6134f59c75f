"""The compiled training step as the benchmark CLI builds and times it (issue: e2e compile rows once
read 50x a plain loop). After its warm-up a compiled step must neither recompile nor graph-break when
stepped in turn with the eager and fused steps, and its interleaved timing must agree with a plain
loop. A small CIFAR RLA-ResNet (bottleneck blocks, so both fused ops run) stands in for RLA-ResNet-50."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rla_ext

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:  # see test_cli.py: the real `benchmarks` package must win
    sys.path.insert(0, str(ROOT))

from benchmarks import model_step, timing  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif("cpp" not in rla_ext.available_backends("cpu"), reason="needs the cpp backend")]


def _small_rla(model: str, backend: str, num_classes: int = 1000) -> torch.nn.Module:
    # RLA-ResNet-11 (one bottleneck block per stage), k = 8: seconds to compile on two cores.
    return rla_ext.models.rla_resnet_cifar(11, num_classes, 8, bottleneck=True, backend=backend)


def test_compiled_step_is_stable_and_timed_like_a_plain_loop(monkeypatch, one_thread):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(model_step, "build_model", _small_rla)
    cpu = torch.device("cpu")
    steps = {p: model_step.make_train_step("rla", p, batch=2, dtype=torch.float32, device=cpu, image_size=32,
                                           num_classes=10, compile_mode="default")
             for p in ("eager", "cpp", "compile")}
    for _ in range(2):  # the CLI's warm-up: forward and backward graphs compiled, optimizer state made
        steps["compile"].step()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        turns = timing.time_interleaved({p: s.step for p, s in steps.items()}, cpu, warmup=1, repeats=5)
        alone = timing.time_loop(steps["compile"].step, cpu, warmup=1, repeats=5)
    assert not counters["graph_break"], f"graph breaks after warm-up: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 0, "the compiled step traced new graphs after its warm-up"
    ratio = turns["compile"].median / alone.median
    # Interleaving changes caches, not the work: a timing artefact (recompiles, a re-trace per call)
    # is a multiple of the step, far outside this band.
    assert 0.5 < ratio < 2.0, f"interleaved {turns['compile'].median:.1f} ms vs plain loop {alone.median:.1f} ms"
