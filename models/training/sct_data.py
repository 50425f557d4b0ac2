"""CBCT -> sCT training data: paired volumes, 2.5D slice and 3D patch sampling (torch-free).

No file access here (design rule 1): :mod:`workers.train_sct` reads the simulated CBCT, the CT
and the field-of-view mask of each pair, reorients them to the canonical frame
(:data:`CANONICAL`: axis 0 runs inferior, so ``array[k]`` is an axial slice) and hands in
:class:`SCTCase` arrays. The batch of step ``s`` is a pure function of ``(seed, s)``, so a
resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.networks.glfc import HU_SCALE

CANONICAL = "ILP"
"""Canonical frame of the network's arrays: axis 0 towards the patient's inferior, axis 1 left,
axis 2 posterior (the orientation of the OpenKBP CTs it was trained on); slices are axial."""

BODY_HU = -500.0
"""CT voxels above this are body (slices without body are not sampled)."""

AIR_HU = -1000.0
"""Fill value of padding (CBCT and CT) and of the CBCT outside its field of view."""


@dataclass(frozen=True)
class SCTCase:
    """One training pair on the canonical grid.

    Attributes:
        name: Case name (e.g. ``"pt_12"``).
        cbct: Simulated CBCT, HU, ``(K, H, W)`` int16 or float32.
        ct: Real CT (target), HU, same shape.
        fov: Boolean CBCT field-of-view mask, same shape.
    """

    name: str
    cbct: npt.NDArray[np.generic]
    ct: npt.NDArray[np.generic]
    fov: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        """Refuse arrays of different shapes or not 3D."""
        if self.cbct.ndim != 3 or self.cbct.shape != self.ct.shape != self.fov.shape:
            raise InputRejected(
                f"case {self.name}: CBCT {self.cbct.shape}, CT {self.ct.shape} and FOV "
                f"{self.fov.shape} must be the same 3D shape"
            )

    @cached_property
    def body_slices(self) -> npt.NDArray[np.int64]:
        """Indices of slices with at least 1 % body voxels inside the field of view."""
        body = (np.asarray(self.ct) > BODY_HU) & self.fov
        return np.flatnonzero(body.mean(axis=(1, 2)) >= 0.01)


def stack_slices(volume: npt.NDArray[np.generic], k: int, context: int) -> npt.NDArray[np.float32]:
    """Slices ``k - context .. k + context`` (edge slices repeated), ``(2 context + 1, H, W)``."""
    idx = np.clip(np.arange(k - context, k + context + 1), 0, volume.shape[0] - 1)
    return np.asarray(volume[idx], dtype=np.float32)


def fit_plane(
    array: npt.NDArray[np.float32], size: int, fill: float, offset: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Crop or pad the last two axes to ``size x size``.

    Args:
        array: ``(..., H, W)``.
        size: Output side.
        fill: Padding value.
        offset: ``(row, col)`` start of the crop in the (padded) array.
    """
    h, w = array.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pad = [(0, 0)] * (array.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
        array = np.pad(array, pad, constant_values=fill)
    r, c = offset
    return array[..., r : r + size, c : c + size]


def sample_batch(
    cases: Sequence[SCTCase],
    seed: int,
    step: int,
    batch: int,
    context: int,
    size: int = 128,
    flip: bool = True,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The training batch of ``step``: random cases, random body slices, random left-right flip.

    Args:
        cases: Training pairs.
        seed: Run seed.
        step: Step number (the batch is a pure function of ``seed`` and ``step``).
        batch: Slices per batch.
        context: Neighbouring slices per side (input channels ``2 context + 1``).
        size: Side of the square slices (cropped at a random position or padded with air).
        flip: Mirror left-right (axis 1 of the canonical slice) with probability 1/2.

    Returns:
        ``(x, y, mask)``: CBCT ``(B, 2 context + 1, size, size)``, CT ``(B, 1, size, size)``
        in network units (HU / ``HU_SCALE``), and the FOV mask ``(B, 1, size, size)`` (0/1).
    """
    rng = np.random.default_rng([seed, step, 0x5C7])
    samples = []
    for _ in range(batch):
        case, k = _draw_slice(cases, rng)
        x = stack_slices(case.cbct, k, context)
        y = np.asarray(case.ct[k : k + 1], dtype=np.float32)
        m = case.fov[k : k + 1].astype(np.float32)
        samples.append(_crop_and_flip(x, y, m, rng, size, flip))
    return _stacked(samples)


def _draw_slice(cases: Sequence[SCTCase], rng: np.random.Generator) -> tuple[SCTCase, int]:
    """A random case and a random body slice of it (its middle slice if it has none)."""
    case = cases[int(rng.integers(len(cases)))]
    slices = case.body_slices
    k = int(slices[rng.integers(len(slices))]) if slices.size else case.cbct.shape[0] // 2
    return case, k


def _crop_and_flip(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    m: npt.NDArray[np.float32],
    rng: np.random.Generator,
    size: int,
    flip: bool,
) -> tuple[npt.NDArray[np.float32], ...]:
    """The same random in-plane ``size`` crop (air/0 padded) and left-right flip of all three.

    ``x``, ``y``, ``m``: ``(C, H, W)`` stacks (channels or slices first); the flip mirrors
    axis 1 with probability 1/2 when ``flip``.
    """
    h, w = x.shape[-2:]
    offset = (int(rng.integers(max(h - size, 0) + 1)), int(rng.integers(max(w - size, 0) + 1)))
    x, y, m = (fit_plane(a, size, f, offset) for a, f in ((x, AIR_HU), (y, AIR_HU), (m, 0.0)))
    if flip and rng.uniform() < 0.5:
        x, y, m = x[:, ::-1], y[:, ::-1], m[:, ::-1]
    return x, y, m


def _stacked(
    samples: Sequence[tuple[Any, ...]],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(x, y, mask)`` batches of ``(x, y, mask)`` samples; x and y in network units."""
    xs, ys, ms = zip(*samples, strict=True)
    return (
        np.divide(np.stack(xs), HU_SCALE, dtype=np.float32),
        np.divide(np.stack(ys), HU_SCALE, dtype=np.float32),
        np.ascontiguousarray(np.stack(ms), dtype=np.float32),
    )


def sample_patches(
    cases: Sequence[SCTCase],
    seed: int,
    step: int,
    batch: int,
    depth: int,
    size: int = 128,
    flip: bool = True,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The 3D training batch of ``step``: ``depth`` consecutive slices about a random body slice.

    The 3D counterpart of :func:`sample_batch` (same case and slice draw, same in-plane crop
    and flip); a volume with fewer than ``depth`` slices is padded with air, masked out.

    Args:
        cases: Training pairs.
        seed: Run seed.
        step: Step number (the batch is a pure function of ``seed`` and ``step``).
        batch: Patches per batch.
        depth: Slices per patch.
        size: In-plane side of the patches.
        flip: Mirror left-right (axis 1 of the canonical slice) with probability 1/2.

    Returns:
        ``(x, y, mask)``: CBCT, CT (network units) and FOV mask (0/1), each
        ``(B, 1, depth, size, size)``.
    """
    rng = np.random.default_rng([seed, step, 0x5C73D])
    samples = []
    for _ in range(batch):
        case, k = _draw_slice(cases, rng)
        k_n = case.cbct.shape[0]
        start = int(np.clip(k - depth // 2, 0, max(k_n - depth, 0)))
        stop = min(start + depth, k_n)
        x = np.asarray(case.cbct[start:stop], dtype=np.float32)
        y = np.asarray(case.ct[start:stop], dtype=np.float32)
        m = case.fov[start:stop].astype(np.float32)
        if stop - start < depth:
            pad = ((0, depth - (stop - start)), (0, 0), (0, 0))
            x, y = (np.pad(a, pad, constant_values=AIR_HU) for a in (x, y))
            m = np.pad(m, pad, constant_values=0.0)
        samples.append(tuple(a[None] for a in _crop_and_flip(x, y, m, rng, size, flip)))
    return _stacked(samples)
