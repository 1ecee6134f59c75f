"""Measured order of the fused backends that ``auto`` tries, per device type, op and size class.

Written by ``python -m benchmarks.auto_table RESULTS.json`` from a benchmark run (fwd+bwd medians);
do not edit by hand. A call whose (device type, op, size class) has no entry tries the backends in
the static order of ``rla_ext._backend`` (cuda before triton on GPUs, cpp on CPUs).

Empty so far: no GPU benchmark has been run yet, and on the CPU only one fused backend exists.
"""
from __future__ import annotations

# SOURCES: {device type: {"device", "date", "commit"}} of the run its entries came from.
# PREFERENCE: (device type, op, size class) -> fused backends, fastest first (see size_class()).
# BEGIN GENERATED
SOURCES: dict[str, dict[str, str]] = {}
PREFERENCE: dict[tuple[str, str, int], tuple[str, ...]] = {}
# END GENERATED

# RLA-ResNet's stage sizes (at 224 px): a call belongs to the nearest one by pixel count, with the
# boundaries at the geometric means (56 x 28 = 1568 pixels, and so on).
SIZE_CLASSES = (56, 28, 14, 7)


def size_class(height: int, width: int) -> int:
    """The stage size (56, 28, 14 or 7) nearest to an (height, width) activation by pixel count."""
    pixels = height * width
    for big, small in zip(SIZE_CLASSES, SIZE_CLASSES[1:]):
        if pixels >= big * small:
            return big
    return SIZE_CLASSES[-1]
