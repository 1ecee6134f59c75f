"""Measured order of the backends that ``auto`` tries, per device type, op, size class and pass.

Written by ``python -m benchmarks.auto_table RESULTS.json`` from a benchmark run (medians of its fwd
and fwd+bwd rows); do not edit by hand. The order holds the fused backends and the reference
("torch"): where eager PyTorch was faster than every fused kernel, ``auto`` runs the reference. The
pass is "fwd+bwd" while autograd records and "fwd" under no_grad / inference_mode. A call whose key
has no entry tries the backends in the static order of ``rla_ext._backend`` (cuda before triton on
GPUs, cpp on CPUs).

Entries measured under torch.compile have the pass "compiled fwd" / "compiled fwd+bwd" and apply
while torch.compile traces the call. The reference leads only where it was more than
benchmarks.auto_table.REFERENCE_MARGIN faster.

cuda: one H200 run (bf16, batch 128, channels_last; benchmarks/results/h200-2026-11-30): the reference
beat both fused backends nearly everywhere. cpu: one 2-core AMD EPYC run (float32, batch 8,
channels_last; benchmarks/results/cpu-2core-2026-11-30d).
"""
from __future__ import annotations

# SOURCES: {device type: {"device", "date", "commit"}} of the run its entries came from.
# PREFERENCE: (device type, op, size class, "fwd" | "fwd+bwd") -> backends, fastest first (see size_class()).
# BEGIN GENERATED
SOURCES: dict[str, dict[str, str]] = {
    'cuda': {'device': 'NVIDIA H200', 'date': '2026-11-30T16:58:59+00:00', 'commit': '714d11ab751acd396e41ee8a253b4a3bf0116db6'},
    'cpu': {'device': 'AMD EPYC (2 threads)', 'date': '2026-12-01T05:54:15+00:00', 'commit': '5ada17b5a557734d312d42bf424cfae83db6c813'},
}
PREFERENCE: dict[tuple[str, str, int, str], tuple[str, ...]] = {
    ('cpu', 'concat_conv3x3_bn_act', 7, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 7, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 7, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 7, 'fwd+bwd'): ('torch', 'cpp'),
    ('cpu', 'concat_conv3x3_bn_act', 14, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 14, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 14, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 14, 'fwd+bwd'): ('torch', 'cpp'),
    ('cpu', 'concat_conv3x3_bn_act', 28, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 28, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 28, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv3x3_bn_act', 28, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 7, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 7, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 7, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 7, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 14, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 14, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 14, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 14, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 28, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 28, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 28, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 28, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 56, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 56, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 56, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'concat_conv_bn_act', 56, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 7, 'compiled fwd'): ('torch', 'cpp'),
    ('cpu', 'rla_update', 7, 'compiled fwd+bwd'): ('torch', 'cpp'),
    ('cpu', 'rla_update', 7, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 7, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 14, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 14, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 14, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 14, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 28, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 28, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 28, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 28, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 56, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 56, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 56, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update', 56, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 7, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 7, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 7, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 7, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 14, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 14, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 14, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 14, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 28, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 28, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 28, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 28, 'fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 56, 'compiled fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 56, 'compiled fwd+bwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 56, 'fwd'): ('cpp', 'torch'),
    ('cpu', 'rla_update_and_entry', 56, 'fwd+bwd'): ('cpp', 'torch'),
    ('cuda', 'concat_conv_bn_act', 7, 'fwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 7, 'fwd+bwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 14, 'fwd'): ('torch', 'triton', 'cuda'),
    ('cuda', 'concat_conv_bn_act', 14, 'fwd+bwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 28, 'fwd'): ('torch', 'triton', 'cuda'),
    ('cuda', 'concat_conv_bn_act', 28, 'fwd+bwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'concat_conv_bn_act', 56, 'fwd'): ('triton', 'torch', 'cuda'),
    ('cuda', 'concat_conv_bn_act', 56, 'fwd+bwd'): ('torch', 'triton', 'cuda'),
    ('cuda', 'rla_update', 7, 'fwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 7, 'fwd+bwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 14, 'fwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 14, 'fwd+bwd'): ('cuda', 'torch', 'triton'),
    ('cuda', 'rla_update', 28, 'fwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 28, 'fwd+bwd'): ('torch', 'cuda', 'triton'),
    ('cuda', 'rla_update', 56, 'fwd'): ('torch', 'triton', 'cuda'),
    ('cuda', 'rla_update', 56, 'fwd+bwd'): ('torch', 'cuda', 'triton'),
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
