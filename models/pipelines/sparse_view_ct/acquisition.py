"""Input checks, square padding, fan-beam geometry from the parameters, and the simulated scan.

Frames: a slice ``array[k]`` of a :class:`~models.volume.Volume` is indexed ``[row j, column i]``
and is handed to the projector as ``image[row (+y), col (+x)]`` of
:mod:`models.physics.geometry`. The simulation and the reconstruction use the same operator, so
the mapping of the scanner frame onto LPS (which only rotates/mirrors the source trajectory)
does not change the output grid: every output voxel sits where the input voxel was.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.geometry import ParallelBeamGeometry
from models.physics.lowdose import hu_to_mu, noisy_line_integrals
from models.physics.projector import Projector
from models.pipelines.ct_simulation import check_ct_volume
from models.pipelines.sparse_view_ct.params import SparseViewCTParams
from models.volume import Volume

CLINICAL_SOD_MM = 595.0
"""Source to isocentre of the clinical scanner (mm): the training simulation's."""

CLINICAL_SDD_MM = 1085.6
"""Source to detector of the clinical scanner (mm)."""

AIR_HU = -1000.0
"""Value (HU) of the padding that makes a slice square (air, attenuation 0)."""


def check_input(volume: Volume) -> float:
    """Refuse what the simulation cannot use (``ct_simulation.check_ct_volume``); pixel mm."""
    return check_ct_volume(volume, "sparse-view-ct simulates a scan of")


def pad_square(slices_hu: npt.NDArray[np.floating]) -> tuple[npt.NDArray[np.float32], slice, slice]:
    """Pad ``(K, H, W)`` slices with air to ``(K, N, N)``, ``N = max(H, W)``.

    Returns:
        The padded slices (HU, float32) and the row/column slices that crop them back.
    """
    k, h, w = slices_hu.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    out = np.full((k, n, n), AIR_HU, dtype=np.float32)
    rows, cols = slice(top, top + h), slice(left, left + w)
    out[:, rows, cols] = slices_hu
    return out, rows, cols


def image_reach_mm(n: int, pixel_mm: float) -> float:
    """Half diagonal of an ``n x n`` slice plus one pixel (mm): what the fan must cover."""
    return (n - 1) * pixel_mm / math.sqrt(2.0) + pixel_mm


def build_geometry(n: int, pixel_mm: float, params: SparseViewCTParams) -> FanBeamGeometry:
    """The 360 degree fan-beam geometry of the parameters for an ``n x n`` slice.

    Defaults with ``scanner="scaled"`` scale with the slice's field of view: source-to-isocentre
    twice the half diagonal ``R`` (half fan angle 30 degrees), source-to-detector twice that
    (magnification 2). With ``"clinical"`` (``"auto"`` and method ``learned``) they are those
    of the training simulation (:mod:`models.training.sparse_view_data`): 595 mm and 1085.6 mm,
    scaled up together when the slice needs more than ``0.8 * 595`` mm of reach. Bins are
    ``pixel / detector_bins_per_pixel`` at the isocentre, and the fewest whose fan covers the
    whole square slice.

    Raises:
        InputRejected: A source inside the slice, a detector nearer than the isocentre, or too
            few bins to cover the slice, each saying which parameter to change and to what.
    """
    reach = image_reach_mm(n, pixel_mm)
    clinical = params.scanner == "clinical" or (
        params.scanner == "auto" and params.method == "learned"
    )
    default_sod = max(CLINICAL_SOD_MM, 1.25 * reach) if clinical else 2.0 * reach
    sod = params.source_to_isocentre_mm or default_sod
    if sod <= reach:
        raise InputRejected(
            f"source_to_isocentre_mm={sod:g} puts the source inside the {n}x{n} slice of "
            f"{pixel_mm:g} mm pixels; it must exceed {reach:.1f} mm (half diagonal + 1 pixel): "
            f"raise it or leave it unset (default {default_sod:.1f} mm)"
        )
    ratio = CLINICAL_SDD_MM / CLINICAL_SOD_MM if clinical else 2.0
    sdd = params.source_to_detector_mm or ratio * sod
    if sdd <= sod:
        raise InputRejected(
            f"source_to_detector_mm={sdd:g} must exceed source_to_isocentre_mm={sod:g}: raise "
            f"it or leave it unset (default {ratio * sod:.1f} mm)"
        )
    spacing = pixel_mm * (sdd / sod) / params.detector_bins_per_pixel
    covering = FanBeamGeometry(n, pixel_mm, params.views, sod, sdd, params.detector, None, spacing)
    if params.n_detectors is None:
        return covering
    if params.n_detectors < covering.n_det:
        raise InputRejected(
            f"n_detectors={params.n_detectors} cannot cover the {n}x{n} slice "
            f"({n * pixel_mm:.0f} mm field of view) with {params.detector_bins_per_pixel} bins "
            f"per pixel: use at least {covering.n_det}, lower detector_bins_per_pixel, or "
            f"leave n_detectors unset"
        )
    return FanBeamGeometry(
        n, pixel_mm, params.views, sod, sdd, params.detector, params.n_detectors, spacing
    )


def geometry_facts(
    geometry: FanBeamGeometry | ParallelBeamGeometry,
) -> dict[str, float | int | str]:
    """JSON-ready description of the scan (mm, degrees)."""
    if isinstance(geometry, ParallelBeamGeometry):
        return {
            "beam": "parallel",
            "views": geometry.n_views,
            "arc_deg": geometry.arc_deg,
            "n_detectors": geometry.n_det,
            "detector_spacing_mm": geometry.det_spacing_mm,
            "image_size": geometry.image_size,
            "pixel_size_mm": geometry.pixel_size_mm,
        }
    return {
        "beam": "fan",
        "detector": geometry.detector,
        "views": geometry.n_views,
        "arc_deg": geometry.arc_deg,
        "source_to_isocentre_mm": geometry.source_to_isocentre_mm,
        "source_to_detector_mm": geometry.source_to_detector_mm,
        "n_detectors": geometry.n_det,
        "detector_spacing_mm": geometry.det_spacing_mm,
        "fan_angle_deg": 2.0 * math.degrees(geometry.max_fan_angle_rad),
        "image_size": geometry.image_size,
        "pixel_size_mm": geometry.pixel_size_mm,
    }


def simulate(
    padded_hu: npt.NDArray[np.float32],
    projector: Projector,
    i0: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """Forward-project HU slices and draw Poisson detector counts.

    Args:
        padded_hu: Square slices in HU, ``(B, N, N)``.
        projector: The fan-beam projector.
        i0: Incident photons per bin and view.
        rng: The noise generator (the only randomness; one per run, seeded from ``seed``, used
            on the slices in order, so the same volume and seed give the same noise).

    Returns:
        Noisy line integrals ``-log(counts / i0)``, ``(B, n_views, n_det)`` (dimensionless).
    """
    clean = projector.forward(hu_to_mu(padded_hu))
    return noisy_line_integrals(clean, i0, rng)
