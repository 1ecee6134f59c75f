"""The shapes benchmarked, one stage table per op.

``concat_conv_bn_act`` and ``rla_update`` run at RLA-ResNet-50's bottleneck entries, one per stage
(``STAGES``). Each stage is given by a block that is not the stage's first, so the block input has
C = 4 * width channels, the shortcut is the identity and the RLA update does not pool.
``rla_update_and_entry`` (the block boundary: op B, then the next bottleneck's entry on y and h_next)
runs at the same stages: y has C channels, the next block's entry has C_out = width, no pooling.

``concat_conv3x3_bn_act`` (the RLA basic block's 3x3 entry) runs at the CIFAR basic-block models'
entries (``CIFAR_BASIC_STAGES``: rla_resnet20/32/44/56/110 in rla_ext/models/zoo.py, widths 16, 32,
64 at 32x32, 16x16, 8x8, k = 16): every stage's inner block (stride 1, C = width) and the first
block of stages 2 and 3, which downsamples (stride 2 on the 3x3 entry, C = half its width, x and h
at the previous stage's resolution).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RLA_CHANNELS = 32  # k: the published default hidden-state width
CIFAR_RLA_CHANNELS = 16  # k of the CIFAR models (rla_ext.models.zoo.rla_resnet_cifar's default)


@dataclass(frozen=True)
class Stage:
    """One benchmarked op call: block input channels, input spatial size, the entry's output width (for
    the boundary, the next block's entry), the entry conv's stride and the RLA hidden-state width k."""

    channels: int  # C: block input channels (x for the entry ops, y for op B and the boundary)
    size: int  # H = W of the op's input (the size class `auto` looks up)
    width: int  # the entry's C_out: the bottleneck width ("planes") or the basic block's planes
    stride: int = 1  # the 3x3 entry's stride (2 where a basic block downsamples); 1 for the 1x1 ops
    k: int = RLA_CHANNELS

    @property
    def label(self) -> str:
        """``C<channels>xH<size>``, with ``s<stride>`` appended where the stride is not 1."""
        return f"C{self.channels}xH{self.size}" + (f"s{self.stride}" if self.stride != 1 else "")


# RLA-ResNet-50 at 224x224: one bottleneck per stage (op A's C_out = width, C = 4 * width).
STAGES: tuple[Stage, ...] = (
    Stage(256, 56, 64),
    Stage(512, 28, 128),
    Stage(1024, 14, 256),
    Stage(2048, 7, 512),
)


def _cifar_basic_stages(widths: tuple[int, ...] = (16, 32, 64), size: int = 32,
                        k: int = CIFAR_RLA_CHANNELS) -> tuple[Stage, ...]:
    """The 3x3 entries of a CIFAR basic-block RLA-ResNet (cifar stem: stage 1 at the input size, each
    later stage's first block strides 2): stride-1 entries first, largest to smallest, then the
    downsampling ones."""
    sizes = [size >> s for s in range(len(widths))]
    inner = [Stage(w, s, w, k=k) for w, s in zip(widths, sizes)]
    down = [Stage(widths[s - 1], sizes[s - 1], widths[s], stride=2, k=k) for s in range(1, len(widths))]
    return tuple(inner + down)


# C16xH32, C32xH16, C64xH8, C16xH32s2 (-> 32 x 16x16), C32xH16s2 (-> 64 x 8x8).
CIFAR_BASIC_STAGES: tuple[Stage, ...] = _cifar_basic_stages()

# Each op's stage table (the CLI's default shapes and the pytest suites'), and the subset --quick runs.
OP_STAGES: dict[str, tuple[Stage, ...]] = {
    "concat_conv_bn_act": STAGES,
    "rla_update": STAGES,
    "concat_conv3x3_bn_act": CIFAR_BASIC_STAGES,
    "rla_update_and_entry": STAGES,
}
QUICK_OP_STAGES: dict[str, tuple[Stage, ...]] = {
    "concat_conv_bn_act": (STAGES[1], STAGES[3]),
    "rla_update": (STAGES[1], STAGES[3]),
    "concat_conv3x3_bn_act": (CIFAR_BASIC_STAGES[1], CIFAR_BASIC_STAGES[4]),  # C32xH16 and C32xH16s2
    "rla_update_and_entry": (STAGES[1], STAGES[3]),
}


def stages_for(op: str, quick: bool = False) -> tuple[Stage, ...]:
    """The stage table of `op` (its --quick subset when `quick`)."""
    table = QUICK_OP_STAGES if quick else OP_STAGES
    if op not in table:
        raise ValueError(f"op: expected one of {tuple(table)}, got {op!r}")
    return table[op]


def _matches(stage: Stage, name: str) -> bool:
    return name in (stage.label, str(stage.channels))


def select_stages(names: Sequence[str], table: Sequence[Stage]) -> tuple[Stage, ...]:
    """The stages of `table` (e.g. ``stages_for(op)``) named in `names` (labels like ``C256xH56`` or
    channel counts, which select every stage with that many input channels), in the table's order."""
    return tuple(s for s in table if any(_matches(s, n) for n in names))


def stage_by_label(label: str, op: str | None = None) -> Stage:
    """The stage named like ``C256xH56`` (or just its channel count, ``256``: the first such stage) in
    `op`'s table; with no op, in RLA-ResNet-50's ``STAGES``, then the other ops' tables."""
    tables = (stages_for(op),) if op is not None else (STAGES, *OP_STAGES.values())
    for table in tables:  # exact labels first: a channel count must not shadow another stage's label
        for stage in table:
            if stage.label == label:
                return stage
    for table in tables:
        for stage in table:
            if _matches(stage, label):
                return stage
    known = sorted({s.label for t in tables for s in t})
    raise ValueError(f"unknown stage {label!r}{f' for {op}' if op else ''}; choose from {known}")
