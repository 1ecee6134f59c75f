"""The emulated kernels under AddressSanitizer and UndefinedBehaviorSanitizer (full tier: a separate,
slower build). The sanitizers see what the emulator's own checks cannot: reads and writes outside
global buffers (torch's allocations get ASan redzones; shared arrays become exact-size heap blocks),
integer overflow, misaligned or out-of-range accesses, in every kernel of both ops."""
from __future__ import annotations

import pytest

import cuda_emulation

pytestmark = [
    pytest.mark.skipif(not cuda_emulation.full_tier(), reason="full tier only (RLA_EXT_EMULATE_FULL=1)"),
    pytest.mark.skipif(cuda_emulation.compiler() is None, reason=cuda_emulation.no_compiler_reason()),
    pytest.mark.skipif(cuda_emulation.compiler() is not None and cuda_emulation.sanitizer_runtime() is None,
                       reason="the compiler has no AddressSanitizer runtime (libasan.so)"),
]


def sanitized(*args: str) -> dict:
    return cuda_emulation.probe_in_subprocess(cuda_emulation.SOURCE_DIR, "asan", sanitize=True, args=list(args))


def test_kernels_are_clean_under_sanitizers():
    result = sanitized("--all", "--schedules", "inorder", "--dtypes", "float32,bfloat16,float64")
    assert result["built"], result["output"]
    assert result["returncode"] == 0 and not result["failures"], result["failures"] or result["output"]
    assert result["cases"] == 3 * 4 * (len(cuda_emulation.PROBE_CCBA) + len(cuda_emulation.PROBE_UPDATE)
                                    + len(cuda_emulation.PROBE_BOUNDARY))


@pytest.mark.parametrize("case,report", [
    ("global_overflow", "AddressSanitizer: heap-buffer-overflow"),
    ("shared_overflow", "runtime error: index 63 out of bounds for type 'float [63]'"),  # UBSan's bounds check
    ("int_overflow", "runtime error: signed integer overflow"),
])
def test_sanitizers_report(case, report):
    result = sanitized("--selftest", case)
    assert result["returncode"] != 0 and report in result["output"], result["output"]
