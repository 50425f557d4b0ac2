"""Joseph's ray-driven projector for arbitrary 2D rays, in torch, with its exact transpose.

Each ray is a line ``p + s d`` (point ``p`` in mm, unit direction ``d``) in the image frame of
:mod:`models.physics.geometry`. A ray whose direction is closer to the y axis
(``|d_y| >= |d_x|``) is sampled once per image row, otherwise once per column; on each row
(column) the image is linearly interpolated along the row (column) and the samples are summed
times the path length per row, ``pixel / |d_y|`` (``pixel / |d_x|``). This is Joseph's method
(ASTRA's ``linear`` kernel for parallel beam). Outside the square the image is zero.

On a row of normalised centre ``q`` the sample position along the row is affine in ``q``:
``a + b q`` (normalised so that -1 and 1 are the zero-padding elements one pixel outside the
image). The rays are therefore stored as ``(a, b, weight)`` per ray and the sampling reuses
the trick of :class:`~models.physics.projector.TorchParallelProjector`: one
:func:`torch.nn.functional.grid_sample` over all lines, and its native backward kernel for the
transpose, so ``<A x, y> = <x, A^T y>`` to rounding.

Shapes: images ``(B, N, N)`` tensors, ray values ``(B, R)`` with ``R`` the number of rays.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

# grid_sampler integer codes used by torch's native kernels.
_BILINEAR = 0
_ZERO_PADDING = 0


@dataclass(frozen=True)
class _RayGroup:
    """Rays sampled along the same image axis: rows (``vertical``) or columns."""

    vertical: bool
    index: torch.Tensor  # (K,) int64 positions in the flat ray array
    a: torch.Tensor  # (K,) normalised along-line position at q = 0
    b: torch.Tensor  # (K,) change of that position per unit of normalised q
    weight: torch.Tensor  # (K,) path length per line (mm)


class JosephRays:
    """Forward projection and exact transpose for a fixed set of rays through an N x N image.

    Args:
        image_size: Side N of the square image (pixels).
        pixel_size_mm: Pixel side (mm).
        points: A point on every ray (mm), shape ``(R, 2)``, ``(x, y)``.
        directions: Unit direction of every ray, shape ``(R, 2)``.
        device: Torch device.
        dtype: ``torch.float32`` or ``torch.float64``.
        memory_budget_mb: Rough bound on the temporaries of one chunk (MB).
        cache_mb: Keep the sampling grids of all rays between calls if they fit (MB; they
            take ``4 N R`` bytes in float32); 0 disables the cache.
    """

    def __init__(
        self,
        image_size: int,
        pixel_size_mm: float,
        points: npt.NDArray[np.float64],
        directions: npt.NDArray[np.float64],
        device: torch.device,
        dtype: torch.dtype,
        memory_budget_mb: float = 64.0,
        cache_mb: float = 256.0,
    ) -> None:
        self._n = image_size
        self._n_rays = points.shape[0]
        self._device, self._dtype = device, dtype
        self._budget_bytes = memory_budget_mb * 2**20
        self._cache_budget = cache_mb * 2**20
        self._cache: dict[int, list[tuple[slice, torch.Tensor]]] = {}
        self._cached = 0
        half_width = (image_size + 1) * pixel_size_mm / 2.0
        centres = (np.arange(image_size) - (image_size - 1) / 2.0) * pixel_size_mm
        self._q = self._tensor(centres / half_width)
        self._groups = self._make_groups(points, directions, pixel_size_mm, half_width)

    @property
    def n_rays(self) -> int:
        """Number of rays R."""
        return self._n_rays

    def _tensor(self, values: npt.ArrayLike) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self._device, self._dtype)

    def _make_groups(
        self,
        points: npt.NDArray[np.float64],
        directions: npt.NDArray[np.float64],
        pixel: float,
        half_width: float,
    ) -> list[_RayGroup]:
        px, py = points[:, 0], points[:, 1]
        dx, dy = directions[:, 0], directions[:, 1]
        vertical = np.abs(dy) >= np.abs(dx)
        groups = []
        for is_vertical in (True, False):
            idx = np.flatnonzero(vertical == is_vertical)
            if idx.size == 0:
                continue
            # along = position on the sampled axis, across = the line's own coordinate
            along, across = (px[idx], py[idx]) if is_vertical else (py[idx], px[idx])
            d_along, d_across = (dx[idx], dy[idx]) if is_vertical else (dy[idx], dx[idx])
            slope = d_along / d_across
            groups.append(
                _RayGroup(
                    vertical=is_vertical,
                    index=torch.as_tensor(idx, dtype=torch.int64, device=self._device),
                    a=self._tensor((along - across * slope) / half_width),
                    b=self._tensor(slope),
                    weight=self._tensor(pixel / np.abs(d_across)),
                )
            )
        return groups

    # ----------------------------------------------------------------- chunks

    def _chunk_size(self, group: _RayGroup, batch: int) -> int:
        itemsize = 4 if self._dtype == torch.float32 else 8
        per_ray = self._n * (3 + batch) * itemsize
        return max(1, min(int(self._budget_bytes // per_ray), group.index.numel()))

    def _grid(self, group: _RayGroup, part: slice, out: torch.Tensor | None) -> torch.Tensor:
        """``(N, 1, P, 2)`` grid of the rays ``group[part]``: x = ``a + q b``, y aliases x.

        On a source of height 1 the y coordinate maps to the only row whatever its value, so
        ``grid_sample`` is exact 1D linear interpolation along the line; aliasing y to x
        (stride 0) halves the grid's memory traffic.
        """
        a, b = group.a[part], group.b[part]
        if out is None or out.shape[1] < a.numel():
            out = torch.empty(self._n, a.numel(), dtype=self._dtype, device=self._device)
        coords = out[:, : a.numel()]
        torch.addcmul(a[None, :], self._q[:, None], b[None, :], out=coords)
        return coords.unsqueeze(1).unsqueeze(-1).expand(-1, -1, -1, 2)

    def _chunks(self, group: _RayGroup, batch: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(slice into the group, grid (N, 1, P, 2))`` per chunk of rays.

        Grids are kept between calls (iterative methods make thousands) while all of them fit
        in ``cache_mb``; otherwise they are recomputed into one reused buffer.
        """
        key = id(group)
        if key in self._cache:
            yield from self._cache[key]
            return
        size = self._chunk_size(group, batch)
        itemsize = 4 if self._dtype == torch.float32 else 8
        nbytes = self._n * group.index.numel() * itemsize
        cache = nbytes <= self._cache_budget - self._cached
        buffer = (
            None if cache else torch.empty(self._n, size, dtype=self._dtype, device=self._device)
        )
        chunks = []
        for start in range(0, group.index.numel(), size):
            part = slice(start, start + size)
            grid = self._grid(group, part, buffer)
            if cache:
                chunks.append((part, grid))
            yield part, grid
        if cache:
            self._cache[key] = chunks
            self._cached += nbytes

    @staticmethod
    def _lines(images: torch.Tensor, vertical: bool) -> torch.Tensor:
        """``(B, N, N)`` -> ``(L, B, 1, N + 2)``: rows or columns, zero-padded."""
        lines = images.permute(1, 0, 2) if vertical else images.permute(2, 0, 1)
        return F.pad(lines, (1, 1)).unsqueeze(2).contiguous()

    # ----------------------------------------------------------------- operators

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Line integrals of ``(B, N, N)`` images (1/mm) along every ray -> ``(B, R)``."""
        batch = images.shape[0]
        out = torch.zeros(batch, self._n_rays, dtype=self._dtype, device=self._device)
        for group in self._groups:
            source = self._lines(images, group.vertical)
            for part, grid in self._chunks(group, batch):
                samples = F.grid_sample(
                    source, grid, mode="bilinear", padding_mode="zeros", align_corners=True
                )  # (L, B, 1, P)
                rays = samples.sum(dim=0)[:, 0]
                rays.mul_(group.weight[part][None, :])
                out[:, group.index[part]] = rays
        return out

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """Exact transpose of :meth:`forward`: ``(B, R)`` -> ``(B, N, N)``."""
        batch, n = values.shape[0], self._n
        image = torch.zeros(batch, n, n, dtype=self._dtype, device=self._device)
        shape_only = torch.zeros(n, batch, 1, n + 2, dtype=self._dtype, device=self._device)
        for group in self._groups:
            for part, grid in self._chunks(group, batch):
                rays = values[:, group.index[part]] * group.weight[part][None, :]
                # a contiguous gradient: the backward kernel is slower on expanded ones
                grad = rays.reshape(1, batch, 1, -1).expand(n, -1, -1, -1).contiguous()
                grad_source, _ = torch.ops.aten.grid_sampler_2d_backward(
                    grad,
                    shape_only,
                    grid,
                    _BILINEAR,
                    _ZERO_PADDING,
                    True,
                    [True, False],
                )  # (L, B, 1, N + 2)
                lines = grad_source[:, :, 0, 1:-1]  # (L, B, N)
                image += lines.permute(1, 0, 2) if group.vertical else lines.permute(1, 2, 0)
        return image
