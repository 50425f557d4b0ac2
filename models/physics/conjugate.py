"""Conjugate rays of full 360 degree scans (numpy only): the map, its checks, the rotation axis.

In a 360 degree scan every line through the object is measured twice, by two rays travelling in
opposite directions. Their line integrals are equal (same line) while their quantum noise is
independent (different photons), which is what sinogram flicking uses.

Conventions (those of :mod:`models.physics.geometry` and :mod:`models.physics.fan_geometry`):

* parallel beam: ray ``(theta, t)`` and ``(theta + pi, -t)``. With the rotation axis at
  detector coordinate ``c`` (bins, from the detector centre ``(n_det - 1) / 2``) the conjugate
  of bin ``j`` is bin ``n_det - 1 + 2 c - j``.
* fan beam: ray ``(beta, gamma)`` is the parallel ray ``theta = beta - gamma``,
  ``t = D sin gamma``, so its conjugate is ``(beta + pi - 2 gamma, -gamma)`` (the form
  ``beta + pi + 2 gamma`` found in the literature belongs to the opposite sign convention of
  ``gamma``). Bin ``-gamma_j`` is bin ``n_det - 1 - j`` exactly; the view is interpolated.

Views are equally spaced over ``[0, 360)`` degrees (end open), so the view axis is periodic.
Conjugate values are bilinear interpolations of the sinogram ``(n_views, n_det)`` (exact when
``n_views`` is even and ``2 c`` an integer, in parallel beam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.fan_geometry import FanBeamGeometry, Geometry

FULL_SCAN_TOLERANCE_DEG = 1e-6


def require_full_scan(arc_deg: float) -> None:
    """Refuse data that does not cover 360 degrees.

    Raises:
        InputRejected: ``arc_deg`` below 360.
    """
    if not float(arc_deg) >= 360.0 - FULL_SCAN_TOLERANCE_DEG:
        raise InputRejected(
            f"sinogram flicking needs a full 360 degree scan (every ray measured twice, by its "
            f"conjugate ray); this scan covers {float(arc_deg):g} degrees. Use plain FBP or an "
            f"image-domain denoiser for short or half scans"
        )


@dataclass(frozen=True)
class ConjugateMap:
    """Where the conjugate of every ray lies in the same sinogram, as bilinear taps.

    Attributes:
        shape: ``(n_views, n_det)`` of the sinograms it applies to.
        index: Flat indices of the 4 taps, shape ``(4, n_views, n_det)``.
        weight: Tap weights, shape ``(4, n_views, n_det)``, summing to 1 where valid.
        valid: Rays whose conjugate lies on the detector, shape ``(n_views, n_det)``.
        exact: All valid conjugates fall on measured rays (no interpolation).
    """

    shape: tuple[int, int]
    index: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]
    exact: bool

    def apply(self, sinogram: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Conjugate sinogram: value at ``[k, j]`` is the measurement of ray ``(k, j)``'s conjugate.

        Args:
            sinogram: ``(n_views, n_det)`` or ``(B, n_views, n_det)``.

        Returns:
            Same shape, float32; rays without a conjugate on the detector keep their own value.
        """
        arr = np.asarray(sinogram, dtype=np.float32)
        if arr.shape[-2:] != self.shape:
            raise InputRejected(f"sinogram shape {arr.shape} does not match the map {self.shape}")
        flat = arr.reshape(*arr.shape[:-2], -1)
        conj = np.zeros(arr.shape, dtype=np.float32)
        for tap in range(4):
            conj += self.weight[tap] * flat[..., self.index[tap]]
        return np.where(self.valid, conj, arr).astype(np.float32)


def _taps(
    view_pos: npt.NDArray[np.floating], bin_pos: npt.NDArray[np.floating], shape: tuple[int, int]
) -> ConjugateMap:
    """Bilinear taps at fractional (view, bin) positions; views wrap, bins stay on the detector."""
    n_views, n_det = shape
    v0 = np.floor(view_pos + 1e-9)
    wv = np.clip(view_pos - v0, 0.0, 1.0)
    wv[wv < 1e-9] = 0.0
    b0 = np.floor(bin_pos + 1e-9)
    wb = np.clip(bin_pos - b0, 0.0, 1.0)
    wb[wb < 1e-9] = 0.0
    valid = (bin_pos > -1e-9) & (bin_pos < n_det - 1 + 1e-9)
    k0 = np.mod(v0, n_views).astype(np.int64)
    k1 = np.mod(k0 + 1, n_views)
    j0 = np.clip(b0, 0, n_det - 1).astype(np.int64)
    j1 = np.clip(j0 + 1, 0, n_det - 1)
    index = np.stack([k0 * n_det + j0, k0 * n_det + j1, k1 * n_det + j0, k1 * n_det + j1])
    weight = np.stack([(1 - wv) * (1 - wb), (1 - wv) * wb, wv * (1 - wb), wv * wb])
    exact = bool(np.all((wv[valid] == 0.0) & (wb[valid] == 0.0)))
    return ConjugateMap(shape, index, weight.astype(np.float32), valid, exact)


def parallel_conjugate_map(
    n_views: int, n_det: int, centre_offset_bins: float = 0.0
) -> ConjugateMap:
    """Conjugate map of a 360 degree parallel-beam sinogram, ``(theta, t) ~ (theta + pi, -t)``.

    Args:
        n_views: Views equally spaced over ``[0, 360)`` degrees.
        n_det: Detector bins.
        centre_offset_bins: Rotation axis position from the detector centre (bins, +j).

    Returns:
        The map (exact for even ``n_views`` and integer ``2 * centre_offset_bins``).
    """
    if n_views < 2 or n_det < 2:
        raise InputRejected(f"sinogram of {n_views} x {n_det} is too small for conjugate rays")
    k, j = np.meshgrid(np.arange(n_views, dtype=np.float64), np.arange(n_det), indexing="ij")
    return _taps(k + n_views / 2.0, n_det - 1 + 2.0 * centre_offset_bins - j, (n_views, n_det))


def fan_conjugate_map(geometry: FanBeamGeometry) -> ConjugateMap:
    """Conjugate map of a 360 degree fan-beam sinogram, linear on the view axis.

    The conjugate of ``(beta, gamma)`` is ``(beta + pi - 2 gamma, -gamma)``.

    Raises:
        InputRejected: The scan is not 360 degrees.
    """
    require_full_scan(geometry.arc_deg)
    n_views, n_det = geometry.sinogram_shape
    step = 2.0 * math.pi / n_views
    shift = (math.pi - 2.0 * geometry.fan_angles_rad) / step  # views, per bin
    k, j = np.meshgrid(np.arange(n_views, dtype=np.float64), np.arange(n_det), indexing="ij")
    return _taps(k + shift[None, :], n_det - 1.0 - j, (n_views, n_det))


def conjugate_map(geometry: Geometry) -> ConjugateMap:
    """Conjugate map of a projector geometry (parallel or fan beam, centred detector).

    Raises:
        InputRejected: The scan is not 360 degrees.
    """
    require_full_scan(geometry.arc_deg)
    if isinstance(geometry, FanBeamGeometry):
        return fan_conjugate_map(geometry)
    return parallel_conjugate_map(geometry.n_views, geometry.n_det)


def estimate_centre_offset(sinogram: npt.ArrayLike, max_offset_bins: float | None = None) -> float:
    """Rotation-axis offset (bins from the detector centre) of a 360 degree parallel sinogram.

    Each view is compared with its conjugate view flipped about candidate axes on a half-bin
    grid (mean squared difference away from the detector ends); the best one is refined by a
    parabola through its neighbours.

    Args:
        sinogram: ``(n_views, n_det)`` line integrals, views over ``[0, 360)`` degrees.
        max_offset_bins: Search range (default a quarter of the detector).

    Returns:
        Offset in bins (+ towards higher bin indices).
    """
    sino = np.asarray(sinogram, dtype=np.float64)
    n_views, n_det = sino.shape
    limit = n_det / 4 if max_offset_bins is None else float(max_offset_bins)
    conj = parallel_conjugate_map(n_views, n_det).apply(sino)  # about the detector centre
    margin = math.ceil(2 * limit) + 1
    core = slice(margin, n_det - margin)
    if n_det - 2 * margin < 8:
        raise InputRejected(f"detector of {n_det} bins too small for an offset search of {limit}")
    shifts = np.arange(-int(2 * limit), int(2 * limit) + 1)  # s = 2 c, integer
    errors = []
    for s in shifts:
        rolled = np.roll(conj, int(s), axis=1)  # value at j: bin n - 1 + s - j
        errors.append(float(np.mean((sino[:, core] - rolled[:, core]) ** 2)))
    best = int(np.argmin(errors))
    s_best = float(shifts[best])
    if 0 < best < len(errors) - 1:
        e0, e1, e2 = errors[best - 1], errors[best], errors[best + 1]
        denom = e0 - 2 * e1 + e2
        if denom > 0:
            s_best += 0.5 * (e0 - e2) / denom
    return s_best / 2.0
