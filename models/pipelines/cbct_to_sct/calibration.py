"""``hu-calibration``: one monotone piecewise-linear HU curve by quantile (histogram) matching.

The CBCT's body voxels (:func:`~.masks.body_mask` inside the estimated field of view) give
their HU quantiles at the reference's levels; the curve maps each CBCT quantile to the
reference CT quantile of the same level, linearly in between (:class:`HUMapping`), and goes on
linearly beyond the outermost knots. The reference (:class:`HUReference`) is a shipped table of
body-voxel HU quantiles of planning CTs of other patients (``models/weights/cbct_to_sct/
hu_reference.json``, from the OpenKBP training split); the planning CT of the patient being
converted is never used, so the result can be evaluated against it without leaking the target.

It corrects global HU shifts and scaling (scatter and the CBCT's own HU calibration) with one
curve for the whole volume; it cannot correct artefacts that vary in space (cupping, streaks,
truncation), and it assumes the patient's mix of tissues resembles the reference population
(head and neck for the shipped table).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.pipelines.cbct_to_sct.masks import HU_LIMITS

KNOT_RANGE_PCT: tuple[float, float] = (0.5, 99.5)
"""Quantile levels (%) kept as knots: the extreme minimum and maximum are too noisy."""

TAIL_PCT = 2.0
"""Beyond the outer knots the curve keeps the slope over this many percent of levels."""

SLOPE_LIMITS: tuple[float, float] = (0.25, 4.0)
"""Bounds of the extrapolation slopes (HU per HU)."""

MIN_BODY_VOXELS = 1000
"""Fewer body voxels than this and no histogram is matched."""


@dataclass(frozen=True)
class HUReference:
    """A reference CT HU distribution as quantiles of body voxels.

    Attributes:
        levels_pct: Quantile levels in percent, increasing from 0 to 100, shape ``(L,)``.
        quantiles_hu: HU at those levels, non-decreasing, shape ``(L,)``.
        body_threshold_hu: Body threshold the table was made with.
        sha256: sha256 of the JSON file (recorded with every calibrated result).
        provenance: Where it comes from (source, split, case count, mask), JSON-compatible;
            the case list itself stays in the file.
    """

    levels_pct: npt.NDArray[np.float64]
    quantiles_hu: npt.NDArray[np.float64]
    body_threshold_hu: float
    sha256: str
    provenance: dict[str, Any]


def load_reference(path: Path) -> HUReference:
    """Read and check a reference table written by ``voxelgate dataset hu-reference``.

    Raises:
        InputRejected: Missing or unreadable file, levels not spanning 0..100 in increasing
            order, quantiles decreasing or of another length.
    """
    try:
        raw = path.read_bytes()
        table = json.loads(raw)
        levels = np.asarray(table["levels_pct"], dtype=np.float64)
        quantiles = np.asarray(table["quantiles_hu"], dtype=np.float64)
        threshold = float(table["body_threshold_hu"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputRejected(f"hu-calibration reference table {path.name} unusable: {exc}") from None
    if (
        levels.ndim != 1
        or levels.shape != quantiles.shape
        or levels.size < 3
        or np.any(np.diff(levels) <= 0)
        or levels[0] != 0.0
        or levels[-1] != 100.0
        or np.any(np.diff(quantiles) < 0)
        or not np.all(np.isfinite(quantiles))
    ):
        raise InputRejected(
            f"hu-calibration reference table {path.name}: levels must increase from 0 to 100 "
            "and quantiles must be finite, non-decreasing and as many"
        )
    bulky = ("levels_pct", "quantiles_hu", "cases", "per_case_median_hu")
    provenance = {k: v for k, v in table.items() if k not in bulky}
    digest = hashlib.sha256(raw).hexdigest()
    return HUReference(levels, quantiles, threshold, digest, provenance)


@dataclass(frozen=True)
class HUMapping:
    """Monotone piecewise-linear HU -> HU curve, linear beyond its ends, clipped to HU_LIMITS.

    Attributes:
        knots_in: Input HU of the knots, strictly increasing, shape ``(N,)``.
        knots_out: Output HU of the knots, non-decreasing, shape ``(N,)``.
        slope_low: Slope (HU/HU) below the first knot.
        slope_high: Slope (HU/HU) above the last knot.
    """

    knots_in: npt.NDArray[np.float64]
    knots_out: npt.NDArray[np.float64]
    slope_low: float
    slope_high: float

    def apply(self, hu: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Map an array of any shape (HU) to float32 HU of the same shape, clipped."""
        x = np.asarray(hu, dtype=np.float32)
        out = np.interp(x, self.knots_in, self.knots_out).astype(np.float32)
        low, high = x < self.knots_in[0], x > self.knots_in[-1]
        out[low] = self.knots_out[0] + self.slope_low * (x[low] - self.knots_in[0])
        out[high] = self.knots_out[-1] + self.slope_high * (x[high] - self.knots_in[-1])
        return np.clip(out, *HU_LIMITS).astype(np.float32)


def _tail_slope(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    """Slope from the first to the last point of a tail; 1 when the input span is 0."""
    dx = float(x[-1] - x[0])
    slope = float(y[-1] - y[0]) / dx if dx > 0 else 1.0
    return float(np.clip(slope, *SLOPE_LIMITS))


def fit_mapping(
    source_hu: npt.NDArray[np.float64],
    reference_hu: npt.NDArray[np.float64],
    levels_pct: npt.NDArray[np.float64],
) -> HUMapping:
    """The curve sending each source quantile to the reference quantile of the same level.

    Args:
        source_hu: Source (CBCT) quantiles at ``levels_pct``, non-decreasing, shape ``(L,)``.
        reference_hu: Reference quantiles at the same levels, shape ``(L,)``.
        levels_pct: Levels (%) in increasing order, shape ``(L,)``.

    Returns:
        The mapping. Knots are the levels inside :data:`KNOT_RANGE_PCT`; equal source quantiles
        become one knot at the mean of their reference values (so the curve stays a function
        and monotone); the tail slopes span :data:`TAIL_PCT` of levels at each end.
    """
    keep = (levels_pct >= KNOT_RANGE_PCT[0]) & (levels_pct <= KNOT_RANGE_PCT[1])
    x, y, lv = source_hu[keep], reference_hu[keep], levels_pct[keep]
    knots_in, inverse = np.unique(x, return_inverse=True)
    knots_out = np.bincount(inverse, weights=y) / np.bincount(inverse)
    knots_out = np.maximum.accumulate(knots_out)
    low = lv <= lv[0] + TAIL_PCT
    high = lv >= lv[-1] - TAIL_PCT
    return HUMapping(
        knots_in=knots_in,
        knots_out=knots_out,
        slope_low=_tail_slope(x[low], y[low]),
        slope_high=_tail_slope(x[high], y[high]),
    )


def calibrate(
    cbct_hu: npt.NDArray[Any], body: npt.NDArray[np.bool_], reference: HUReference
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Map a whole CBCT with the curve matching its body voxels to ``reference``.

    Args:
        cbct_hu: CBCT in HU, shape ``(K, J, I)``.
        body: Its body voxels inside the field of view, boolean, same shape.
        reference: The reference distribution.

    Returns:
        ``(sct, facts)``: the mapped volume (float32 HU, same shape, clipped to
        :data:`~.masks.HU_LIMITS`) and facts (knots at a few levels, slopes, voxel count,
        the reference's sha256 and provenance).

    Raises:
        InputRejected: Fewer than :data:`MIN_BODY_VOXELS` body voxels.
    """
    n = int(body.sum())
    if n < MIN_BODY_VOXELS:
        raise InputRejected(
            f"hu-calibration needs at least {MIN_BODY_VOXELS} body voxels inside the CBCT field "
            f"of view, found {n}: is the CBCT in HU and the body threshold right?"
        )
    voxels = np.asarray(cbct_hu)[body].astype(np.float64)
    source = np.percentile(voxels, reference.levels_pct)
    mapping = fit_mapping(source, reference.quantiles_hu, reference.levels_pct)
    sct = mapping.apply(cbct_hu)
    shown = [1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0]
    at = [float(np.interp(p, reference.levels_pct, source)) for p in shown]
    facts = {
        "method": "quantile matching of body voxels to a reference CT distribution "
        "(monotone piecewise linear, linear extrapolation, whole volume)",
        "uses_planning_ct": False,
        "body_voxels": n,
        "knots": len(mapping.knots_in),
        "knot_levels_pct": list(KNOT_RANGE_PCT),
        "examples_cbct_to_sct_hu": [
            {
                "level_pct": p,
                "cbct_hu": round(a, 1),
                "sct_hu": round(float(mapping.apply(np.array([a]))[0]), 1),
            }
            for p, a in zip(shown, at, strict=True)
        ],
        "slope_low": round(mapping.slope_low, 4),
        "slope_high": round(mapping.slope_high, 4),
        "clip_hu": list(HU_LIMITS),
        "reference_sha256": reference.sha256,
        "reference_body_threshold_hu": reference.body_threshold_hu,
        "reference": reference.provenance,
    }
    return sct, facts
