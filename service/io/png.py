"""PNG encoding of report figures (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.io.atomic import atomic_file


def write_png(rgb: npt.NDArray[np.uint8], path: Path) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB array as PNG, atomically."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    with atomic_file(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
