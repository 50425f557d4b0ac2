"""Result of a pipeline run: output volumes, measurements, figures and provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.labels import LabelMap
from models.volume import Volume

ProgressCallback = Callable[[float, str], None]
"""``callback(fraction, step)``: fraction in [0, 1] and a short step name.

A callback may raise :class:`models.errors.Cancelled` to stop the pipeline at that point.
"""


def no_progress(fraction: float, step: str) -> None:
    """Progress callback that ignores everything."""


@dataclass(frozen=True)
class Figure:
    """A picture for the report.

    Attributes:
        name: File stem, e.g. ``"before_after"``.
        rgb: uint8 array, shape ``(height, width, 3)``.
        caption: One sentence saying what it shows (window, slice position).
    """

    name: str
    rgb: npt.NDArray[np.uint8]
    caption: str


@dataclass(frozen=True)
class Provenance:
    """What produced an output: enough to reproduce it.

    Attributes:
        pipeline: Registry name.
        version: Pipeline version string.
        weights_sha256: sha256 of the weights file, or ``"none"`` for weight-free pipelines.
        code_version: Package version and git commit when known.
        parameters: The validated parameters, as JSON-compatible values.
        input_uids: Series/SOP UIDs or file names of the inputs (no patient identifiers).
    """

    pipeline: str
    version: str
    weights_sha256: str
    code_version: str
    parameters: dict[str, Any]
    input_uids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """Everything a pipeline returns.

    Attributes:
        volumes: Output volumes by name (e.g. ``"denoised"``), each on its own grid.
        measurements: JSON-compatible figures (noise estimates, runtimes...).
        figures: Pictures for the report.
        provenance: How the result was made.
        label_maps: Output label maps by name (e.g. ``"organs"``), each on the grid of the image
            it labels; empty for pipelines that segment nothing.
    """

    volumes: dict[str, Volume]
    measurements: dict[str, Any]
    figures: list[Figure]
    provenance: Provenance
    label_maps: dict[str, LabelMap] = field(default_factory=dict)
