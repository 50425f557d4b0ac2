"""Parallel-beam projectors: the :class:`Projector` protocol and its default torch backend.

A projector is a linear operator ``A`` from images of linear attenuation (1/mm) to sinograms of
line integrals (dimensionless: mm x 1/mm), with its adjoint ``A^T`` and a filtered
backprojection (FBP) that inverts it approximately. Conventions (axes, angles, detector) are
those of :mod:`models.physics.geometry`.

Shapes (numpy in, numpy out):

* image: ``(N, N)`` or a batch ``(B, N, N)``, indexed ``[row (+y), col (+x)]``, 1/mm;
* sinogram: ``(n_views, n_det)`` or ``(B, n_views, n_det)``, indexed ``[view, bin]``.

The default backend :class:`TorchParallelProjector` is our own (Apache-2.0) and runs on CPU or
CUDA; :mod:`models.physics.astra_backend` wraps the optional, GPLv3 ASTRA toolbox (2D CPU only)
as a cross-check. Use :func:`make_projector` to pick one.

Input validation lives in :mod:`models.physics.arrays` and the FBP filter design in
:mod:`models.physics.fbp_filters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.errors import InputRejected
from models.physics.arrays import FloatArray, as_image_batch, as_sinogram_batch
from models.physics.fan_geometry import FanBeamGeometry, Geometry
from models.physics.fbp_filters import (
    FilterName,
    check_filter_name,
    fbp_angular_weight,
    fbp_cutoff,
    fbp_filter,
    fbp_padded_length,
)
from models.physics.geometry import ParallelBeamGeometry
from models.physics.joseph import JosephRays
from models.physics.pixel_adjoint import PixelDrivenAdjoint, pixel_adjoint_applies

BackendName = Literal["torch", "astra"]


@runtime_checkable
class Projector(Protocol):
    """A 2D projector (parallel or fan beam): forward projection, exact adjoint and FBP.

    Implementations accept numpy arrays (any real dtype; converted) and return numpy arrays of
    their working dtype (float32 by default), keeping the batched or single form of the input.
    """

    @property
    def geometry(self) -> Geometry:
        """The scan geometry this projector was built for (parallel or fan beam)."""
        ...

    def forward(self, image: npt.ArrayLike) -> FloatArray:
        """Project images of linear attenuation.

        Args:
            image: Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``.

        Returns:
            Line integrals (dimensionless), shape ``(n_views, n_det)`` or
            ``(B, n_views, n_det)``.
        """
        ...

    def adjoint(self, sinogram: npt.ArrayLike) -> FloatArray:
        """Apply the transpose of :meth:`forward` (unfiltered backprojection).

        Args:
            sinogram: Shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.

        Returns:
            Image, shape ``(N, N)`` or ``(B, N, N)``, such that
            ``<forward(x), y> == <x, adjoint(y)>`` up to float rounding.
        """
        ...

    def fbp(self, sinogram: npt.ArrayLike, filter_name: FilterName = "ram-lak") -> FloatArray:
        """Reconstruct by filtered backprojection.

        Args:
            sinogram: Line integrals, shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.
            filter_name: One of :data:`FILTER_NAMES`.

        Returns:
            Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``.
        """
        ...


# --------------------------------------------------------------------------- torch backend


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` intra-op threads inside the block, then restore the previous count."""
    previous = torch.get_num_threads()
    if num_threads is None or num_threads == previous:  # nothing to change (cheap path)
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputRejected(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputRejected(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise InputRejected(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


class TorchParallelProjector:
    """Parallel-beam projector in torch (Joseph's method) with an exact adjoint and an FBP.

    Forward: for each view, rays are sampled once per image row (views closer to 0/180 deg)
    or per image column (closer to 90 deg) with linear interpolation along that row/column
    (Joseph's method, as ASTRA's ``linear`` kernel), through
    :func:`torch.nn.functional.grid_sample`; samples are summed and times the path length per
    row (``pixel / |cos theta|`` or ``pixel / |sin theta|``, mm). Outside the square the image
    is zero.

    Adjoint: the native backward kernel of the same ``grid_sample`` call, i.e. the transpose of
    exactly the same interpolation weights, so ``<A x, y> = <x, A^T y>`` to rounding. Both
    run on the ray engine :class:`~models.physics.joseph.JosephRays` shared with fan beam,
    which keeps the sampling grids between calls while they fit in 256 MB (512^2 at 60
    views: 89 MB, kept; at 720 views: recomputed per chunk). With bins at least as wide as
    the pixels, and when its tables fit in ``cache_mb`` too, the adjoint is computed as
    gathers instead of scatters with the same weights
    (:class:`~models.physics.pixel_adjoint.PixelDrivenAdjoint`, about 1.5-2x faster).

    FBP: ramp filtering by FFT (zero-padded to :func:`fbp_padded_length`, cut off at
    :func:`fbp_cutoff`) followed by a pixel-driven backprojection with linear interpolation in
    the detector (the usual FBP backprojector, not the adjoint above), weighted by
    :func:`fbp_angular_weight`.

    Rays are processed in chunks sized to ``memory_budget_mb`` so 512^2 x 720 views stays
    far below 2 GB. Thread count: pass ``num_threads`` to use that many torch threads during
    each call (the previous global setting is restored afterwards; not safe to call from
    several Python threads at once); ``None`` leaves torch's setting alone.

    Args:
        geometry: The scan geometry.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` etc.).
        num_threads: Torch intra-op threads during calls, or ``None``.
        dtype: ``"float32"`` (default) or ``"float64"`` working and output precision.
        memory_budget_mb: Rough bound on the temporary memory of one chunk (MB).
        cache_mb: Memory (MB) each of the forward grids and the gather-form adjoint may keep
            between calls (speeds up iterative methods; 0 disables both caches).

    Raises:
        InputRejected: Unknown or unavailable device, bad dtype, thread count or budget.
    """

    def __init__(
        self,
        geometry: ParallelBeamGeometry,
        device: str | torch.device = "cpu",
        *,
        num_threads: int | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        memory_budget_mb: float = 64.0,
        cache_mb: float = 256.0,
    ) -> None:
        if not isinstance(geometry, ParallelBeamGeometry):
            raise InputRejected(f"geometry must be a ParallelBeamGeometry, got {type(geometry)}")
        if dtype not in ("float32", "float64"):
            raise InputRejected(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise InputRejected(f"num_threads must be a positive integer, got {num_threads!r}")
        if not memory_budget_mb > 0:
            raise InputRejected(f"memory_budget_mb must be > 0, got {memory_budget_mb!r}")
        if not cache_mb >= 0:
            raise InputRejected(f"cache_mb must be >= 0, got {cache_mb!r}")
        self._geometry = geometry
        self._device = _resolve_device(device)
        self._np_dtype = np.dtype(dtype)
        self._dtype = torch.float32 if dtype == "float32" else torch.float64
        self._num_threads = num_threads
        self._budget_bytes = float(memory_budget_mb) * 2**20
        theta = geometry.angles_rad
        e_t = np.stack([np.cos(theta), np.sin(theta)], axis=-1)  # detector axis, (V, 2)
        along = np.stack([-np.sin(theta), np.cos(theta)], axis=-1)  # ray direction
        points = geometry.detector_centres_mm[None, :, None] * e_t[:, None, :]
        directions = np.broadcast_to(along[:, None, :], points.shape)
        self._rays = JosephRays(
            geometry.image_size,
            geometry.pixel_size_mm,
            points.reshape(-1, 2),
            directions.reshape(-1, 2),
            self._device,
            self._dtype,
            memory_budget_mb,
            cache_mb,
        )
        self._pixel_adjoint = (
            PixelDrivenAdjoint(geometry, self._device, self._dtype, memory_budget_mb, cache_mb)
            if pixel_adjoint_applies(geometry, cache_mb)
            else None
        )

    # ----------------------------------------------------------------- public API

    @property
    def geometry(self) -> ParallelBeamGeometry:
        """The scan geometry."""
        return self._geometry

    @property
    def device(self) -> torch.device:
        """The torch device computations run on."""
        return self._device

    def forward(self, image: npt.ArrayLike) -> FloatArray:
        """Project images of linear attenuation (see :meth:`Projector.forward`).

        Args:
            image: Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``.

        Returns:
            Line integrals, shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.
        """
        batch, batched = as_image_batch(image, self._geometry, self._np_dtype)
        with _torch_threads(self._num_threads), torch.inference_mode():
            result = self._forward(torch.from_numpy(batch).to(self._device))
        return self._to_numpy(result, batched)

    def adjoint(self, sinogram: npt.ArrayLike) -> FloatArray:
        """Apply the exact transpose of :meth:`forward` (see :meth:`Projector.adjoint`).

        Args:
            sinogram: Shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.

        Returns:
            Image, shape ``(N, N)`` or ``(B, N, N)`` (units mm x sinogram units).
        """
        batch, batched = as_sinogram_batch(sinogram, self._geometry, self._np_dtype)
        with _torch_threads(self._num_threads), torch.inference_mode():
            result = self._adjoint(torch.from_numpy(batch).to(self._device))
        return self._to_numpy(result, batched)

    def fbp(self, sinogram: npt.ArrayLike, filter_name: FilterName = "ram-lak") -> FloatArray:
        """Filtered backprojection (see :meth:`Projector.fbp`).

        Args:
            sinogram: Line integrals, shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.
            filter_name: One of :data:`FILTER_NAMES`.

        Returns:
            Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``.
        """
        name = check_filter_name(filter_name)
        batch, batched = as_sinogram_batch(sinogram, self._geometry, self._np_dtype)
        with _torch_threads(self._num_threads), torch.inference_mode():
            sino = torch.from_numpy(batch).to(self._device)
            filtered = self._filter(sino, name)
            result = self._backproject_pixel_driven(filtered)
            result.mul_(fbp_angular_weight(self._geometry))
        return self._to_numpy(result, batched)

    # ----------------------------------------------------------------- set-up helpers

    def _tensor(self, values: npt.ArrayLike) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self._device, self._dtype)

    def _chunk_size(self, elements_per_view: int, batch: int) -> int:
        """Views per chunk so that grid (2), values (batch) and a temporary fit the budget."""
        itemsize = 4 if self._dtype == torch.float32 else 8
        per_view = elements_per_view * (3 + batch) * itemsize
        return max(1, int(self._budget_bytes // per_view))

    def _to_numpy(self, result: torch.Tensor, batched: bool) -> FloatArray:
        out: FloatArray = result.detach().to("cpu").numpy().astype(self._np_dtype, copy=False)
        return out if batched else out[0]

    # ----------------------------------------------------------------- Joseph projector
    #
    # Both grid_sample uses below sample a single row of values per batch item (an image row
    # or column, or one filtered projection), zero-padded by one element at each end, as a
    # source of height 1, with align_corners=True. The grid's y coordinate then maps to row 0
    # whatever its value (the second bilinear tap falls outside and is skipped), so the result
    # is exact 1D linear interpolation and for |x| >= 1 only zero padding is touched; y is an
    # alias (stride 0) of x. Height 1 halves the taps (about 2x faster than two equal rows).

    def _line_sources(self, lines: torch.Tensor) -> torch.Tensor:
        """``(L, B, W)`` lines -> ``(L, B, 1, W + 2)`` zero-padded."""
        return F.pad(lines, (1, 1)).unsqueeze(2).contiguous()

    @staticmethod
    def _aliased_grid(coords: torch.Tensor) -> torch.Tensor:
        """``(L, P)`` x coordinates -> ``(L, 1, P, 2)`` grid whose y is the same memory as x."""
        return coords.unsqueeze(1).unsqueeze(-1).expand(-1, -1, -1, 2)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, N)`` -> ``(B, n_views, n_det)``."""
        return self._rays.forward(images).view(images.shape[0], *self._geometry.sinogram_shape)

    def _adjoint(self, sinograms: torch.Tensor) -> torch.Tensor:
        """``(B, n_views, n_det)`` -> ``(B, N, N)``, the transpose of :meth:`_forward`."""
        if self._pixel_adjoint is not None:
            return self._pixel_adjoint(sinograms)
        return self._rays.adjoint(sinograms.reshape(sinograms.shape[0], -1))

    # ----------------------------------------------------------------- FBP

    def _filter(self, sinograms: torch.Tensor, filter_name: FilterName) -> torch.Tensor:
        """Ramp-filter along the detector; result in 1/mm, shape ``(B, n_views, n_det)``."""
        n_det = self._geometry.n_det
        size = fbp_padded_length(n_det)
        values = fbp_filter(n_det, filter_name, fbp_cutoff(self._geometry))
        response = self._tensor(values / self._geometry.det_spacing_mm)
        spectrum = torch.fft.rfft(F.pad(sinograms, (0, size - n_det)), dim=-1)
        spectrum.mul_(response)
        return torch.fft.irfft(spectrum, n=size, dim=-1)[..., :n_det]

    def _backproject_pixel_driven(self, filtered: torch.Tensor) -> torch.Tensor:
        """Sum over views of the filtered projections at ``t = x cos + y sin`` (linear interp)."""
        batch, n_views, n_det = filtered.shape
        n = self._geometry.image_size
        angles = self._geometry.angles_rad
        # Normalised coordinate of t (mm) on a projection padded to n_det + 2 elements.
        scale = 2.0 / (self._geometry.det_spacing_mm * (n_det + 1))
        cos, sin = self._tensor(np.cos(angles) * scale), self._tensor(np.sin(angles) * scale)
        centres = self._tensor(self._geometry.pixel_centres_mm)
        sources = self._line_sources(filtered.permute(1, 0, 2))  # (n_views, B, 1, n_det + 2)
        image = torch.zeros(batch, n * n, dtype=self._dtype, device=self._device)
        size = min(self._chunk_size(n * n, batch), n_views)
        buffer = torch.empty(size, n, n, dtype=self._dtype, device=self._device)
        for start in range(0, n_views, size):
            part = slice(start, start + size)
            count = cos[part].numel()
            coords = buffer[:count]
            torch.add(
                (cos[part][:, None] * centres[None, :])[:, None, :],
                (sin[part][:, None] * centres[None, :])[:, :, None],
                out=coords,
            )
            samples = F.grid_sample(
                sources[part],
                self._aliased_grid(coords.view(count, n * n)),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )  # (V, B, 1, N * N)
            image += samples.sum(dim=0).view(batch, n * n)
        return image.view(batch, n, n)


# --------------------------------------------------------------------------- factory


def make_projector(
    geometry: Geometry,
    backend: BackendName = "torch",
    device: str = "cpu",
    *,
    num_threads: int | None = None,
) -> Projector:
    """Build a projector for ``geometry``.

    Args:
        geometry: The scan geometry: :class:`ParallelBeamGeometry` or
            :class:`~models.physics.fan_geometry.FanBeamGeometry`.
        backend: ``"torch"`` (default, ours, CPU or CUDA) or ``"astra"`` (optional GPLv3 ASTRA
            toolbox, 2D CPU only, fan beam with a flat detector and without FBP; imported only
            here, on demand).
        device: ``"cpu"`` or ``"cuda"``; ASTRA accepts only ``"cpu"``.
        num_threads: Torch threads for the torch backend (``None``: leave torch's setting).

    Returns:
        A :class:`Projector`.

    Raises:
        InputRejected: Unknown geometry or backend, unavailable device, or ASTRA asked for but
            missing.
    """
    if not isinstance(geometry, ParallelBeamGeometry | FanBeamGeometry):
        raise InputRejected(
            f"geometry must be a ParallelBeamGeometry or FanBeamGeometry, got {type(geometry)}"
        )
    if backend == "torch":
        if isinstance(geometry, FanBeamGeometry):
            from models.physics.fan_projector import TorchFanProjector

            return TorchFanProjector(geometry, device, num_threads=num_threads)
        return TorchParallelProjector(geometry, device, num_threads=num_threads)
    if backend == "astra":
        if _resolve_device(device).type != "cpu":
            raise InputRejected("the ASTRA backend runs on CPU only here (2D, no CUDA)")
        from models.physics.astra_backend import AstraFanProjector, AstraParallelProjector

        if isinstance(geometry, FanBeamGeometry):
            return AstraFanProjector(geometry)
        return AstraParallelProjector(geometry)
    raise InputRejected(f"unknown projector backend {backend!r}; choose 'torch' or 'astra'")
