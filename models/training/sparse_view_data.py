"""Training data for sparse-view CT post-processing: real CT slices, simulated fan-beam scans.

Everything here is computed from arrays handed in by the caller (no file access): the CT
volumes come from ../shared/data (openkbp head-and-neck planning CTs split by patient with the
challenge's ``splits.json``, plus other real CTs for training only), read by
:mod:`service.cli_train`.

Simulation (labelled simulated wherever it is used): each slice (HU) is converted to linear
attenuation (1/mm), forward-projected with a 360 degree equiangular fan-beam geometry of
clinical proportions (source-isocentre 595 mm, source-detector 1085.6 mm, larger when the slice
needs it; two detector bins per pixel at the isocentre), Poisson noise is drawn at ``i0``
photons per bin and view with a seed derived from ``(seed, step)``, and FBP (Ram-Lak)
reconstructs it. The student input has ``v`` views, the teacher input ``2 v`` (intermediate
views), and the target is the real slice itself (a clinical full-view, full-dose
reconstruction, resampled).

Slices are ``(N, N)`` arrays indexed ``[row (+y, posterior), col (+x, patient left)]`` of the
LPS frame, pixels square of ``pixel_size_mm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.errors import InputRejected
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.fan_projector import TorchFanProjector
from models.physics.lowdose import estimate_body_mask, hu_to_mu, mu_to_hu, noisy_line_integrals

AIR_HU = -1024.0
"""Padding value (HU) outside the slice."""

MAX_HU = 3071.0
"""Upper clip of the targets (HU)."""

CLINICAL_SOD_MM = 595.0
"""Source to isocentre distance of the simulated scanner (mm), as a common clinical CT."""

CLINICAL_SDD_MM = 1085.6
"""Source to detector distance of the simulated scanner (mm)."""


@dataclass(frozen=True)
class CTCase:
    """One patient's axial slices.

    Attributes:
        case_id: Identifier, e.g. ``"openkbp/train-pats/pt_1"``.
        slices_hu: ``(S, N, N)`` float32 HU, LPS rows/cols (see the module docstring).
        pixel_size_mm: Square pixel side (mm).
    """

    case_id: str
    slices_hu: npt.NDArray[np.float32]
    pixel_size_mm: float


def openkbp_split(
    splits: Mapping[str, object], exclude_flagged: bool = True
) -> tuple[list[str], list[str]]:
    """Patient-level split of openkbp from its ``splits.json`` content.

    Args:
        splits: The parsed JSON: ``train-pats`` and ``validation-pats`` lists of patient ids,
            ``qc_flags`` mapping ``"<split>/<id>"`` to a reason.
        exclude_flagged: Drop the QC-flagged patients (their labels, or FOV, are doubtful).

    Returns:
        ``(train, validation)`` as ``"<split>/<id>"`` strings, disjoint by construction.

    Raises:
        InputRejected: Missing lists, or a patient in both.
    """
    train, val = splits.get("train-pats"), splits.get("validation-pats")
    if not isinstance(train, list) or not isinstance(val, list):
        raise InputRejected("splits.json needs 'train-pats' and 'validation-pats' lists")
    if set(train) & set(val):
        raise InputRejected(f"patients in both splits: {sorted(set(train) & set(val))[:5]}")
    flags = splits.get("qc_flags") or {}
    flagged = set(flags) if exclude_flagged and isinstance(flags, dict) else set()
    keep_train = [f"train-pats/{p}" for p in train if f"train-pats/{p}" not in flagged]
    keep_val = [f"validation-pats/{p}" for p in val if f"validation-pats/{p}" not in flagged]
    return keep_train, keep_val


def axial_slices(
    volume_hu: npt.ArrayLike,
    pixel_size_mm: float,
    image_size: int,
    slice_stride: int = 1,
    min_body_fraction: float = 0.05,
) -> tuple[npt.NDArray[np.float32], float]:
    """Square axial slices of a volume, resampled to ``image_size``, empty ones dropped.

    Args:
        volume_hu: ``(X, Y, Z)`` HU with axes along L, P, S (x = patient left, y = posterior):
            slice ``k`` is ``volume[:, :, k].T`` (rows +y, cols +x).
        pixel_size_mm: In-plane spacing (mm), the same along x and y.
        image_size: Side of the output slices (pixels); the slice is padded with air to a
            square and resampled (linear), so the pixel becomes ``side * pixel / image_size``.
        slice_stride: Keep every ``slice_stride``-th slice.
        min_body_fraction: Drop slices whose body mask covers less of the image than this.

    Returns:
        ``(slices (S, image_size, image_size) float32 HU, pixel_size_mm of the output)``.
    """
    vol = np.asarray(volume_hu, dtype=np.float32)
    if vol.ndim != 3 or min(vol.shape) < 1 or image_size < 8:
        raise InputRejected(f"volume must be 3D and image_size >= 8, got {vol.shape}")
    side = max(vol.shape[0], vol.shape[1])
    out: list[npt.NDArray[np.float32]] = []
    for k in range(0, vol.shape[2], max(1, slice_stride)):
        axial = vol[:, :, k].T
        square = np.full((side, side), AIR_HU, dtype=np.float32)
        top, left = (side - axial.shape[0]) // 2, (side - axial.shape[1]) // 2
        square[top : top + axial.shape[0], left : left + axial.shape[1]] = axial
        if side != image_size:
            square = ndimage.zoom(square, image_size / side, order=1, mode="nearest")
            square = square[:image_size, :image_size]
        if estimate_body_mask(square).mean() >= min_body_fraction:
            out.append(np.clip(square, AIR_HU, MAX_HU).astype(np.float32))
    pixel = float(pixel_size_mm) * side / image_size
    if not out:
        return np.zeros((0, image_size, image_size), dtype=np.float32), pixel
    return np.stack(out), pixel


@dataclass(frozen=True)
class SimulationConfig:
    """How sparse-view scans are simulated.

    Attributes:
        views: Student view counts (over 360 degrees) sampled per batch.
        teacher_factor: The teacher's input has ``teacher_factor * views`` views.
        i0: Incident photons per detector bin and view (Poisson).
        bins_per_pixel: Detector bins per pixel width at the isocentre.
    """

    views: tuple[int, ...] = (18, 36, 60)
    teacher_factor: int = 2
    i0: float = 1e5
    bins_per_pixel: int = 2

    def __post_init__(self) -> None:
        """Validate the fields."""
        if not self.views or any(not 4 <= v <= 4096 for v in self.views):
            raise InputRejected(f"views must be in 4..4096, got {self.views}")
        if not 1 <= self.teacher_factor <= 16:
            raise InputRejected(f"teacher_factor must be in 1..16, got {self.teacher_factor}")
        if not 0 < self.i0 <= 1e12:
            raise InputRejected(f"i0 must be in (0, 1e12], got {self.i0}")


def fan_geometry(
    image_size: int, pixel_size_mm: float, views: int, bins_per_pixel: int = 2
) -> FanBeamGeometry:
    """The simulated 360 degree equiangular fan-beam scanner for an ``N x N`` slice."""
    reach = (image_size - 1) * pixel_size_mm / math.sqrt(2.0) + pixel_size_mm
    sod = max(CLINICAL_SOD_MM, 1.25 * reach)
    sdd = sod * CLINICAL_SDD_MM / CLINICAL_SOD_MM
    spacing = pixel_size_mm * (sdd / sod) / bins_per_pixel
    return FanBeamGeometry(image_size, pixel_size_mm, views, sod, sdd, detector_spacing_mm=spacing)


@dataclass
class SparseViewSimulator:
    """Simulates noisy sparse-view FBP images of slices; projectors are cached per geometry.

    Attributes:
        config: The :class:`SimulationConfig`.
        device: Torch device of the projectors (``"cpu"`` or ``"cuda"``).
    """

    config: SimulationConfig = field(default_factory=SimulationConfig)
    device: str = "cpu"
    _cache: dict[tuple[int, float, int], TorchFanProjector] = field(default_factory=dict)

    def projector(self, image_size: int, pixel_size_mm: float, views: int) -> TorchFanProjector:
        """The cached fan-beam projector of that slice size, pixel and view count."""
        key = (image_size, round(pixel_size_mm, 4), views)
        if key not in self._cache:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            geo = fan_geometry(image_size, pixel_size_mm, views, self.config.bins_per_pixel)
            self._cache[key] = TorchFanProjector(geo, self.device)
        return self._cache[key]

    def fbp(
        self, slices_hu: npt.NDArray[np.float32], pixel_size_mm: float, views: int, seed: int
    ) -> npt.NDArray[np.float32]:
        """FBP (HU) of a simulated noisy scan of ``(B, N, N)`` HU slices; same shape."""
        proj = self.projector(slices_hu.shape[-1], pixel_size_mm, views)
        clean = proj.forward(hu_to_mu(slices_hu))
        noisy = noisy_line_integrals(clean, self.config.i0, np.random.default_rng(seed))
        return mu_to_hu(proj.fbp(noisy))


@dataclass(frozen=True)
class Batch:
    """One training batch, numpy float32 in HU (network units are applied by the trainer).

    Attributes:
        student_hu: ``(B, C, C)`` FBP from ``views`` views.
        teacher_hu: ``(B, C, C)`` FBP from ``teacher_factor * views`` views.
        target_hu: ``(B, C, C)`` the real slices.
        views: Student view count of the batch.
        case_id: Patient the slices come from.
        body: ``(B, C, C)`` body mask of the targets (computed on the whole slice, dilated by
            2 pixels, then cropped): where the loss weighs fully.
    """

    student_hu: npt.NDArray[np.float32]
    teacher_hu: npt.NDArray[np.float32]
    target_hu: npt.NDArray[np.float32]
    views: int
    case_id: str
    body: npt.NDArray[np.bool_]


def make_batch(
    cases: Sequence[CTCase],
    simulator: SparseViewSimulator,
    *,
    seed: int,
    step: int,
    batch_size: int,
    crop: int,
) -> Batch:
    """The batch of training step ``step``: a pure function of ``(seed, step)`` and the cases.

    One patient and one view count per batch (one projector per batch); ``batch_size`` slices
    of that patient (with replacement when it has fewer), each cropped at a random position
    (the same for student, teacher and target) after simulating the whole slice.
    """
    if not cases:
        raise InputRejected("no training cases")
    rng = np.random.default_rng([seed, step])
    case = cases[int(rng.integers(len(cases)))]
    if case.slices_hu.shape[0] == 0:
        raise InputRejected(f"case {case.case_id} has no slices")
    views = int(rng.choice(np.asarray(simulator.config.views)))
    picks = rng.integers(case.slices_hu.shape[0], size=batch_size)
    slices = case.slices_hu[picks]
    noise_seed = int(rng.integers(2**31))
    student = simulator.fbp(slices, case.pixel_size_mm, views, noise_seed)
    teacher_views = views * simulator.config.teacher_factor
    teacher = simulator.fbp(slices, case.pixel_size_mm, teacher_views, noise_seed + 1)
    n = slices.shape[-1]
    c = min(crop, n)
    rows, cols = rng.integers(n - c + 1, size=batch_size), rng.integers(n - c + 1, size=batch_size)

    def cut(images: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        return np.stack(
            [im[r : r + c, q : q + c] for im, r, q in zip(images, rows, cols, strict=True)]
        ).astype(np.float32)

    body = ndimage.binary_dilation(
        estimate_body_mask(slices), structure=np.ones((1, 5, 5), dtype=bool)
    )
    return Batch(cut(student), cut(teacher), cut(slices), views, case.case_id, cut(body) > 0.5)


@dataclass(frozen=True)
class ValidationSet:
    """Fixed held-out slices and their simulated FBP inputs at every view count.

    Attributes:
        target_hu: ``(S, N, N)`` real slices of the validation patients.
        inputs_hu: view count -> ``(S, N, N)`` FBP inputs (fixed seeds).
        case_ids: Patient of every slice, length ``S``.
    """

    target_hu: npt.NDArray[np.float32]
    inputs_hu: dict[int, npt.NDArray[np.float32]]
    case_ids: list[str]


def make_validation_set(
    cases: Sequence[CTCase],
    simulator: SparseViewSimulator,
    slices_per_case: int = 2,
    seed: int = 12345,
) -> ValidationSet:
    """Evenly spaced slices of every validation case, simulated at each configured view count."""
    targets: list[npt.NDArray[np.float32]] = []
    inputs: dict[int, list[npt.NDArray[np.float32]]] = {v: [] for v in simulator.config.views}
    ids: list[str] = []
    for index, case in enumerate(cases):
        count = case.slices_hu.shape[0]
        if count == 0:
            continue
        picks = np.unique(np.linspace(0, count - 1, slices_per_case + 2)[1:-1].round().astype(int))
        slices = case.slices_hu[picks]
        targets.append(slices)
        ids += [case.case_id] * len(picks)
        for views in simulator.config.views:
            inputs[views].append(
                simulator.fbp(slices, case.pixel_size_mm, views, seed + 1000 * index + views)
            )
    if not targets:
        raise InputRejected("no validation slices")
    return ValidationSet(
        np.concatenate(targets), {v: np.concatenate(x) for v, x in inputs.items()}, ids
    )


HU_WINDOW = (-1000.0, 1000.0)
"""HU window of the validation PSNR (values clipped; data range 2000 HU)."""


def body_psnr(image_hu: npt.NDArray[np.float32], target_hu: npt.NDArray[np.float32]) -> float:
    """PSNR (dB) of one slice against its target in the target's body mask, window [-1000, 1000]."""
    mask = estimate_body_mask(target_hu)
    if not mask.any():
        mask = np.ones(target_hu.shape, dtype=bool)
    a = np.clip(image_hu.astype(np.float64), *HU_WINDOW)[mask]
    b = np.clip(target_hu.astype(np.float64), *HU_WINDOW)[mask]
    mse = max(float(np.mean((a - b) ** 2)), 1e-12)
    return 10.0 * math.log10((HU_WINDOW[1] - HU_WINDOW[0]) ** 2 / mse)
