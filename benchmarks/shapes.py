"""The shapes benchmarked: RLA-ResNet-50's bottleneck entries, one per stage.

Each stage is given by a block that is not the stage's first, so the block input has
C = 4 * width channels, the shortcut is the identity and the RLA update does not pool.
"""
from __future__ import annotations

from dataclasses import dataclass

RLA_CHANNELS = 32  # k: the published default hidden-state width


@dataclass(frozen=True)
class Stage:
    """One RLA-ResNet-50 stage at 224x224: block input channels, spatial size, bottleneck width."""

    channels: int  # C: block input = block output channels (x for op A, y for op B)
    size: int  # H = W
    width: int  # bottleneck width ("planes"): op A's C_out

    @property
    def label(self) -> str:
        return f"C{self.channels}xH{self.size}"


STAGES: tuple[Stage, ...] = (
    Stage(256, 56, 64),
    Stage(512, 28, 128),
    Stage(1024, 14, 256),
    Stage(2048, 7, 512),
)


def stage_by_label(label: str) -> Stage:
    """The stage named like ``C256xH56`` (or just its channel count, ``256``)."""
    for stage in STAGES:
        if label in (stage.label, str(stage.channels)):
            return stage
    raise ValueError(f"unknown stage {label!r}; choose from {[s.label for s in STAGES]}")
