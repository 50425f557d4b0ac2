"""Fan-beam projector in torch: Joseph forward projection, exact adjoint and fan-beam FBP.

Conventions (source angle, fan angle, detector coordinates) are those of
:mod:`models.physics.fan_geometry`; shapes and units those of
:mod:`models.physics.projector` (images ``(N, N)``/``(B, N, N)`` in 1/mm, sinograms
``(n_views, n_det)``/``(B, n_views, n_det)`` of line integrals). CPU and CUDA run the same code.

FBP (Kak & Slaney, ch. 3.4; Parker 1982 for short scans):

1. pre-weighting by ``cos(gamma)`` (flat: ``D / sqrt(D^2 + s^2)`` with ``s`` the bin
   coordinate at the isocentre; equiangular: ``D cos(gamma)``);
2. redundancy weights: 1/2 on a full 360 degree scan (every ray is measured twice), Parker
   weights on a short scan (arc >= 180 degrees + the full fan angle; smaller arcs are refused);
3. ramp filtering (times the Shepp-Logan, cosine or Hann window) along the detector, in ``s``
   for the flat detector and in ``gamma`` with the ``(gamma / sin gamma)^2`` kernel for the
   curved one;
4. pixel-driven backprojection weighted by ``1 / U^2`` (flat, ``U`` = distance from the source
   to the pixel along the central ray over ``D``) or ``1 / L^2`` (equiangular, ``L`` = distance
   from the source to the pixel), times the angular step.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.errors import InputRejected
from models.physics.arrays import FloatArray, as_image_batch, as_sinogram_batch
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.fbp_filters import (
    FilterName,
    check_filter_name,
    fbp_filter,
    fbp_padded_length,
)
from models.physics.joseph import JosephRays
from models.physics.projector import _resolve_device, _torch_threads


def parker_weights(geometry: FanBeamGeometry) -> npt.NDArray[np.float64]:
    """Redundancy weights of every ray for FBP, shape ``(n_views, n_det)``.

    A full 360 degree scan gets 1/2 everywhere. A short scan of arc ``pi + 2 delta`` with
    ``delta >= max|gamma|`` gets Parker's weights, generalised to over-scans (Wesarg et al.
    2002), written for this module's conjugate ray ``(beta + pi - 2 gamma, -gamma)``:
    ``sin^2(pi/4 beta / (delta + gamma))`` on ``[0, 2 delta + 2 gamma]``, 1 up to
    ``pi + 2 gamma``, ``sin^2(pi/4 (pi + 2 delta - beta) / (delta - gamma))`` to the end; the two
    measurements of a ray then add up to 1.

    Args:
        geometry: The fan-beam geometry.

    Returns:
        Weights in [0, 1].

    Raises:
        InputRejected: The arc is shorter than a short scan (``geometry.short_scan_arc_deg``).
    """
    if geometry.arc_deg >= 360.0:
        return np.full(geometry.sinogram_shape, 0.5)
    if geometry.arc_deg < geometry.short_scan_arc_deg - 1e-9:
        raise InputRejected(
            f"fan-beam FBP needs an arc of at least 180 degrees + the fan angle "
            f"({geometry.short_scan_arc_deg:.1f} degrees), got {geometry.arc_deg}; use an "
            f"iterative method for limited-angle data"
        )
    delta = (math.radians(geometry.arc_deg) - math.pi) / 2.0
    beta = geometry.angles_rad[:, None]
    gamma = geometry.fan_angles_rad[None, :]
    rise = np.clip(beta / np.maximum(delta + gamma, 1e-12), 0.0, 2.0)
    fall = np.clip((math.pi + 2 * delta - beta) / np.maximum(delta - gamma, 1e-12), 0.0, 2.0)
    weights = np.ones(geometry.sinogram_shape)
    up = beta < 2 * delta + 2 * gamma
    down = beta > math.pi + 2 * gamma
    weights = np.where(up, np.sin(math.pi / 4 * rise) ** 2, weights)
    return np.where(down, np.sin(math.pi / 4 * fall) ** 2, weights)


class TorchFanProjector:
    """Fan-beam :class:`~models.physics.projector.Projector` in torch (CPU or CUDA).

    Forward: Joseph's method along every source-to-bin ray (:class:`JosephRays`, the same
    discretisation as :class:`~models.physics.projector.TorchParallelProjector`); adjoint: its
    exact transpose. FBP: see the module docstring.

    Args:
        geometry: The fan-beam geometry.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` etc.).
        num_threads: Torch intra-op threads during calls, or ``None`` (leave torch's setting).
        dtype: ``"float32"`` (default) or ``"float64"``.
        memory_budget_mb: Rough bound on the temporaries of one chunk (MB).

    Raises:
        InputRejected: Wrong geometry type, unknown or unavailable device, bad options.
    """

    def __init__(
        self,
        geometry: FanBeamGeometry,
        device: str | torch.device = "cpu",
        *,
        num_threads: int | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        memory_budget_mb: float = 64.0,
    ) -> None:
        if not isinstance(geometry, FanBeamGeometry):
            raise InputRejected(f"geometry must be a FanBeamGeometry, got {type(geometry)}")
        if dtype not in ("float32", "float64"):
            raise InputRejected(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise InputRejected(f"num_threads must be a positive integer, got {num_threads!r}")
        if not memory_budget_mb > 0:
            raise InputRejected(f"memory_budget_mb must be > 0, got {memory_budget_mb!r}")
        self._geometry = geometry
        self._device = _resolve_device(device)
        self._np_dtype = np.dtype(dtype)
        self._dtype = torch.float32 if dtype == "float32" else torch.float64
        self._num_threads = num_threads
        self._budget_bytes = float(memory_budget_mb) * 2**20
        sources, directions = geometry.rays()
        points = np.broadcast_to(sources[:, None, :], directions.shape).reshape(-1, 2)
        self._rays = JosephRays(
            geometry.image_size,
            geometry.pixel_size_mm,
            points,
            directions.reshape(-1, 2),
            self._device,
            self._dtype,
            memory_budget_mb,
        )

    @property
    def geometry(self) -> FanBeamGeometry:
        """The scan geometry."""
        return self._geometry

    @property
    def device(self) -> torch.device:
        """The torch device computations run on."""
        return self._device

    def forward(self, image: npt.ArrayLike) -> FloatArray:
        """Project images of linear attenuation.

        Args:
            image: Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``.

        Returns:
            Line integrals, shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.
        """
        batch, batched = as_image_batch(image, self._geometry, self._np_dtype)
        with _torch_threads(self._num_threads), torch.inference_mode():
            flat = self._rays.forward(torch.from_numpy(batch).to(self._device))
            result = flat.view(batch.shape[0], *self._geometry.sinogram_shape)
        return self._to_numpy(result, batched)

    def adjoint(self, sinogram: npt.ArrayLike) -> FloatArray:
        """Apply the exact transpose of :meth:`forward`.

        Args:
            sinogram: Shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.

        Returns:
            Image, shape ``(N, N)`` or ``(B, N, N)`` (units mm x sinogram units).
        """
        batch, batched = as_sinogram_batch(sinogram, self._geometry, self._np_dtype)
        with _torch_threads(self._num_threads), torch.inference_mode():
            values = torch.from_numpy(batch).to(self._device).reshape(batch.shape[0], -1)
            result = self._rays.adjoint(values)
        return self._to_numpy(result, batched)

    def fbp(self, sinogram: npt.ArrayLike, filter_name: FilterName = "ram-lak") -> FloatArray:
        """Fan-beam filtered backprojection (full or short scan).

        Args:
            sinogram: Line integrals, shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.
            filter_name: One of :data:`~models.physics.fbp_filters.FILTER_NAMES`.

        Returns:
            Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``.

        Raises:
            InputRejected: Bad sinogram or filter, or an arc shorter than a short scan.
        """
        name = check_filter_name(filter_name)
        weights = parker_weights(self._geometry)
        batch, batched = as_sinogram_batch(sinogram, self._geometry, self._np_dtype)
        with _torch_threads(self._num_threads), torch.inference_mode():
            sino = torch.from_numpy(batch).to(self._device)
            sino = sino * self._tensor(weights * self._preweight())[None]
            filtered = self._filter(sino, name)
            result = self._backproject(filtered)
        return self._to_numpy(result, batched)

    # ----------------------------------------------------------------- helpers

    def _tensor(self, values: npt.ArrayLike) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self._device, self._dtype)

    def _to_numpy(self, result: torch.Tensor, batched: bool) -> FloatArray:
        out: FloatArray = result.detach().to("cpu").numpy().astype(self._np_dtype, copy=False)
        return out if batched else out[0]

    @property
    def _equiangular(self) -> bool:
        return self._geometry.detector == "equiangular"

    def _preweight(self) -> npt.NDArray[np.float64]:
        """Cosine pre-weight per bin, ``(n_det,)`` (times D for the curved detector, mm)."""
        cos = np.cos(self._geometry.fan_angles_rad)
        return cos * self._geometry.source_to_isocentre_mm if self._equiangular else cos

    def _filter_step(self) -> float:
        """Sample step of the filtered coordinate: rad (curved) or mm at the isocentre (flat)."""
        geo = self._geometry
        if self._equiangular:
            return geo.det_spacing_mm / geo.source_to_detector_mm
        return geo.det_spacing_mm / geo.magnification

    def _filter(self, sinograms: torch.Tensor, filter_name: FilterName) -> torch.Tensor:
        geo = self._geometry
        n_det, step = geo.n_det, self._filter_step()
        size = fbp_padded_length(n_det)
        iso_step_mm = geo.det_spacing_mm / geo.magnification
        cutoff = 0.5 * min(1.0, iso_step_mm / geo.pixel_size_mm)
        alpha = step if self._equiangular else None
        response = self._tensor(fbp_filter(n_det, filter_name, cutoff, alpha) / step)
        spectrum = torch.fft.rfft(F.pad(sinograms, (0, size - n_det)), dim=-1)
        spectrum.mul_(response)
        return torch.fft.irfft(spectrum, n=size, dim=-1)[..., :n_det]

    def _backproject(self, filtered: torch.Tensor) -> torch.Tensor:
        """Distance-weighted pixel-driven backprojection, ``(B, V, n_det)`` -> ``(B, N, N)``."""
        geo = self._geometry
        batch, n_views, n_det = filtered.shape
        n, sod = geo.image_size, geo.source_to_isocentre_mm
        beta = geo.angles_rad
        cos, sin = self._tensor(np.cos(beta)), self._tensor(np.sin(beta))
        centres = self._tensor(geo.pixel_centres_mm)
        xs = centres[None, :].expand(n, n).reshape(-1)  # pixel x (mm), row-major
        ys = centres[:, None].expand(n, n).reshape(-1)
        scale = 2.0 / (self._filter_step() * (n_det + 1))
        padded = F.pad(filtered.permute(1, 0, 2), (1, 1)).contiguous()  # (V, B, n_det + 2)
        sources = padded.unsqueeze(2)  # height 1: grid_sample is exact 1D interpolation
        image = torch.zeros(batch, n * n, dtype=self._dtype, device=self._device)
        itemsize = 4 if self._dtype == torch.float32 else 8
        size = max(1, min(n_views, int(self._budget_bytes // (n * n * (6 + batch) * itemsize))))
        for start in range(0, n_views, size):
            part = slice(start, start + size)
            c, s = cos[part][:, None], sin[part][:, None]
            along_t = c * xs[None] + s * ys[None]  # <p, e_t>, (V, N^2)
            depth = (ys[None] * c - xs[None] * s).add_(sod)  # D + <p, d0>
            if self._equiangular:
                coord = torch.atan2(along_t, depth)
                weight = (along_t.square_() + depth.square()).reciprocal_()
            else:
                coord = along_t.mul_(sod).div_(depth)
                weight = depth.reciprocal_().mul_(sod).square_()
            coord.mul_(scale)
            samples = F.grid_sample(
                sources[part],
                coord.unsqueeze(1).unsqueeze(-1).expand(-1, -1, -1, 2),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )  # (V, B, 1, N^2)
            image += samples[:, :, 0].mul_(weight[:, None, :]).sum(dim=0)
        image.mul_(math.radians(geo.arc_deg) / n_views)
        return image.view(batch, n, n)
