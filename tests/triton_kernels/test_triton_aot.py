"""The Triton kernels compiled for the H100 (sm_90) without a GPU: scripts/triton_aot.py, quick tier.

Every kernel, every autotune configuration, at one RLA-ResNet-50 shape in bf16 and fp32 (TF32),
training and eval: compile errors, shared memory over sm_90's 227 KB, registers, spills, grid
limits and NaN-dropping float max/min all fail the run; `--self-test` first shows each of those
checks catching a kernel built to break it. `make triton-aot` runs the full tier (every shape,
dtype, precision, memory format and mode). Compiled kernels stay in Triton's cache
($TRITON_CACHE_DIR, default ~/.triton/cache): a warm rerun takes seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)


def _ptxas() -> Path | None:
    spec = importlib.util.find_spec("triton")
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


@pytest.mark.skipif(_ptxas() is None, reason="this triton has no NVIDIA backend (ptxas) to compile for sm_90")
def test_every_triton_launch_compiles_for_sm90(tmp_path):
    report = tmp_path / "aot.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the script sets it to 0 itself; the JIT must not interpret
    cmd = [sys.executable, str(ROOT / "scripts" / "triton_aot.py"), "--tier", "quick", "--self-test",
           "--no-table", "--json", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert "4 of 4 rule-breaking kernels caught" in out, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
    data = json.loads(report.read_text())
    assert data["failures"] == []
    names = {r["name"] for r in data["rows"]}
    assert {"_fwd_kernel", "_normalize_kernel", "_bwd_reduce_kernel", "_fwd_gemm_kernel", "_conv3x3_kernel",
            "_wgrad3x3_kernel", "_dh_kernel", "_dz_dgrad_kernel", "_dz_wgrad_kernel",
            "_finalize_stats_kernel", "_finalize_sums_kernel"} <= names
    # The defects this check was built on stay fixed (issue 12): shared memory of _dz_dgrad_kernel,
    # spills of the finalize and 3x3 kernels, and the 3x3 convolution's compile time (CPU seconds,
    # ptxas included; it was 16 s for one configuration here, 15-90 s in the review).
    # The block boundary's (op C) variants of the shared kernels are compiled too.
    for name, flag in (("_fwd_kernel", "ACC_INIT=1"), ("_dz_dgrad_kernel", "RAW=1"), ("_dz_wgrad_kernel", "RAW=1"),
                       ("_dh_kernel", "RELU=1")):
        assert any(flag in r["variant"] for r in data["rows"] if r["name"] == name), (name, flag)
    worst = {n: max((r for r in data["rows"] if r["name"] == n), key=lambda r: r["smem"]) for n in names}
    assert worst["_dz_dgrad_kernel"]["smem"] <= 232_448
    for r in data["rows"]:
        assert r["spills"] <= 64, r
    assert max(r["seconds"] for r in data["rows"] if r["name"] == "_conv3x3_kernel") < 10
