"""The RTK (itk-rtk, Apache-2.0) calls of the CBCT simulation: Joseph projection and FDK, on CPU.

Only this module imports ITK. Arrays cross the boundary as float32 numpy arrays: volumes
``[k, j, i]`` on the CT grid (ITK's ``image_from_array`` reads them with ``i`` fastest, as ITK's
``(x, y, z)`` index), projection stacks ``[projection, v, u]``. The CT grid is handed to RTK in the
RTK frame of :mod:`models.physics.cbct_geometry` through the ITK image's origin, spacing and
direction, so no voxel is resampled on the way in or out.
"""

from __future__ import annotations

from typing import Any

import itk
import numpy as np
import numpy.typing as npt
from itk import RTK as rtk  # noqa: N811 (the name RTK's own examples use)

from models.physics.cbct_geometry import Detector, rtk_grid
from models.physics.cbct_params import CBCTGeometry
from models.volume import Volume

ImageType = itk.Image[itk.F, 3]


def set_threads(threads: int | None) -> None:
    """Set ITK's process-wide default thread count (``None``: leave it as it is)."""
    if threads is not None:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))


def rtk_version() -> str:
    """The installed itk-rtk version, for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("itk-rtk")
    except PackageNotFoundError:  # pragma: no cover - itk imported from elsewhere
        return "unknown"


def circular_geometry(geometry: CBCTGeometry) -> Any:
    """RTK ThreeDCircularProjectionGeometry: ``n_projections`` gantry angles over 360 degrees."""
    rtk_geometry = rtk.ThreeDCircularProjectionGeometry.New()
    for index in range(geometry.n_projections):
        angle = 360.0 * index / geometry.n_projections
        rtk_geometry.AddProjection(geometry.sad_mm, geometry.sdd_mm, angle)
    return rtk_geometry


def volume_image(array: npt.NDArray[Any], volume: Volume, iso: npt.NDArray[np.float64]) -> Any:
    """An ITK float image of ``array`` (``[k, j, i]``) placed on the CT grid in the RTK frame."""
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    origin, spacing, direction = rtk_grid(volume, iso)
    image.SetOrigin([float(x) for x in origin])
    image.SetSpacing([float(x) for x in spacing])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return image


def projection_image(array: npt.NDArray[Any], detector: Detector) -> Any:
    """An ITK float image of a projection stack ``[projection, v, u]`` on ``detector``."""
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetOrigin([detector.u0_mm, detector.v0_mm, 0.0])
    image.SetSpacing([detector.pitch_mm, detector.pitch_mm, 1.0])
    return image


def forward_project(
    mu: npt.NDArray[np.float32],
    volume: Volume,
    iso: npt.NDArray[np.float64],
    geometry: CBCTGeometry,
    detector: Detector,
) -> npt.NDArray[np.float32]:
    """Line integrals of ``mu`` (1/mm, ``[k, j, i]`` on the CT grid) by RTK's Joseph projector.

    Returns:
        Dimensionless line integrals, shape ``(n_projections, n_v, n_u)``.
    """
    empty = np.zeros((geometry.n_projections, detector.n_v, detector.n_u), dtype=np.float32)
    projector = rtk.JosephForwardProjectionImageFilter[ImageType, ImageType].New()
    projector.SetInput(0, projection_image(empty, detector))
    projector.SetInput(1, volume_image(mu, volume, iso))
    projector.SetGeometry(circular_geometry(geometry))
    projector.Update()
    return np.asarray(itk.array_from_image(projector.GetOutput()), dtype=np.float32)


def fdk(
    line_integrals: npt.NDArray[np.float32],
    volume: Volume,
    iso: npt.NDArray[np.float64],
    geometry: CBCTGeometry,
    detector: Detector,
    truncation_correction: float = 0.0,
) -> npt.NDArray[np.float32]:
    """FDK reconstruction (RTK) of ``[projection, v, u]`` line integrals onto the CT grid.

    An offset detector first gets RTK's displaced-detector weights. The ramp filter is windowed
    by Hann at ``geometry.hann_cutoff`` x Nyquist when ``geometry.fdk_filter == "hann"``; rows are
    extended by ``truncation_correction`` x their width with RTK's mirrored extrapolation.

    Returns:
        Attenuation (1/mm), shape ``volume.shape`` (``[k, j, i]``).
    """
    rtk_geometry = circular_geometry(geometry)
    projections = projection_image(line_integrals, detector)
    if detector.displaced:
        weights = rtk.DisplacedDetectorImageFilter[ImageType].New()
        weights.SetInput(projections)
        weights.SetGeometry(rtk_geometry)
        weights.Update()
        projections = weights.GetOutput()
    target = volume_image(np.zeros(volume.shape, dtype=np.float32), volume, iso)
    recon = rtk.FDKConeBeamReconstructionFilter[ImageType].New()
    recon.SetInput(0, target)
    recon.SetInput(1, projections)
    recon.SetGeometry(rtk_geometry)
    cutoff = geometry.hann_cutoff if geometry.fdk_filter == "hann" else 0.0
    recon.GetRampFilter().SetHannCutFrequency(float(cutoff))
    recon.GetRampFilter().SetTruncationCorrection(float(truncation_correction))
    recon.Update()
    return np.asarray(itk.array_from_image(recon.GetOutput()), dtype=np.float32)
