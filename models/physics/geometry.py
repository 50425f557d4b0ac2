"""2D parallel-beam CT geometry and the conventions every projector follows.

Image axes:
    An image is indexed ``image[row, col]`` with shape ``(N, N)``. The column index increases
    along +x and the row index along +y. For an axial slice in the LPS patient frame this is
    x = patient Left and y = Posterior, i.e. the usual radiological display of
    :class:`models.volume.Volume` slices. The rotation centre is the centre of the square:
    pixel ``(row, col)`` has its centre at ``x = (col - (N - 1) / 2) * pixel_size_mm`` and
    ``y = (row - (N - 1) / 2) * pixel_size_mm`` (mm).

Angles and detector:
    View ``k`` has angle ``theta_k = angles_rad[k]``, measured from +x towards +y. The detector
    coordinate of a point is ``t = x cos(theta) + y sin(theta)`` (mm) and the rays of that view
    run along ``(-sin(theta), cos(theta))``. Detector bin ``j`` has its centre at
    ``t_j = (j - (n_det - 1) / 2) * det_spacing_mm``. So at ``theta = 0`` the rays run down the
    columns and the projection is a function of x (sinogram row 0 ~ ``image.sum(axis=0)``);
    at ``theta = 90 deg`` it is a function of y (~ ``image.sum(axis=1)``).

Sinograms have shape ``(n_views, n_det)`` indexed ``[view, detector bin]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected

MAX_VIEWS = 10_000
"""Largest number of views a geometry accepts."""

MAX_IMAGE_SIZE = 8192
"""Largest image side (pixels) a geometry accepts."""


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_positive_float(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return math.isfinite(float(value)) and float(value) > 0.0


def default_detector_count(image_size: int, pixel_size_mm: float, det_spacing_mm: float) -> int:
    """Smallest detector that sees every pixel of the square at every angle.

    A pixel centre lies at most ``(N - 1) * pixel / sqrt(2)`` from the rotation centre and a
    linear-interpolation footprint reaches one pixel further, so the outermost bin centre must
    lie at least that far out. The count keeps the parity of ``N`` so that, with equal pixel
    and bin sizes, bin centres fall on pixel centres at 0 and 90 degrees.

    Args:
        image_size: Image side N (pixels).
        pixel_size_mm: Pixel side (mm).
        det_spacing_mm: Detector bin spacing (mm).

    Returns:
        The number of detector bins (about ``ceil(N * sqrt(2))`` for equal spacings).
    """
    reach_mm = (image_size - 1) * pixel_size_mm / math.sqrt(2.0) + pixel_size_mm
    count = math.ceil(2.0 * reach_mm / det_spacing_mm - 1e-9) + 1
    if count % 2 != image_size % 2:
        count += 1
    return count


class ScanGrid:
    """What parallel- and fan-beam geometries share: image grid, view angles, detector bins.

    A mixin of the geometry dataclasses, which hold ``image_size``, ``pixel_size_mm``,
    ``n_views`` and ``arc_deg`` and resolve ``n_det`` and ``det_spacing_mm``.
    """

    image_size: int
    pixel_size_mm: float
    n_views: int
    arc_deg: float

    @property
    def n_det(self) -> int:
        """Number of detector bins (resolved by the geometry)."""
        raise NotImplementedError

    @property
    def det_spacing_mm(self) -> float:
        """Detector bin pitch in mm (resolved by the geometry)."""
        raise NotImplementedError

    @property
    def angles_rad(self) -> npt.NDArray[np.float64]:
        """View (source) angles in radians, shape ``(n_views,)``: ``linspace(0, arc)``, end open."""
        return np.linspace(0.0, math.radians(self.arc_deg), self.n_views, endpoint=False)

    @property
    def image_shape(self) -> tuple[int, int]:
        """Shape ``(N, N)`` of one image."""
        return (self.image_size, self.image_size)

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        """Shape ``(n_views, n_det)`` of one sinogram."""
        return (self.n_views, self.n_det)

    @property
    def pixel_centres_mm(self) -> npt.NDArray[np.float64]:
        """Pixel centre coordinates along either image axis (mm), shape ``(N,)``."""
        n = self.image_size
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * self.pixel_size_mm

    @property
    def detector_centres_mm(self) -> npt.NDArray[np.float64]:
        """Bin centres along the detector (mm; arc length on a curved one), shape ``(n_det,)``."""
        n = self.n_det
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * self.det_spacing_mm

    @property
    def fov_radius_mm(self) -> float:
        """Radius (mm) of the circle inscribed in the image square."""
        return self.image_size * self.pixel_size_mm / 2.0


@dataclass(frozen=True)
class ParallelBeamGeometry(ScanGrid):
    """A 2D parallel-beam scan of a square N x N image.

    ``n_detectors`` and ``detector_spacing_mm`` may be given as ``None``; they are then resolved
    at construction (see :func:`default_detector_count`; spacing = pixel size), so a built
    geometry always holds concrete values. :attr:`n_det` and :attr:`det_spacing_mm` give them
    typed.

    Attributes:
        image_size: Side N of the square image (pixels); images have shape ``(N, N)``.
        pixel_size_mm: Side of a square pixel (mm).
        n_views: Number of projection angles, 1..10000.
        n_detectors: Number of detector bins; default covers the image diagonal.
        detector_spacing_mm: Centre-to-centre spacing of detector bins (mm); default the pixel
            size.
        arc_deg: Angular range covered (degrees), 0 < arc <= 360; views are equally spaced
            over ``[0, arc)``.
    """

    image_size: int
    pixel_size_mm: float
    n_views: int
    n_detectors: int | None = None
    detector_spacing_mm: float | None = None
    arc_deg: float = 180.0

    def __post_init__(self) -> None:
        """Validate every field and resolve the detector defaults."""
        if not _is_int(self.image_size) or not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise InputRejected(
                f"image_size must be an integer in 1..{MAX_IMAGE_SIZE}, got {self.image_size!r}"
            )
        if not _is_positive_float(self.pixel_size_mm):
            raise InputRejected(f"pixel_size_mm must be > 0 and finite, got {self.pixel_size_mm!r}")
        if not _is_int(self.n_views) or not 1 <= self.n_views <= MAX_VIEWS:
            raise InputRejected(
                f"n_views must be an integer in 1..{MAX_VIEWS}, got {self.n_views!r}"
            )
        if not _is_positive_float(self.arc_deg) or float(self.arc_deg) > 360.0:
            raise InputRejected(f"arc_deg must be in (0, 360], got {self.arc_deg!r}")
        spacing = self.detector_spacing_mm
        if spacing is None:
            spacing = self.pixel_size_mm
        elif not _is_positive_float(spacing):
            raise InputRejected(f"detector_spacing_mm must be > 0 and finite, got {spacing!r}")
        count = self.n_detectors
        if count is None:
            count = default_detector_count(self.image_size, float(self.pixel_size_mm), spacing)
        elif not _is_int(count) or count < 1:
            raise InputRejected(f"n_detectors must be a positive integer, got {count!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "pixel_size_mm", float(self.pixel_size_mm))
        object.__setattr__(self, "n_views", int(self.n_views))
        object.__setattr__(self, "arc_deg", float(self.arc_deg))
        object.__setattr__(self, "detector_spacing_mm", float(spacing))
        object.__setattr__(self, "n_detectors", int(count))

    @property
    def n_det(self) -> int:
        """Number of detector bins (resolved)."""
        assert self.n_detectors is not None  # resolved in __post_init__
        return self.n_detectors

    @property
    def det_spacing_mm(self) -> float:
        """Detector bin spacing in mm (resolved)."""
        assert self.detector_spacing_mm is not None  # resolved in __post_init__
        return self.detector_spacing_mm
