"""Detector-domain physics of the CBCT simulation (numpy): beam hardening, scatter, noise, -log.

Every function takes and returns projection stacks shaped ``[projection, v, u]``: line
integrals ``p`` (dimensionless, mm x 1/mm) or intensities (photons per detector pixel).

The chain is :func:`beam_hardening` -> :func:`primary` -> :func:`kernel_scatter` ->
:func:`detect` (Poisson counts) -> :func:`log_transform`; the detector is cut for truncation
between scatter and detection, so scatter from anatomy outside a truncated detector still
reaches the pixels that remain.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

SHADOW_LINE_INTEGRAL = 0.1
"""Detector pixels whose line integral exceeds this (about 5 mm of water) form the object's
shadow."""

SPR_PERCENTILE = 90.0
"""The scatter-to-primary ratio is set behind the thickest part of the object: over the shadow
pixels whose line integral is at or above this percentile of the shadow's (where SPR is
conventionally measured, behind the centre of a phantom)."""

NOMINAL_I0 = 1e6
"""Incident intensity used when there is no noise (then only the ratio to it matters)."""

MIN_COUNTS = 1.0
"""Floor (photons) of the detected counts before the logarithm: a pixel that received no
photon reads as one, so ``-log`` stays finite (what a scanner's offset correction does)."""


def beam_hardening(p: npt.NDArray[np.float32], cupping: float) -> npt.NDArray[np.float32]:
    """Polynomial beam-hardening of line integrals: ``p - b p^2``.

    The polynomial is kept monotonic: beyond its maximum at ``p = 1 / (2 b)`` the value stays
    at ``1 / (4 b)``.

    Args:
        p: Line integrals, any shape.
        cupping: ``b`` >= 0 (0 returns ``p`` unchanged).

    Returns:
        Float32 line integrals, same shape.
    """
    if cupping == 0.0:
        return p
    capped = np.minimum(p, 1.0 / (2.0 * cupping))
    return (capped - cupping * capped * capped).astype(np.float32)


def primary(p: npt.NDArray[np.float32], i0: float) -> npt.NDArray[np.float64]:
    """Primary (unscattered) intensity ``I0 exp(-p)``, photons per pixel, float64."""
    return i0 * np.exp(-p.astype(np.float64))


def kernel_scatter(
    primary_counts: npt.NDArray[np.float64],
    p: npt.NDArray[np.float32],
    spr: float,
    sigma_px: float,
) -> tuple[npt.NDArray[np.float64], float]:
    """Scatter as a wide Gaussian of a scatter source in each projection, scaled to ``spr``.

    The scatter source is the amplitude ``P p`` of the primary ``P`` times its line integral
    ``p`` (the ``I ln(I0 / I)`` amplitude of kernel-based scatter estimation, Ohnesorge et al.
    1999): zero behind air, largest behind moderately thick anatomy. It is blurred in the
    detector plane by a Gaussian (standard deviation ``sigma_px`` pixels) and scaled by one
    factor for the whole scan so that total scatter / total primary behind the thickest part of
    the object (shadow pixels, ``p > SHADOW_LINE_INTEGRAL``, at or above the
    ``SPR_PERCENTILE`` percentile of their line integrals) equals ``spr``. Thinner paths get a
    lower ratio, as on a real scanner.

    Args:
        primary_counts: Primary intensity ``[projection, v, u]``.
        p: Line integrals of the same shape (after beam hardening).
        spr: Target scatter-to-primary ratio, >= 0.
        sigma_px: Kernel standard deviation in detector pixels, > 0.

    Returns:
        ``(scatter, achieved_spr)``: scatter intensity like ``primary_counts`` (all zero when
        ``spr`` is 0 or nothing casts a shadow), and the ratio it achieves over the whole
        shadow (lower than ``spr``).
    """
    scatter = np.zeros_like(primary_counts)
    shadow = p > SHADOW_LINE_INTEGRAL
    if spr == 0.0 or not shadow.any():
        return scatter, 0.0
    source = primary_counts * p
    for index in range(source.shape[0]):
        scatter[index] = ndimage.gaussian_filter(source[index], sigma_px, mode="constant")
    thick = p >= max(float(np.percentile(p[shadow], SPR_PERCENTILE)), SHADOW_LINE_INTEGRAL)
    total = float(scatter[thick].sum())
    if total <= 0.0:
        return np.zeros_like(primary_counts), 0.0
    scatter *= spr * float(primary_counts[thick].sum()) / total
    achieved = float(scatter[shadow].sum() / primary_counts[shadow].sum())
    return scatter, achieved


def detect(
    intensity: npt.NDArray[np.float64], noisy: bool, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Detected counts: Poisson draws of ``intensity`` when ``noisy``, else the intensity."""
    if not noisy:
        return intensity
    return rng.poisson(intensity).astype(np.float64)


def log_transform(
    counts: npt.NDArray[np.float64], i0: float, floor: float
) -> tuple[npt.NDArray[np.float32], float]:
    """Measured line integrals ``-log(max(counts, floor) / I0)``.

    Returns:
        ``(line_integrals, floored_fraction)``: float32 array like ``counts`` and the fraction
        of pixels that hit the floor (photon starvation).
    """
    floored = counts < floor
    p = -np.log(np.maximum(counts, floor) / i0)
    return p.astype(np.float32), float(floored.mean()) if floored.size else 0.0


def scatter_sigma_px(sigma_mm: float, pitch_mm: float) -> float:
    """Kernel width in detector pixels (at least a third of a pixel)."""
    return max(sigma_mm / pitch_mm, 1.0 / 3.0)


def no_noise_floor(i0: float) -> float:
    """The floor used without noise: ``I0 exp(-30)``, far below any body's transmission."""
    return i0 * math.exp(-30.0)


def edge_shadow(p: npt.NDArray[np.float32]) -> float:
    """Largest mean line integral of an edge column (first or last ``u``) over all projections.

    Above :data:`SHADOW_LINE_INTEGRAL` the patient's shadow reaches the detector's edge: the
    projections are truncated.
    """
    if p.size == 0:
        return 0.0
    return float(max(p[..., 0].mean(axis=-1).max(), p[..., -1].mean(axis=-1).max()))
