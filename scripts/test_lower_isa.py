"""Run the numerics-sensitive tests again with torch, oneDNN and MKL forced one instruction set down.

Rounding differs between instruction sets (oneDNN's AVX-512 and AVX2 convolutions, MKL's GEMMs,
ATen's vectorised kernels, our own kernel variants): a tolerance that holds on one machine's ISA
can fail on the next machine's. CI runs on one machine, so it checks a second ISA by capping this
one: AVX-512 machines rerun the `isa_sensitive` tests on the AVX2 paths, AVX2 machines on the
baseline (SSE4) ones. A machine with neither has nothing lower to check and says so.

    python scripts/test_lower_isa.py [extra pytest args]
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

# torch's capability -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) one level down.
LOWER = {
    "AVX512": ("avx2", "AVX2", "AVX2"),
    "AVX2": ("default", "SSE41", "SSE4_2"),
}


def main(argv: list[str]) -> int:
    native = torch.backends.cpu.get_cpu_capability()
    if native not in LOWER:
        print(f"[lower-isa] torch runs {native} here: no lower x86 instruction set to force; nothing to rerun")
        return 0
    aten, onednn, mkl = LOWER[native]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=aten, ONEDNN_MAX_CPU_ISA=onednn, MKL_ENABLE_INSTRUCTIONS=mkl,
               RLA_EXT_EXPECT_TORCH_ISA=aten.upper())
    print(f"[lower-isa] native {native}; rerunning the isa_sensitive tests with ATEN_CPU_CAPABILITY={aten} "
          f"ONEDNN_MAX_CPU_ISA={onednn} MKL_ENABLE_INSTRUCTIONS={mkl}", flush=True)
    # Triton's CPU interpreter computes through NumPy, which none of these variables change.
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "isa_sensitive", "-k", "not triton", "tests", *argv]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
