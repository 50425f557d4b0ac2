"""Projection data with its scan geometry: the sinogram input of the CT pipelines (numpy only).

A :class:`Sinogram` holds line integrals ``p = integral of mu dl`` (dimensionless; ``mu`` in
1/mm, path length in mm) of ``S`` slices, shape ``(S, n_views, n_det)`` indexed
``[slice, view, detector bin]``, already normalised to the conventions of
:mod:`models.physics.geometry` and :mod:`models.physics.fan_geometry`: views equally spaced over
``[0, arc)`` from +x towards +y, bin ``j`` at ``(j - (n_det - 1) / 2) * spacing`` (the rotation
axis on the detector centre). :func:`normalise_projections` turns what a scanner or a file holds
(counts, transmission or line integrals, a 360 degree scan that repeats its first view, a
clockwise rotation, an off-centre rotation axis) into that form and says what it did in
``Sinogram.meta`` ("provenance of the numbers"). The geometry description itself is
:class:`SinogramSpec`, the validated content of the geometry JSON that comes with the file.

The reconstructed image grid is the geometry's ``N x N`` square centred on the rotation axis;
its rows run along +y and columns along +x of the reconstruction frame, slices along +z at
``slice_spacing_mm``. Projection data carry no patient frame: the frame is the scanner's, and
the output volume of a pipeline says so (``meta["frame"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import InputRejected
from models.physics.conjugate import estimate_centre_offset
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.geometry import ParallelBeamGeometry

SINOGRAM_FORMAT = "voxelgate-sinogram/1"
"""Value of the ``format`` field that marks a geometry JSON."""

MAX_SINOGRAM_VALUES = 2_000_000_000
"""Largest number of sinogram samples accepted (8 GB as float32)."""

Geometry = ParallelBeamGeometry | FanBeamGeometry


class AngleRange(BaseModel):
    """Equally spaced view angles (degrees) of the data's rows.

    Attributes:
        start_deg: Angle of the first view; only 0 is supported (the image frame is the one
            the first view defines).
        stop_deg: End of the arc.
        endpoint: Whether the last view lies *at* ``stop_deg`` (a 360 degree scan that
            repeats its first view: that last view is dropped) instead of one step before it.
        direction: ``"counterclockwise"`` (from +x towards +y, this project's convention) or
            ``"clockwise"`` (the view order is reversed onto the convention).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_deg: float = Field(0.0, ge=-360.0, le=360.0)
    stop_deg: float = Field(360.0, gt=0.0, le=720.0)
    endpoint: bool = False
    direction: Literal["counterclockwise", "clockwise"] = "counterclockwise"

    @model_validator(mode="after")
    def _check(self) -> AngleRange:
        if self.start_deg != 0.0:
            raise ValueError(
                f"angles.start_deg must be 0 (got {self.start_deg}); rotate the data so the "
                "first row is the 0 degree view"
            )
        if self.stop_deg > 360.0:
            raise ValueError(f"angles.stop_deg must be <= 360, got {self.stop_deg}")
        return self


class SinogramSpec(BaseModel):
    """The geometry JSON that travels with a sinogram file (``format: voxelgate-sinogram/1``).

    Attributes:
        format: Must be :data:`SINOGRAM_FORMAT`.
        data: File name of the projection data, relative to the JSON (NumPy ``.npy``, TIFF,
            NIfTI); no folders above the JSON.
        axes: Order of the data array's axes: ``["views", "detectors"]`` for one slice or
            a permutation of ``["slices", "views", "detectors"]``.
        quantity: ``"counts"`` (detector readings; ``flat_field`` gives the unattenuated
            reading), ``"transmission"`` (I / I0 in (0, 1]) or ``"line_integrals"``
            (-ln(I / I0)).
        flat_field: Counts only: the unattenuated reading, a number or ``"edges"`` (per view,
            the median of the ``edge_bins`` outermost bins on both sides, which must see air).
        edge_bins: Bins per side used by ``flat_field="edges"``.
        zero_counts: Counts/transmission only: ``"reject"`` (default) refuses data with
            readings <= 0 (the logarithm is undefined); ``"clip"`` raises them to 1 count (or
            the smallest positive transmission) and reports how many were changed.
        beam: ``"parallel"`` or ``"fan"``.
        detector: Fan only: ``"equiangular"`` (curved) or ``"flat"``.
        angles: The views' angles (:class:`AngleRange`).
        views, detectors: Optional counts; when given they must match the data's shape.
        detector_spacing_mm: Bin pitch (mm; arc length at the detector on a curved one).
        centre_of_rotation: Bin index (0-based, fractional allowed) of the rotation axis'
            projection, ``"auto"`` (estimated from the conjugate views of a 360 degree
            parallel scan) or ``None`` (the detector centre).
        source_to_isocentre_mm, source_to_detector_mm: Fan only, mm.
        image_size: Side of the reconstructed square (pixels); default: the detector count
            (parallel) or what covers the fan's field of view.
        pixel_size_mm: Reconstructed pixel side (mm); default: the bin pitch at the isocentre.
        slice_spacing_mm: Distance between slices (mm), for the output volume.
        modality: ``"CT"`` (attenuation of X-rays: the output is HU with water at
            ``mu_water_per_mm``) or ``"OT"`` (other, e.g. neutrons: the output stays in 1/mm).
        mu_water_per_mm: Linear attenuation of water at the scan's effective energy (CT only).
        description: Free text kept in the provenance; must not hold patient data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["voxelgate-sinogram/1"]
    data: str = Field(min_length=1, max_length=255)
    axes: tuple[str, ...] = ("views", "detectors")
    quantity: Literal["counts", "transmission", "line_integrals"]
    flat_field: float | Literal["edges"] | None = None
    edge_bins: int = Field(16, ge=1, le=256)
    zero_counts: Literal["reject", "clip"] = "reject"
    beam: Literal["parallel", "fan"]
    detector: Literal["equiangular", "flat"] = "equiangular"
    angles: AngleRange = Field(default_factory=AngleRange)
    views: int | None = Field(None, ge=1)
    detectors: int | None = Field(None, ge=1)
    detector_spacing_mm: float = Field(1.0, gt=0.0, le=100.0)
    centre_of_rotation: float | Literal["auto"] | None = None
    source_to_isocentre_mm: float | None = Field(None, gt=0.0, le=20000.0)
    source_to_detector_mm: float | None = Field(None, gt=0.0, le=40000.0)
    image_size: int | None = Field(None, ge=8, le=4096)
    pixel_size_mm: float | None = Field(None, gt=0.0, le=100.0)
    slice_spacing_mm: float = Field(1.0, gt=0.0, le=100.0)
    modality: Literal["CT", "OT"] = "CT"
    mu_water_per_mm: float = Field(0.0192, gt=0.0, le=10.0)
    description: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _check(self) -> SinogramSpec:
        if sorted(self.axes) not in (["detectors", "views"], ["detectors", "slices", "views"]):
            raise ValueError(
                f"axes must be a permutation of ['views', 'detectors'] or of ['slices', "
                f"'views', 'detectors'], got {list(self.axes)}"
            )
        if self.quantity == "counts" and self.flat_field is None:
            raise ValueError("quantity 'counts' needs flat_field: a number or 'edges'")
        if isinstance(self.flat_field, float) and not 0 < self.flat_field < 1e12:
            raise ValueError(f"flat_field must be in (0, 1e12), got {self.flat_field}")
        if self.quantity != "counts" and self.flat_field is not None:
            raise ValueError(f"flat_field applies to quantity 'counts' only, not {self.quantity!r}")
        if self.beam == "fan":
            if self.source_to_isocentre_mm is None or self.source_to_detector_mm is None:
                raise ValueError(
                    "a fan beam needs source_to_isocentre_mm and source_to_detector_mm"
                )
            if self.centre_of_rotation == "auto":
                raise ValueError("centre_of_rotation 'auto' is for parallel beams only")
        elif self.source_to_isocentre_mm is not None or self.source_to_detector_mm is not None:
            raise ValueError("source distances apply to beam 'fan' only")
        if "/" in self.data.replace("\\", "/") or self.data in (".", ".."):
            raise ValueError(f"data must be a file name next to the JSON, got {self.data!r}")
        return self


@dataclass(frozen=True)
class Sinogram:
    """Line integrals of ``S`` slices with the geometry to reconstruct them.

    Attributes:
        data: ``(S, n_views, n_det)`` float32 line integrals (dimensionless), finite, in the
            project's conventions (see the module docstring).
        geometry: The scan (views over ``[0, arc)``, rotation axis at the detector centre) and
            the ``N x N`` image grid of the reconstruction.
        slice_spacing_mm: Distance between slices (mm).
        modality: ``"CT"`` (reconstructions are reported in HU) or ``"OT"`` (1/mm).
        mu_water_per_mm: Water attenuation used for HU (CT).
        meta: What normalisation did (quantity, flat field, views dropped, centre shift,
            clipped readings) and the file's description; no patient data.
    """

    data: npt.NDArray[np.float32]
    geometry: Geometry
    slice_spacing_mm: float = 1.0
    modality: str = "CT"
    mu_water_per_mm: float = 0.0192
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that data and geometry agree."""
        if self.data.ndim != 3:
            raise InputRejected(f"sinogram data must be (S, views, bins), got {self.data.shape}")
        if tuple(self.data.shape[1:]) != self.geometry.sinogram_shape:
            raise InputRejected(
                f"sinogram shape {self.data.shape[1:]} (views, bins) does not match the "
                f"geometry's {self.geometry.sinogram_shape}"
            )

    @property
    def n_slices(self) -> int:
        """Number of slices ``S``."""
        return int(self.data.shape[0])


def _to_svd(array: npt.NDArray[Any], axes: tuple[str, ...]) -> npt.NDArray[Any]:
    if array.ndim != len(axes):
        raise InputRejected(
            f"the data has {array.ndim} axes but the JSON's axes lists {len(axes)}: {list(axes)}"
        )
    names = list(axes)
    if "slices" not in names:
        array, names = array[None], ["slices", *names]
    return np.transpose(array, [names.index(a) for a in ("slices", "views", "detectors")])


def _line_integrals(raw: npt.NDArray[np.float64], spec: SinogramSpec) -> tuple[Any, dict[str, Any]]:
    facts: dict[str, Any] = {"quantity": spec.quantity}
    if spec.quantity == "line_integrals":
        return raw, facts
    if spec.quantity == "counts":
        if spec.flat_field == "edges":
            e = spec.edge_bins
            if 2 * e >= raw.shape[2]:
                raise InputRejected(f"edge_bins {e} leaves no bins inside a {raw.shape[2]}-bin row")
            edges = np.concatenate([raw[:, :, :e], raw[:, :, -e:]], axis=2)
            flat = np.median(edges, axis=2, keepdims=True)
            if np.any(flat <= 0):
                raise InputRejected("flat_field 'edges': some views have no positive edge reading")
            facts["flat_field"] = f"edges: median of {e} outer bins per side, per view"
            facts["flat_field_median"] = float(np.median(flat))
        else:
            assert isinstance(spec.flat_field, float)
            flat = np.asarray(spec.flat_field)
            facts["flat_field"] = float(spec.flat_field)
        transmission = raw / flat
        floor = 1.0 / flat
    else:
        transmission, floor = raw, None
    bad = transmission <= 0
    if bad.any():
        count = int(bad.sum())
        if spec.zero_counts == "reject":
            raise InputRejected(
                f"{count} readings are <= 0 ({100 * count / bad.size:.3g} %): the logarithm is "
                "undefined; fix the data or set zero_counts: 'clip' in the geometry JSON"
            )
        positive = transmission[~bad]
        low = floor if floor is not None else (positive.min() if positive.size else 1e-6)
        transmission = np.where(bad, low, transmission)
        facts["clipped_readings"] = count
    else:
        facts["clipped_readings"] = 0
    return -np.log(transmission), facts


def _shift_bins(data: npt.NDArray[np.float64], shift: float) -> npt.NDArray[np.float64]:
    """Move every row by ``shift`` bins (linear interpolation, edge values held)."""
    n = data.shape[-1]
    src = np.arange(n, dtype=np.float64) - shift
    lo = np.clip(np.floor(src).astype(int), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    w = np.clip(src - np.floor(src), 0.0, 1.0)
    w = np.where(src <= 0, 0.0, np.where(src >= n - 1, 1.0, w))
    lo = np.where(src >= n - 1, n - 1, lo)
    return data[..., lo] * (1.0 - w) + data[..., hi] * w


def _geometry(spec: SinogramSpec, n_views: int, n_det: int, arc: float) -> Geometry:
    spacing = spec.detector_spacing_mm
    if spec.beam == "parallel":
        pixel = spec.pixel_size_mm or spacing
        size = spec.image_size or max(8, math.floor(n_det * spacing / pixel))
        return ParallelBeamGeometry(size, pixel, n_views, n_det, spacing, arc)
    assert spec.source_to_isocentre_mm is not None
    assert spec.source_to_detector_mm is not None
    sod, sdd = spec.source_to_isocentre_mm, spec.source_to_detector_mm
    pixel = spec.pixel_size_mm or spacing * sod / sdd
    if spec.image_size is None:
        half_fan = (n_det - 1) / 2 * spacing / sdd  # radians (equiangular) or tan (flat)
        fov = sod * math.sin(half_fan if spec.detector == "equiangular" else math.atan(half_fan))
        size = max(8, math.floor(2 * fov / pixel / math.sqrt(2.0)))
    else:
        size = spec.image_size
    return FanBeamGeometry(
        size,
        pixel,
        n_views,
        sod,
        sdd,
        detector=spec.detector,
        n_detectors=n_det,
        detector_spacing_mm=spacing,
        arc_deg=arc,
    )


def normalise_projections(raw: npt.ArrayLike, spec: SinogramSpec) -> Sinogram:
    """Turn the file's array into a :class:`Sinogram` in this project's conventions.

    Args:
        raw: The data array, axes as ``spec.axes`` says.
        spec: The validated geometry JSON.

    Returns:
        The sinogram; ``meta`` says what was converted, dropped, reordered and shifted.

    Raises:
        InputRejected: Shape that doesn't match the JSON, non-finite values, readings <= 0
            (unless ``zero_counts="clip"``), a geometry that cannot be built.
    """
    array = np.asarray(raw)
    if array.size == 0 or array.size > MAX_SINOGRAM_VALUES:
        raise InputRejected(f"sinogram has {array.size} values; 1..{MAX_SINOGRAM_VALUES} accepted")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputRejected(f"sinogram data must be real numbers, got dtype {array.dtype}")
    data = _to_svd(array.astype(np.float64), spec.axes)
    _, v, d = data.shape
    if spec.views is not None and spec.views != v:
        raise InputRejected(f"the JSON says views={spec.views} but the data has {v} views")
    if spec.detectors is not None and spec.detectors != d:
        raise InputRejected(f"the JSON says detectors={spec.detectors} but the data has {d} bins")
    if v < 2 or d < 8:
        raise InputRejected(f"need at least 2 views and 8 detector bins, got {v} x {d}")
    finite = np.isfinite(data)
    if not finite.all():
        raise InputRejected(f"sinogram holds {int((~finite).sum())} NaN or infinite values")
    data, meta = _line_integrals(data, spec)
    angles = spec.angles
    if angles.endpoint:
        data, v = data[:, :-1], v - 1  # the last view repeats the first (start + stop)
        meta["dropped_last_view"] = True
    if angles.direction == "clockwise":
        if angles.stop_deg != 360.0:
            raise InputRejected("clockwise short scans are not supported; give a 360 degree scan")
        data = data[:, (-np.arange(v)) % v]  # view at -k * step is the view at (v - k) * step
        meta["views_reordered"] = "clockwise -> counterclockwise"
    centre = spec.centre_of_rotation
    shift = 0.0
    if centre == "auto":
        if angles.stop_deg != 360.0:
            raise InputRejected("centre_of_rotation 'auto' needs a 360 degree parallel scan")
        offset = float(np.median([estimate_centre_offset(sl, d / 8) for sl in data]))
        shift = -offset
        meta["centre_of_rotation"] = f"auto: {(d - 1) / 2 + offset:.2f} (bin index)"
    elif centre is not None:
        shift = (d - 1) / 2 - float(centre)
        meta["centre_of_rotation"] = f"{float(centre):.2f} (bin index, from the JSON)"
    if abs(shift) > d / 4:
        raise InputRejected(f"rotation axis {shift:+.1f} bins off centre: more than a quarter")
    if shift:
        data = _shift_bins(data, shift)
        meta["centre_shift_bins"] = round(shift, 3)
    geometry = _geometry(spec, v, d, float(angles.stop_deg))
    if spec.description:
        meta["description"] = spec.description
    return Sinogram(
        data.astype(np.float32),
        geometry,
        spec.slice_spacing_mm,
        spec.modality,
        spec.mu_water_per_mm,
        meta,
    )
