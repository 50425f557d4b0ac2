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
        balanced_foreground: Centre a foreground patch on a voxel of a label drawn uniformly
            among the labels present in the patch's case (nnU-Net's class-balanced
            oversampling), instead of a uniformly drawn foreground voxel, which favours the
            largest organs and rarely centres small ones.
        flip: Random flips along each axis of ``flip_axes`` (probability 0.5 each).
        flip_axes: Axes that may be flipped. In the canonical RAS frame axis 0 is right-left,
            1 posterior-anterior, 2 inferior-superior; anatomy is rarely mirrored along 1 or 2,
            so models of fixed anatomy keep only ``(0,)``.
        mirror_pairs: Label pairs swapped when axis 0 (left-right) is flipped, so a mirrored
            left parotid becomes a right parotid instead of a wrongly labelled one. A flip of
            axis 0 with lateral labels and no pairs teaches the network to confuse the sides.
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
    balanced_foreground: bool = False
    flip: bool = True
    flip_axes: tuple[int, ...] = (0, 1, 2)
    mirror_pairs: tuple[tuple[int, int], ...] = ()
    rot90: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    elastic_probability: float = 0.2
    elastic_sigma: float = 2.0
    elastic_grid: int = 3

    def __post_init__(self) -> None:
        """Validate the axes and pairs."""
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise InputRejected(f"flip_axes must be within 0, 1, 2, got {list(self.flip_axes)}")
        flat = [v for pair in self.mirror_pairs for v in pair]
        if any(len(pair) != 2 for pair in self.mirror_pairs) or len(set(flat)) != len(flat):
            raise InputRejected(f"mirror_pairs must be disjoint pairs, got {self.mirror_pairs}")
        if any(v < 1 or v == IGNORE for v in flat):
            raise InputRejected(f"mirror_pairs must name labels 1..n, got {self.mirror_pairs}")


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
    case: SegCase,
    patch: Sequence[int],
    rng: np.random.Generator,
    foreground: bool,
    balanced: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Crop one ``patch``-sized ``(image, label)`` pair, centred on foreground when asked.

    Args:
        case: The case.
        patch: Patch size ``(P0, P1, P2)`` voxels.
        rng: Generator.
        foreground: Centre on a random voxel with a label ``1..n`` (falls back to uniform when
            the case has none).
        balanced: With ``foreground``, first draw one of the labels present in the case
            uniformly, then a voxel of it.

    Returns:
        ``(image, label)``, each of shape ``patch``.
    """
    image, label = _pad_to(case.image, case.label, patch)
    shape = np.array(image.shape)
    size = np.array(patch)
    if foreground:
        if balanced:
            values = [int(v) for v in np.unique(label) if 0 < v != IGNORE]
            chosen = values[int(rng.integers(len(values)))] if values else None
            fg = np.flatnonzero(label == chosen) if chosen is not None else np.empty(0, int)
        else:
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
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], bool]:
    """Elastic deformation, flips, in-plane 90 degree rotation, intensity scale/shift.

    Rotations need a square in-plane patch (axes 0 and 1); otherwise they are skipped.

    Returns:
        ``(image, label, mirrored)``: ``mirrored`` tells that axis 0 was flipped and the
        ``mirror_pairs`` swapped (the caller swaps the case's ``present`` labels the same way).
    """
    mirrored = False
    if config.elastic_probability and rng.random() < config.elastic_probability:
        image, label = elastic(image, label, rng, config.elastic_sigma, config.elastic_grid)
    if config.flip:
        for axis in range(3):
            if rng.random() < 0.5 and axis in config.flip_axes:
                image, label = np.flip(image, axis), np.flip(label, axis)
                if axis == 0 and config.mirror_pairs:
                    label = swap_labels(label, config.mirror_pairs)
                    mirrored = True
    if config.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, label = np.rot90(image, k, (0, 1)), np.rot90(label, k, (0, 1))
    scale = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift)
    image = (image * scale + shift).astype(np.float32)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), mirrored


def swap_labels(
    label: npt.NDArray[np.uint8], pairs: Sequence[tuple[int, int]]
) -> npt.NDArray[np.uint8]:
    """Exchange the values of each pair (left/right organs after a left-right mirror)."""
    lut = np.arange(256, dtype=np.uint8)
    for a, b in pairs:
        lut[a], lut[b] = b, a
    return lut[label]


def present_mask(
    cases: Sequence[SegCase],
    n_labels: int,
    mirrored: Sequence[bool] = (),
    pairs: Sequence[tuple[int, int]] = (),
) -> npt.NDArray[np.bool_]:
    """``(B, n_labels + 1)`` bool: which classes each case annotates (background always).

    Items with ``mirrored[b]`` true have the ``pairs`` exchanged, as their labels were.
    """
    mask = np.ones((len(cases), n_labels + 1), dtype=bool)
    swap = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    for b, case in enumerate(cases):
        if case.present is not None:
            flipped = b < len(mirrored) and mirrored[b]
            mask[b, 1:] = False
            for value in case.present:
                mask[b, swap.get(value, value) if flipped else value] = True
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
    images, labels, chosen, mirrored = [], [], [], []
    for b in range(batch_size):
        rng = case_rng(seed, step, b)
        case = cases[int(rng.integers(len(cases)))]
        fg = rng.random() < config.foreground_fraction
        img, lab = sample_patch(case, patch, rng, fg, config.balanced_foreground)
        img, lab, flipped = augment(img, lab, rng, config)
        mirrored.append(flipped)
        images.append(img)
        labels.append(lab)
        chosen.append(case)
    return (
        np.stack(images)[:, None],
        np.stack(labels),
        present_mask(chosen, n_labels, mirrored, config.mirror_pairs),
    )
