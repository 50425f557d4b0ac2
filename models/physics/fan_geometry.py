"""2D fan-beam CT geometry (equiangular/curved or flat detector) and its ray conventions.

Image axes, pixel centres and the rotation centre (isocentre) are those of
:mod:`models.physics.geometry`: ``image[row (+y), col (+x)]``, centred, ``pixel_size_mm``.

Source and detector:
    View ``k`` has the source angle ``beta_k = angles_rad[k]`` (from +x towards +y, views
    equally spaced over ``[0, arc)``). The central ray of that view runs along
    ``d0 = (-sin beta, cos beta)`` -- the ray direction of the parallel-beam view of angle
    ``beta`` -- from the source at ``s = -D d0 = D (sin beta, -cos beta)`` (``D`` =
    ``source_to_isocentre_mm``) through the isocentre, and the detector axis is
    ``e_t = (cos beta, sin beta)``, the parallel-beam detector axis. Detector bin ``j`` has the
    coordinate ``c_j = (j - (n_det - 1) / 2) * detector_spacing_mm`` along the detector (mm).

    * ``"flat"``: the bin centre is ``s + SDD d0 + c_j e_t`` (``SDD`` =
      ``source_to_detector_mm``); its fan angle is ``gamma_j = atan(c_j / SDD)``.
    * ``"equiangular"`` (curved, as clinical scanners): bins lie on the arc of radius ``SDD``
      centred at the source, ``c_j`` is the arc length, ``gamma_j = c_j / SDD``.

    Ray ``(k, j)`` leaves the source along ``cos(gamma_j) d0 + sin(gamma_j) e_t``: it is the
    parallel-beam ray of angle ``theta = beta - gamma`` and detector coordinate
    ``t = D sin(gamma)``, so with ``D -> inf`` and ``SDD / D`` fixed a fan scan becomes the
    parallel-beam scan of :mod:`models.physics.geometry` (bin ``j`` at ``t = c_j D / SDD``).
    The conjugate ray of ``(beta, gamma)`` is ``(beta + pi - 2 gamma, -gamma)``.

Line integrals are taken over the whole line through the image (the object lies between
source and detector), sinograms have shape ``(n_views, n_det)`` indexed ``[view, bin]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.geometry import ParallelBeamGeometry, ScanGrid, _is_int, _is_positive_float

DetectorShape = Literal["equiangular", "flat"]
"""Fan-beam detector: an arc centred at the source (equal angles) or a flat line."""


def _image_reach_mm(image_size: int, pixel_size_mm: float) -> float:
    """Radius (mm) of the circle holding every pixel centre plus one interpolation footprint."""
    return (image_size - 1) * pixel_size_mm / math.sqrt(2.0) + pixel_size_mm


@dataclass(frozen=True)
class FanBeamGeometry(ScanGrid):
    """A 2D fan-beam scan of a square N x N image (conventions in the module docstring).

    ``n_detectors`` and ``detector_spacing_mm`` may be ``None``: the spacing then defaults to
    the pixel size magnified to the detector (``pixel * SDD / D``, i.e. one pixel at the
    isocentre) and the count to the smallest detector whose fan covers every pixel of the
    square (keeping the parity of N). A built geometry always holds concrete values.

    Attributes:
        image_size: Side N of the square image (pixels).
        pixel_size_mm: Side of a square pixel (mm).
        n_views: Number of source positions, 1..10000.
        source_to_isocentre_mm: Distance D from the source to the rotation centre (mm); the
            source must lie outside the image (``D`` > half the image diagonal + 1 pixel).
        source_to_detector_mm: Distance SDD from the source to the detector centre (mm),
            ``> D``.
        detector: ``"equiangular"`` (curved, default) or ``"flat"``.
        n_detectors: Number of detector bins.
        detector_spacing_mm: Bin pitch along the detector at distance SDD (mm; arc length on
            the curved detector, so the angular pitch is ``spacing / SDD`` rad).
        arc_deg: Source arc covered (degrees), 0 < arc <= 360; default a full 360 degree scan.
    """

    image_size: int
    pixel_size_mm: float
    n_views: int
    source_to_isocentre_mm: float
    source_to_detector_mm: float
    detector: DetectorShape = "equiangular"
    n_detectors: int | None = None
    detector_spacing_mm: float | None = None
    arc_deg: float = 360.0

    def __post_init__(self) -> None:
        """Validate every field and resolve the detector defaults."""
        # The image, view and arc checks are exactly the parallel-beam ones.
        ParallelBeamGeometry(
            self.image_size, self.pixel_size_mm, self.n_views, 1, 1.0, self.arc_deg
        )
        if self.detector not in ("equiangular", "flat"):
            raise InputRejected(f"detector must be 'equiangular' or 'flat', got {self.detector!r}")
        sod, sdd = self.source_to_isocentre_mm, self.source_to_detector_mm
        if not _is_positive_float(sod) or not _is_positive_float(sdd):
            raise InputRejected(
                f"source distances must be > 0 and finite, got {sod!r} and {sdd!r} mm"
            )
        reach = _image_reach_mm(int(self.image_size), float(self.pixel_size_mm))
        if float(sod) <= reach:
            raise InputRejected(
                f"source_to_isocentre_mm={sod} puts the source inside the image; it must "
                f"exceed {reach:.1f} mm (half the image diagonal + 1 pixel)"
            )
        if float(sdd) <= float(sod):
            raise InputRejected(
                f"source_to_detector_mm={sdd} must exceed source_to_isocentre_mm={sod}"
            )
        spacing = self.detector_spacing_mm
        if spacing is None:
            spacing = float(self.pixel_size_mm) * float(sdd) / float(sod)
        elif not _is_positive_float(spacing):
            raise InputRejected(f"detector_spacing_mm must be > 0 and finite, got {spacing!r}")
        count = self.n_detectors
        if count is None:
            count = self._default_count(reach, float(sod), float(sdd), float(spacing))
        elif not _is_int(count) or count < 1:
            raise InputRejected(f"n_detectors must be a positive integer, got {count!r}")
        if self.detector == "equiangular" and (count - 1) / 2 * spacing / sdd >= math.pi / 2:
            raise InputRejected("the curved detector spans a fan angle of 180 degrees or more")
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "pixel_size_mm", float(self.pixel_size_mm))
        object.__setattr__(self, "n_views", int(self.n_views))
        object.__setattr__(self, "arc_deg", float(self.arc_deg))
        object.__setattr__(self, "source_to_isocentre_mm", float(sod))
        object.__setattr__(self, "source_to_detector_mm", float(sdd))
        object.__setattr__(self, "detector_spacing_mm", float(spacing))
        object.__setattr__(self, "n_detectors", int(count))

    def _default_count(self, reach: float, sod: float, sdd: float, spacing: float) -> int:
        half_fan = math.asin(reach / sod)
        extent = sdd * (half_fan if self.detector == "equiangular" else math.tan(half_fan))
        count = math.ceil(2.0 * extent / spacing - 1e-9) + 1
        if count % 2 != int(self.image_size) % 2:
            count += 1
        return count

    # ----------------------------------------------------------------- resolved values

    @property
    def n_det(self) -> int:
        """Number of detector bins (resolved)."""
        assert self.n_detectors is not None  # resolved in __post_init__
        return self.n_detectors

    @property
    def det_spacing_mm(self) -> float:
        """Bin pitch along the detector in mm (resolved)."""
        assert self.detector_spacing_mm is not None  # resolved in __post_init__
        return self.detector_spacing_mm

    @property
    def magnification(self) -> float:
        """``SDD / D``: detector lengths over the same lengths at the isocentre."""
        return self.source_to_detector_mm / self.source_to_isocentre_mm

    @property
    def fan_angles_rad(self) -> npt.NDArray[np.float64]:
        """Fan angle ``gamma_j`` of every bin (rad), shape ``(n_det,)``."""
        c = self.detector_centres_mm
        if self.detector == "equiangular":
            return c / self.source_to_detector_mm
        return np.arctan(c / self.source_to_detector_mm)

    @property
    def max_fan_angle_rad(self) -> float:
        """Largest ``|gamma|`` of the detector (rad)."""
        return float(np.max(np.abs(self.fan_angles_rad)))

    @property
    def short_scan_arc_deg(self) -> float:
        """Smallest arc (degrees) that measures every ray once: ``180 + 2 max|gamma|``."""
        return 180.0 + 2.0 * math.degrees(self.max_fan_angle_rad)

    def rays(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Source positions and unit ray directions in the image frame (mm).

        Returns:
            ``(sources, directions)``: shapes ``(n_views, 2)`` and ``(n_views, n_det, 2)``,
            last axis ``(x, y)``.
        """
        beta = self.angles_rad
        d0 = np.stack([-np.sin(beta), np.cos(beta)], axis=-1)  # (V, 2)
        e_t = np.stack([np.cos(beta), np.sin(beta)], axis=-1)
        gamma = self.fan_angles_rad
        directions = (
            np.cos(gamma)[None, :, None] * d0[:, None, :]
            + np.sin(gamma)[None, :, None] * e_t[:, None, :]
        )
        return -self.source_to_isocentre_mm * d0, directions


Geometry = ParallelBeamGeometry | FanBeamGeometry
"""Any 2D scan geometry a projector can be built for."""
