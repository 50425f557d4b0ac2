"""Segmentation training data: cases, patch sampling, augmentation (numpy/scipy, torch-free).

No file access here (design rule 1): :mod:`workers.train_segment` reads the NIfTI files,
reorients them to the card's canonical frame, resamples them to the training spacing and hands
in :class:`SegCase` arrays. Everything random is drawn from a generator seeded by
``(seed, step)``, so the batch of step ``s`` is a pure function of ``(seed, s)`` and a resumed
run sees the same data as an uninterrupted one.

Label conventions:

* ``0`` is background, ``1..n`` the labels, :data:`IGNORE` (255) an unlabelled voxel (sparse
  annotation, the 3D U-Net use case): it contributes to no loss term and no Dice.
* ``SegCase.present``: the labels actually annotated in that case (``None``: all of them). A
  label that is not present was not contoured, which is not the same as "background": the loss
  (:func:`models.training.segment_train.masked_dice_ce`) merges its probability into background
  and computes no Dice for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.errors import InputRejected

IGNORE = 255
"""Label value of an unlabelled voxel (sparse annotation)."""


@dataclass(frozen=True)
class SegCase:
    """One training or validation case in the canonical frame at the training spacing.

    Attributes:
        case_id: Name (for reports).
        image: ``(D0, D1, D2)`` float32, already normalised as the card says.
        label: ``(D0, D1, D2)`` uint8: ``0`` background, ``1..n`` labels, :data:`IGNORE`.
        present: Labels annotated in this case (``None``: all ``1..n``).
    """

    case_id: str
    image: npt.NDArray[np.float32]
    label: npt.NDArray[np.uint8]
    present: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AugmentConfig:
    """Patch sampling and augmentation settings.

    Attributes:
        foreground_fraction: Share of patches centred on a random foreground voxel (nnU-Net:
            1/3); the others are centred uniformly at random.
        flip: Random flips along each axis (probability 0.5 each).
        rot90: Random 90 degree rotations in the plane of axes 0 and 1 (in-plane).
        intensity_scale: Multiply the normalised image by ``U(1 - s, 1 + s)``.
        intensity_shift: Add ``U(-s, s)`` (normalised units).
        elastic_probability: Probability of an elastic deformation (3D U-Net paper: smooth
            random displacement field; here a coarse Gaussian grid upsampled with cubic
            splines; image order 1, labels order 0).
        elastic_sigma: Displacement standard deviation in voxels at the coarse grid points.
        elastic_grid: Coarse grid points per axis.
    """

    foreground_fraction: float = 1.0 / 3.0
    flip: bool = True
    rot90: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    elastic_probability: float = 0.2
    elastic_sigma: float = 2.0
    elastic_grid: int = 3


def case_rng(seed: int, step: int, index: int = 0) -> np.random.Generator:
    """The generator of batch item ``index`` at ``step`` (a pure function of its arguments)."""
    return np.random.default_rng([seed, step, index])


def validate_label(label: npt.NDArray[Any], n_labels: int, case_id: str) -> npt.NDArray[np.uint8]:
    """Check label values (``0..n``, :data:`IGNORE`) and return them as uint8.

    Raises:
        InputRejected: Non-integer values or values outside ``0..n`` and :data:`IGNORE`.
    """
    values = np.unique(label)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise InputRejected(f"{case_id}: label map has non-integer values")
    bad = [int(v) for v in values if not (0 <= v <= n_labels or v == IGNORE)]
    if bad:
        raise InputRejected(
            f"{case_id}: label values {bad[:10]} are not 0..{n_labels} or {IGNORE} (ignore)"
        )
    return label.astype(np.uint8)


def sparse_slices(
    label: npt.NDArray[np.uint8], every: int, axis: int = 2, offset: int = 0
) -> npt.NDArray[np.uint8]:
    """Keep every ``every``-th slice along ``axis`` annotated and mark the rest :data:`IGNORE`."""
    out = np.full_like(label, IGNORE)
    index: list[Any] = [slice(None)] * 3
    index[axis] = slice(offset, None, every)
    out[tuple(index)] = label[tuple(index)]
    return out


def _pad_to(
    image: npt.NDArray[np.float32], label: npt.NDArray[np.uint8], patch: Sequence[int]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Pad both arrays (image with its minimum, label with background) to at least ``patch``."""
    pad = [
        (max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
        for p, s in zip(patch, image.shape, strict=True)
    ]
    if not any(a or b for a, b in pad):
        return image, label
    return (
        np.pad(image, pad, constant_values=float(image.min())),
        np.pad(label, pad, constant_values=0),
    )


def sample_patch(
    case: SegCase, patch: Sequence[int], rng: np.random.Generator, foreground: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Crop one ``patch``-sized ``(image, label)`` pair, centred on foreground when asked.

    Args:
        case: The case.
        patch: Patch size ``(P0, P1, P2)`` voxels.
        rng: Generator.
        foreground: Centre on a random voxel with a label ``1..n`` (falls back to uniform when
            the case has none).

    Returns:
        ``(image, label)``, each of shape ``patch``.
    """
    image, label = _pad_to(case.image, case.label, patch)
    shape = np.array(image.shape)
    size = np.array(patch)
    if foreground:
        fg = np.flatnonzero((label > 0) & (label != IGNORE))
        if fg.size:
            centre = np.array(np.unravel_index(fg[rng.integers(fg.size)], label.shape))
            start = np.clip(centre - size // 2, 0, shape - size)
        else:
            foreground = False
    if not foreground:
        start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, size, strict=True)])
    sl = tuple(slice(int(a), int(a + p)) for a, p in zip(start, size, strict=True))
    return image[sl].copy(), label[sl].copy()


def elastic(
    image: npt.NDArray[np.float32],
    label: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    sigma: float,
    grid: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Smooth random elastic deformation (3D U-Net paper).

    Coarse Gaussian displacements (voxels) upsampled by cubic splines; image resampled linearly
    (order 1, edge values outside), labels by nearest neighbour (order 0).
    """
    shape = image.shape
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coarse = rng.normal(0.0, sigma, (grid, grid, grid)).astype(np.float32)
        zoom = [s / grid for s in shape]
        field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[
            : shape[0], : shape[1], : shape[2]
        ]
        coords[axis] += field
    out_img = ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)
    out_lab = ndimage.map_coordinates(label, coords, order=0, mode="nearest").astype(np.uint8)
    return out_img, out_lab


def augment(
    image: npt.NDArray[np.float32],
    label: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    config: AugmentConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Elastic deformation, flips, in-plane 90 degree rotation, intensity scale/shift.

    Rotations need a square in-plane patch (axes 0 and 1); otherwise they are skipped.
    """
    if config.elastic_probability and rng.random() < config.elastic_probability:
        image, label = elastic(image, label, rng, config.elastic_sigma, config.elastic_grid)
    if config.flip:
        for axis in range(3):
            if rng.random() < 0.5:
                image, label = np.flip(image, axis), np.flip(label, axis)
    if config.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, label = np.rot90(image, k, (0, 1)), np.rot90(label, k, (0, 1))
    scale = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift)
    image = (image * scale + shift).astype(np.float32)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def present_mask(cases: Sequence[SegCase], n_labels: int) -> npt.NDArray[np.bool_]:
    """``(B, n_labels + 1)`` bool: which classes each case annotates (background always)."""
    mask = np.ones((len(cases), n_labels + 1), dtype=bool)
    for b, case in enumerate(cases):
        if case.present is not None:
            mask[b, 1:] = False
            for value in case.present:
                mask[b, value] = True
    return mask


def make_batch(
    cases: Sequence[SegCase],
    *,
    seed: int,
    step: int,
    batch_size: int,
    patch: Sequence[int],
    n_labels: int,
    config: AugmentConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The training batch of ``step`` (a pure function of ``seed`` and ``step``).

    Returns:
        ``images (B, 1, P0, P1, P2)`` float32, ``labels (B, P0, P1, P2)`` uint8 and the
        ``present (B, n_labels + 1)`` mask of the chosen cases.
    """
    if not cases:
        raise InputRejected("no training cases")
    images, labels, chosen = [], [], []
    for b in range(batch_size):
        rng = case_rng(seed, step, b)
        case = cases[int(rng.integers(len(cases)))]
        fg = rng.random() < config.foreground_fraction
        img, lab = sample_patch(case, patch, rng, fg)
        img, lab = augment(img, lab, rng, config)
        images.append(img)
        labels.append(lab)
        chosen.append(case)
    return (
        np.stack(images)[:, None],
        np.stack(labels),
        present_mask(chosen, n_labels),
    )
