"""benchmarks/allocator.py: with freed memory kept, a re-allocated tensor costs no page faults."""
from __future__ import annotations

import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Ten forward + backward passes of a conv over 6 MiB activations; prints the allocator state and the
# faults of each pass. Run in its own process: the setting is process-wide and would outlive this test.
_PROBE = """
import json, sys, torch
from benchmarks import allocator
state = allocator.keep_freed_memory() if sys.argv[1] == "keep" else allocator.SYSTEM
x = torch.randn(8, 64, 56, 56, requires_grad=True)
w = torch.randn(64, 64, 3, 3, requires_grad=True)
faults = []
for _ in range(10):
    before = allocator.minor_faults()
    torch.nn.functional.conv2d(torch.relu(x), w, padding=1).sum().backward()
    faults.append(allocator.minor_faults() - before)
print(json.dumps({"state": state, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or "libc" not in str(ctypes.util.find_library("c")),
                    reason="glibc's mallopt is Linux-only")
def test_kept_memory_is_reused_without_page_faults():
    system, kept = _probe("system"), _probe("keep")
    assert kept["state"].startswith("glibc"), kept["state"]
    # The system allocator maps large blocks afresh and faults their pages in again on every pass (here:
    # 3-14 thousand faults per pass; fewer where transparent huge pages are always on); kept, the blocks
    # are reused once the heap has grown (a VM's page reclaim may still take idle pages back now and then).
    assert sum(kept["faults"][3:]) <= max(0.1 * sum(system["faults"][3:]), 64), (kept, system)
