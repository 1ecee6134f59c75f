"""Page faults out of CPU timings: keep the memory glibc malloc frees.

By default glibc returns large freed blocks to the kernel (blocks above the mmap threshold are
unmapped, the heap top beyond the trim threshold is given back), so the next tensor of that size
comes from fresh pages and pays one minor page fault per 4 KiB on first touch. Measured on the
project's 2-core VMs (SPEC §4 machines): ~3.3 us per fault, and an RLA-ResNet-50 training step
(batch 4, 128 px) took 19-37 thousand faults - 60-120 ms of a ~300 ms step - with the count depending
on the provider's allocation pattern and on what ran before (the source of the "cliffs" and most of
the run-to-run spread of earlier tables). With freed memory kept, the same step took ~0-15 faults and
every provider ran 5-15% faster.

`keep_freed_memory()` sets glibc's thresholds at run time (mallopt), which is what PyTorch's CPU
tuning advice gets from jemalloc or tcmalloc: an allocator that reuses memory instead of faulting it
in again. Benchmarks call it before timing on the CPU unless asked to measure the system allocator
as it is (the CLI's ``--system-malloc``), and record which allocator state they measured.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap instead of their own mappings (the largest benchmarked tensor,
# a 56x56 stage's cat at batch 32, is ~0.1 GiB).
_MMAP_THRESHOLD = 2**30
_TOP_PAD = 64 * 2**20
_TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap top

SYSTEM = "system malloc, as configured"


def keep_freed_memory() -> str:
    """Make glibc malloc keep freed memory for reuse (no trimming, heap blocks up to 1 GiB).

    Returns a description of the allocator state for the run's metadata: what was set, or why
    nothing was (not glibc, or mallopt refused)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError, TypeError):
        return f"{SYSTEM} (not glibc: freed memory not kept)"
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    if not ok:
        return f"{SYSTEM} (glibc {version} refused mallopt)"
    return (f"glibc {version} keeping freed memory (mallopt: mmap threshold {_MMAP_THRESHOLD >> 20} MiB, "
            f"no trim, top pad {_TOP_PAD >> 20} MiB)")


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
