"""Grids of the segment pipeline: source grid -> canonical frame -> network grid, and back.

Numpy only. The source is a :class:`~models.volume.Volume` (``array[k, j, i]``, affine
``(k, j, i, 1)`` -> LPS mm). Reorientation to the card's axis codes is a permutation and flips of
the array axes (lossless, like nibabel's ``as_closest_canonical``: an oblique volume stays
oblique in the world, its axes are only brought closest to the canonical directions). The
network grid then covers the same field of view with the card's spacing (edges aligned, i.e.
``align_corners=False``), and label maps come back to the source grid by nearest neighbour on
that same geometry, so the inversion is exact for voxels and never interpolates labels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.pipelines.segment.card import AXIS_CODES


@dataclass(frozen=True)
class Reorientation:
    """Source array axes -> canonical tensor axes.

    Attributes:
        perm: ``perm[t]`` = source axis (0 = k, 1 = j, 2 = i) that becomes canonical axis ``t``.
        flip: ``flip[t]``: canonical axis ``t`` runs opposite to that source axis.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def apply(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Source-ordered array ``(k, j, i)`` -> canonical order (a view; no resampling)."""
        out = array.transpose(self.perm)
        axes = tuple(t for t in range(3) if self.flip[t])
        return np.flip(out, axis=axes) if axes else out

    def invert(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Canonical-ordered array -> source order ``(k, j, i)``."""
        axes = tuple(t for t in range(3) if self.flip[t])
        out = np.flip(array, axis=axes) if axes else array
        return np.ascontiguousarray(out.transpose(np.argsort(self.perm)))

    def affine(
        self, affine: npt.NDArray[np.float64], shape: tuple[int, int, int]
    ) -> npt.NDArray[np.float64]:
        """Affine of the canonical array: canonical index ``(a0, a1, a2, 1)`` -> LPS mm.

        Args:
            affine: Source affine, ``(k, j, i, 1)`` -> LPS mm.
            shape: Source shape ``(k, j, i)``.
        """
        out = np.eye(4)
        origin_index = np.zeros(3)
        for t, (axis, flipped) in enumerate(zip(self.perm, self.flip, strict=True)):
            out[:3, t] = -affine[:3, axis] if flipped else affine[:3, axis]
            if flipped:
                origin_index[axis] = shape[axis] - 1
        out[:3, 3] = affine[:3, :3] @ origin_index + affine[:3, 3]
        return out


def reorientation(affine: npt.NDArray[np.float64], axcodes: str) -> Reorientation:
    """The permutation and flips bringing a source grid closest to ``axcodes``.

    Args:
        affine: Source affine, ``(k, j, i, 1)`` -> LPS mm.
        axcodes: Canonical frame, e.g. ``"RAS"``: the patient direction of tensor axes 0, 1, 2.

    Returns:
        The permutation that maximises the summed |cosine| between each canonical direction
        and its source axis (ties broken by the first permutation), and the flips.
    """
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    targets = [AXIS_CODES[c] for c in axcodes.upper()]
    best: tuple[float, tuple[int, ...]] = (-1.0, (0, 1, 2))
    for perm in itertools.permutations(range(3)):
        score = sum(abs(direction[w, perm[t]]) for t, (w, _) in enumerate(targets))
        if score > best[0] + 1e-9:
            best = (score, perm)
    perm = best[1]
    flip = tuple(
        bool(np.sign(direction[w, perm[t]]) != sign) for t, (w, sign) in enumerate(targets)
    )
    return Reorientation((perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2]))


def network_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, float, float]
) -> tuple[int, int, int]:
    """Shape of the network grid: ``round(n * spacing / target)`` per axis, at least 1.

    Args:
        shape: Canonical shape (voxels).
        spacing: Canonical spacing, mm.
        target: The card's spacing, mm.
    """
    out = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]
    return (out[0], out[1], out[2])


def grid_affine(
    affine: npt.NDArray[np.float64], shape: tuple[int, ...], new_shape: tuple[int, ...]
) -> npt.NDArray[np.float64]:
    """Affine of a grid covering the same field of view with ``new_shape`` voxels.

    Voxel edges are aligned (``align_corners=False``): new voxel ``m`` has its centre at old
    index ``(m + 0.5) * n / n' - 0.5``.
    """
    scale = np.array(shape, dtype=np.float64) / np.array(new_shape, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * scale
    out[:3, 3] = affine[:3, :3] @ (0.5 * scale - 0.5) + affine[:3, 3]
    return out


def nearest_back(
    labels: npt.NDArray[np.integer[Any]], shape: tuple[int, int, int]
) -> npt.NDArray[np.integer[Any]]:
    """Labels on the network grid -> the canonical grid of ``shape``, nearest neighbour.

    Each canonical voxel ``p`` takes the network voxel containing its centre,
    ``floor((p + 0.5) * n' / n)`` (the inverse of :func:`grid_affine`); values are copied,
    never interpolated.

    Args:
        labels: Integer labels, shape ``(n'0, n'1, n'2)`` (network grid).
        shape: Canonical shape ``(n0, n1, n2)``.

    Returns:
        Integer labels, shape ``shape``, same dtype.
    """
    index = [
        np.minimum(((np.arange(n) + 0.5) * (m / n)).astype(np.int64), m - 1)
        for n, m in zip(shape, labels.shape, strict=True)
    ]
    return labels[np.ix_(*index)]
