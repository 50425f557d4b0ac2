"""The exact transpose of the parallel-beam Joseph projector, computed pixel by pixel (gathers).

The transpose of Joseph's method (:mod:`models.physics.joseph`) is naturally a scatter, and
torch's scatter (the backward kernel of ``grid_sample``) is about 3x slower than its gather.
For parallel beam with detector bins at least as wide as the pixels it can be written as a
gather instead. For view ``theta`` let ``m = max(|cos|, |sin|)``, ``w = pixel / m`` (the path
length per sampled line) and ``kappa = det_spacing / (pixel m) >= 1``. Ray ``j`` crosses the
sampled line of pixel ``p`` at a distance ``kappa |f - j|`` pixels from it, where
``f = t_p / det_spacing + (n_det - 1) / 2`` is the fractional bin of ``p`` and
``t_p = x cos + y sin`` (conventions of :mod:`models.physics.geometry`). Joseph's linear
interpolation weight is ``max(0, 1 - kappa |f - j|)``, non-zero only for ``j0 = floor(f)`` and
``j0 + 1`` since ``kappa >= 1``, so

    ``(A^T g)[p] = sum_views w * (w0 g[j0] + w1 g[j0 + 1])``,
    ``w0 = max(0, 1 - kappa fr)``, ``w1 = max(0, 1 - kappa (1 - fr))``, ``fr = f - j0``,

which is ``S * lerp(g, j0 + w1 / S)`` with ``S = w0 + w1``: one ``grid_sample`` gather per view
and pixel and a weighted sum over views. Same weights as the forward, so the pair stays
exactly adjoint (to rounding). The per-view coordinates and weights depend on the geometry
only; they are kept between calls while they fit in ``cache_mb``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from models.physics.geometry import ParallelBeamGeometry


def pixel_adjoint_applies(geometry: ParallelBeamGeometry, cache_mb: float) -> bool:
    """Whether the gather form is exact (bins at least as wide as pixels) and worth it.

    It pays off only when its per-view coordinates and weights are kept between calls
    (``8 N^2 n_views`` bytes in float32 within ``cache_mb``); recomputing them every call
    costs more than the scatter it replaces.
    """
    fits = 8.0 * geometry.image_size**2 * geometry.n_views <= cache_mb * 2**20
    return fits and geometry.det_spacing_mm >= geometry.pixel_size_mm * (1.0 - 1e-12)


class PixelDrivenAdjoint:
    """``A^T`` of the parallel-beam Joseph projector by gathers (see the module docstring).

    Args:
        geometry: A parallel-beam geometry with :func:`pixel_adjoint_applies`.
        device: Torch device.
        dtype: ``torch.float32`` or ``torch.float64``.
        memory_budget_mb: Rough bound on the temporaries of one chunk of views (MB).
        cache_mb: Keep coordinates and weights of all views if they take at most this (MB;
            ``8 N^2 n_views`` bytes in float32).
    """

    def __init__(
        self,
        geometry: ParallelBeamGeometry,
        device: torch.device,
        dtype: torch.dtype,
        memory_budget_mb: float = 64.0,
        cache_mb: float = 256.0,
    ) -> None:
        if geometry.det_spacing_mm < geometry.pixel_size_mm * (1.0 - 1e-12):
            raise ValueError("the pixel-driven adjoint needs bins at least as wide as pixels")
        self._geometry = geometry
        self._device, self._dtype = device, dtype
        theta = geometry.angles_rad
        major = np.maximum(np.abs(np.cos(theta)), np.abs(np.sin(theta)))
        self._cos = self._tensor(np.cos(theta) / geometry.det_spacing_mm)
        self._sin = self._tensor(np.sin(theta) / geometry.det_spacing_mm)
        self._kappa = self._tensor(geometry.det_spacing_mm / (geometry.pixel_size_mm * major))
        self._weight = self._tensor(geometry.pixel_size_mm / major)
        centres = self._tensor(geometry.pixel_centres_mm)
        n = geometry.image_size
        self._xs = centres[None, :].expand(n, n).reshape(-1)
        self._ys = centres[:, None].expand(n, n).reshape(-1)
        itemsize = 4 if dtype == torch.float32 else 8
        per_view = n * n * itemsize
        self._chunk = max(1, min(geometry.n_views, int(memory_budget_mb * 2**20 // (4 * per_view))))
        self._cache_ok = 2 * per_view * geometry.n_views <= cache_mb * 2**20
        self._cache: list[tuple[slice, torch.Tensor, torch.Tensor]] | None = None

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self._device, self._dtype)

    def _view_terms(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised gather coordinates ``(V, N^2)`` and weights ``w S`` for views ``part``."""
        n_det = self._geometry.n_det
        f = torch.addcmul(
            self._cos[part][:, None] * self._xs[None, :], self._sin[part][:, None], self._ys[None]
        ).add_((n_det - 1) / 2.0)
        j0 = torch.floor(f)
        fr = f.sub_(j0)
        kappa = self._kappa[part][:, None]
        w0 = torch.clamp_min(1.0 - kappa * fr, 0.0)
        w1 = torch.clamp_min(1.0 - kappa * (1.0 - fr), 0.0)
        total = w0 + w1
        phi = torch.where(total > 0, w1 / torch.where(total > 0, total, 1.0), 0.0)
        # padded index j0 + phi + 1 on a row of n_det + 2 -> [-1, 1] with align_corners
        coords = j0.add_(phi).add_(1.0).mul_(2.0 / (n_det + 1)).sub_(1.0)
        return coords, total.mul_(self._weight[part][:, None])

    def _terms(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        chunks = []
        for start in range(0, self._geometry.n_views, self._chunk):
            part = slice(start, start + self._chunk)
            coords, weights = self._view_terms(part)
            if self._cache_ok:
                chunks.append((part, coords, weights))
            yield part, coords, weights
        if self._cache_ok:
            self._cache = chunks

    def __call__(self, sinograms: torch.Tensor) -> torch.Tensor:
        """``(B, n_views, n_det)`` -> ``(B, N, N)``: the transpose of the Joseph forward."""
        batch = sinograms.shape[0]
        n = self._geometry.image_size
        rows = F.pad(sinograms.permute(1, 0, 2), (1, 1)).unsqueeze(2).contiguous()
        image = torch.zeros(batch, n * n, dtype=self._dtype, device=self._device)
        for part, coords, weights in self._terms():
            grid = coords.unsqueeze(1).unsqueeze(-1).expand(-1, -1, -1, 2)
            samples = F.grid_sample(
                rows[part], grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )  # (V, B, 1, N^2)
            image += samples[:, :, 0].mul_(weights[:, None, :]).sum(dim=0)
        return image.view(batch, n, n)
