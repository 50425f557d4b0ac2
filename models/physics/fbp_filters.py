"""Filtered backprojection pieces: filter names, ramp filter design, padding and view weights.

The filters act along the detector of a parallel-beam sinogram (conventions of
:mod:`models.physics.geometry`); frequencies are in cycles per detector bin, lengths in mm.
Used by :class:`~models.physics.projector.TorchParallelProjector` and checked by every backend.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.geometry import ParallelBeamGeometry

FilterName = Literal["ram-lak", "shepp-logan", "cosine", "hann"]
"""FBP filters: the ramp alone, or the ramp times a Shepp-Logan, cosine or Hann window."""

FILTER_NAMES: tuple[str, ...] = get_args(FilterName)


def check_filter_name(filter_name: str) -> FilterName:
    """Return ``filter_name`` if it is one of :data:`FILTER_NAMES`, else raise InputRejected."""
    if filter_name not in FILTER_NAMES:
        raise InputRejected(f"unknown FBP filter {filter_name!r}; choose one of {FILTER_NAMES}")
    return filter_name  # type: ignore[return-value]


def fbp_padded_length(n_det: int) -> int:
    """FFT length used by the FBP filter: the next power of two >= ``2 * n_det`` (>= 64)."""
    return max(64, 1 << math.ceil(math.log2(2 * n_det)))


def fbp_filter(
    n_det: int,
    filter_name: FilterName,
    cutoff: float = 0.5,
    equiangular_step_rad: float | None = None,
) -> npt.NDArray[np.float64]:
    """Frequency response of the FBP filter, for a real FFT of length :func:`fbp_padded_length`.

    The ramp is the Fourier transform of the band-limited spatial ramp kernel of Ramachandran
    and Lakshminarayanan (``h[0] = 1/4``, ``h[n] = -1 / (pi n)^2`` for odd ``n``, else 0), which
    keeps the DC response right. It is multiplied by a window of ``g = f / cutoff``, with ``f``
    the frequency in cycles per bin: ram-lak ``1``, Shepp-Logan ``sinc(g / 2)``, cosine
    ``cos(pi g / 2)``, Hann ``(1 + cos(pi g)) / 2``, and set to 0 above ``cutoff``. With the
    default cutoff (the detector's Nyquist frequency, 1/2) these are the textbook filters.

    Args:
        n_det: Number of detector bins.
        filter_name: One of :data:`FILTER_NAMES`.
        cutoff: Highest frequency passed (cycles per bin), in (0, 0.5].
        equiangular_step_rad: For an equiangular (curved) fan-beam detector, its angular pitch
            ``alpha`` (rad): the spatial kernel is then multiplied by ``(n alpha / sin(n alpha))^2``
            (Kak & Slaney, eq. 3.3.1) for the lags ``|n| < n_det`` a convolution over the
            detector uses. ``None`` (default): the plain ramp of a parallel/flat detector.

    Returns:
        Real response, shape ``(P // 2 + 1,)`` with ``P = fbp_padded_length(n_det)``; it acts
        on data sampled at unit spacing (divide by the bin spacing in mm for 1/mm).

    Raises:
        InputRejected: ``cutoff`` outside (0, 0.5].
    """
    if not 0.0 < cutoff <= 0.5:
        raise InputRejected(f"filter cutoff must be in (0, 0.5] cycles per bin, got {cutoff!r}")
    size = fbp_padded_length(n_det)
    k = np.arange(size)
    n = np.where(k <= size // 2, k, k - size).astype(np.float64)
    kernel = np.zeros(size)
    kernel[0] = 0.25
    odd = (np.abs(n) % 2) == 1
    kernel[odd] = -1.0 / (np.pi * n[odd]) ** 2
    if equiangular_step_rad is not None:
        angle = n * float(equiangular_step_rad)
        used = (np.abs(n) < n_det) & (n != 0)
        kernel[used] *= (angle[used] / np.sin(angle[used])) ** 2
    ramp = np.fft.rfft(kernel).real
    g = np.fft.rfftfreq(size) / cutoff
    window: npt.NDArray[np.float64]
    if filter_name == "ram-lak":
        window = np.ones_like(g)
    elif filter_name == "shepp-logan":
        window = np.sinc(g / 2.0)
    elif filter_name == "cosine":
        window = np.cos(np.pi * g / 2.0)
    else:
        window = 0.5 * (1.0 + np.cos(np.pi * g))
    window = np.where(g <= 1.0 + 1e-12, window, 0.0)
    return np.asarray(ramp * window, dtype=np.float64)


def fbp_cutoff(geometry: ParallelBeamGeometry) -> float:
    """FBP filter cutoff (cycles per bin): the lower of the detector and image Nyquist limits.

    With bins finer than pixels the ramp would otherwise amplify noise at frequencies the
    image grid cannot hold, which then aliases back as extra, whiter noise.

    Args:
        geometry: The scan geometry.

    Returns:
        ``0.5 * min(1, det_spacing_mm / pixel_size_mm)``.
    """
    return 0.5 * min(1.0, geometry.det_spacing_mm / geometry.pixel_size_mm)


def fbp_angular_weight(geometry: ParallelBeamGeometry) -> float:
    """Weight of one view in the backprojection sum of FBP.

    ``d_theta * min(1, pi / arc)``: ``pi / n_views`` for 180 and 360 degree scans (where every
    ray is measured once or twice), the plain ``d_theta`` for shorter (limited-angle) arcs.
    Arcs between 180 and 360 degrees get uniform weights, not Parker weights.

    Args:
        geometry: The scan geometry.

    Returns:
        The dimensionless weight.
    """
    arc = math.radians(geometry.arc_deg)
    return (arc / geometry.n_views) * min(1.0, math.pi / arc)
