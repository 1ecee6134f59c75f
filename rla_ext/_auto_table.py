"""Measured order of the backends that ``auto`` tries, per device type, op and size class.

Written by ``python -m benchmarks.auto_table RESULTS.json`` from a benchmark run (fwd+bwd medians);
do not edit by hand. The order holds the fused backends and the reference ("torch"): where eager
PyTorch was faster than every fused kernel, ``auto`` runs the reference. A call whose (device type,
op, size class) has no entry tries the backends in the static order of ``rla_ext._backend`` (cuda
before triton on GPUs, cpp on CPUs).

cuda: one H200 run (bf16, batch 128, channels_last; benchmarks/results/h200-2026-11-30), where the
reference beat both fused backends at every stage but rla_update at 14x14. cpu: no entry yet.
"""
from __future__ import annotations

# SOURCES: {device type: {"device", "date", "commit"}} of the run its entries came from.
# PREFERENCE: (device type, op, size class) -> backends, fastest first (see size_class()).
# BEGIN GENERATED
SOURCES: dict[str, dict[str, str]] = {
    'cuda': {'device': 'NVIDIA H200', 'date': '2026-11-30T16:58:59+00:00', 'commit': '714d11ab751acd396e41ee8a253b4a3bf0116db6'},
}
PREFERENCE: dict[tuple[str, str, int], tuple[str, ...]] = {
    ('cuda', 'concat_conv_bn_act', 7): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 14): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 28): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 56): ('torch', 'triton', 'cuda'),
    ('cuda', 'rla_update', 7): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 14): ('cuda', 'torch', 'triton'),
    ('cuda', 'rla_update', 28): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 56): ('torch', 'cuda', 'triton'),
}
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
