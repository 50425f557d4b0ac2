"""Intensity normalisation and display windows (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Normaliser:
    """Affine map ``x_n = (x - offset) / scale`` from image units (HU for CT) to ~[0, 1]."""

    offset: float
    scale: float

    @classmethod
    def robust(
        cls, array: npt.NDArray[np.floating], lo_pct: float = 0.5, hi_pct: float = 99.5
    ) -> Normaliser:
        """Fit to the ``lo_pct``..``hi_pct`` percentile range of ``array`` (any shape)."""
        lo, hi = np.percentile(array, [lo_pct, hi_pct])
        scale = float(hi - lo)
        return cls(float(lo), scale if scale > 1e-6 else 1.0)

    def forward(self, array: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """Image units -> normalised float32."""
        return ((np.asarray(array, dtype=np.float32) - self.offset) / self.scale).astype(np.float32)

    def inverse(self, array: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """Normalised -> image units, float32."""
        return (np.asarray(array, dtype=np.float32) * self.scale + self.offset).astype(np.float32)


@dataclass(frozen=True)
class Window:
    """Display window: ``level`` and ``width`` in image units (HU for CT)."""

    level: float
    width: float
    name: str

    def to_uint8(self, array: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
        """Map to 0..255 grey levels, clipping outside the window."""
        lo = self.level - self.width / 2
        scaled = (np.asarray(array, dtype=np.float64) - lo) / self.width
        return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def display_window(array: npt.NDArray[np.floating], units: str) -> Window:
    """Soft-tissue window (L 40 / W 400 HU) for HU images, else the 1-99 percentile range."""
    if units == "HU":
        return Window(40.0, 400.0, "soft tissue L40/W400 HU")
    lo, hi = np.percentile(array, [1.0, 99.0])
    width = float(hi - lo) if hi > lo else 1.0
    return Window(
        float(lo + hi) / 2, width, f"percentile 1-99 ({lo:.4g}..{hi:.4g} {units})".strip()
    )
