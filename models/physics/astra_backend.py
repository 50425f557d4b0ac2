"""Optional projector backend on the ASTRA toolbox (2D, CPU), used as a cross-check.

ASTRA is licensed under the **GPLv3**: it is an optional extra (``pip install .[astra]``), never
a dependency of the default path, and this module imports it only inside functions. Only the
2D CPU code is used: parallel beam with the ``linear`` (Joseph, like our torch backend),
``strip`` or ``line`` kernels, and its CPU ``FBP`` algorithm. No 3D call is ever made (without
CUDA, ASTRA's 3D code kills the process instead of raising) and no CUDA algorithm is used.

Conventions are those of :mod:`models.physics.geometry`. ASTRA works in pixel units with its
y axis pointing up the rows, so the wrapper passes the angles negated (``-theta``), the
detector spacing in pixels, and scales by the pixel size: line integrals ``= pixel_mm *``
ASTRA's projection, attenuation ``=`` ASTRA's FBP ``/ pixel_mm``.
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.arrays import FloatArray, as_image_batch, as_sinogram_batch
from models.physics.fbp_filters import FilterName, check_filter_name
from models.physics.geometry import ParallelBeamGeometry

AstraKernel = Literal["linear", "strip", "line"]


def astra_available() -> bool:
    """Whether the optional ``astra`` package can be imported (without importing it)."""
    return importlib.util.find_spec("astra") is not None


def _import_astra() -> ModuleType:
    try:
        return importlib.import_module("astra")
    except ImportError as exc:
        raise InputRejected(
            "the ASTRA backend needs the optional astra-toolbox package (GPLv3), not installed"
        ) from exc


class AstraParallelProjector:
    """2D parallel-beam :class:`~models.physics.projector.Projector` on ASTRA's CPU code.

    Float32 in and out. Batches are processed one image or sinogram at a time (ASTRA's CPU
    code is single-threaded).

    Args:
        geometry: The scan geometry.
        kernel: ASTRA projector type: ``"linear"`` (Joseph, default), ``"strip"`` (area
            weights) or ``"line"`` (Siddon-like lengths).

    Raises:
        InputRejected: ASTRA missing, or an unknown kernel.
    """

    def __init__(self, geometry: ParallelBeamGeometry, kernel: AstraKernel = "linear") -> None:
        if kernel not in ("linear", "strip", "line"):
            raise InputRejected(f"unknown ASTRA kernel {kernel!r}; use linear, strip or line")
        self._astra = _import_astra()
        self._geometry = geometry
        n = geometry.image_size
        pixel = geometry.pixel_size_mm
        self._vol_geom = self._astra.create_vol_geom(n, n)
        self._proj_geom = self._astra.create_proj_geom(
            "parallel", geometry.det_spacing_mm / pixel, geometry.n_det, -geometry.angles_rad
        )
        self._projector_id: int = self._astra.create_projector(
            kernel, self._proj_geom, self._vol_geom
        )
        weakref.finalize(self, self._astra.projector.delete, self._projector_id)

    @property
    def geometry(self) -> ParallelBeamGeometry:
        """The scan geometry."""
        return self._geometry

    def forward(self, image: npt.ArrayLike) -> FloatArray:
        """Project attenuation images (1/mm), ``(N, N)``/``(B, N, N)`` -> line integrals.

        Args:
            image: Shape ``(N, N)`` or ``(B, N, N)``.

        Returns:
            Shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``, float32.
        """
        batch, batched = as_image_batch(image, self._geometry)
        out = np.stack([self._create_sino(one) for one in batch])
        out *= np.float32(self._geometry.pixel_size_mm)
        return out if batched else out[0]

    def adjoint(self, sinogram: npt.ArrayLike) -> FloatArray:
        """ASTRA's backprojection, the transpose of :meth:`forward` (up to ASTRA's rounding).

        Args:
            sinogram: Shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.

        Returns:
            Shape ``(N, N)`` or ``(B, N, N)``, float32.
        """
        batch, batched = as_sinogram_batch(sinogram, self._geometry)
        out = np.stack([self._backproject(one) for one in batch])
        out *= np.float32(self._geometry.pixel_size_mm)
        return out if batched else out[0]

    def fbp(self, sinogram: npt.ArrayLike, filter_name: FilterName = "ram-lak") -> FloatArray:
        """ASTRA's CPU ``FBP`` algorithm, converted to 1/mm.

        Args:
            sinogram: Line integrals, shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``.
            filter_name: One of ``"ram-lak"``, ``"shepp-logan"``, ``"cosine"``, ``"hann"``
                (ASTRA's own filter implementations of those names).

        Returns:
            Attenuation in 1/mm, shape ``(N, N)`` or ``(B, N, N)``, float32.
        """
        name = check_filter_name(filter_name)
        batch, batched = as_sinogram_batch(sinogram, self._geometry)
        out = np.stack([self._fbp_one(one, name) for one in batch])
        out /= np.float32(self._geometry.pixel_size_mm)
        return out if batched else out[0]

    # ----------------------------------------------------------------- ASTRA calls (2D only)

    def _create_sino(self, image: FloatArray) -> FloatArray:
        sino_id, sino = self._astra.create_sino(image, self._projector_id)
        self._astra.data2d.delete(sino_id)
        return np.asarray(sino, dtype=np.float32)

    def _backproject(self, sinogram: FloatArray) -> FloatArray:
        vol_id, vol = self._astra.create_backprojection(sinogram, self._projector_id)
        self._astra.data2d.delete(vol_id)
        return np.asarray(vol, dtype=np.float32)

    def _fbp_one(self, sinogram: FloatArray, filter_name: str) -> FloatArray:
        data2d = self._astra.data2d
        sino_id = data2d.create("-sino", self._proj_geom, sinogram)
        rec_id = data2d.create("-vol", self._vol_geom, 0.0)
        config: dict[str, Any] = self._astra.astra_dict("FBP")
        config["ProjectorId"] = self._projector_id
        config["ProjectionDataId"] = sino_id
        config["ReconstructionDataId"] = rec_id
        config["FilterType"] = filter_name
        alg_id = self._astra.algorithm.create(config)
        try:
            self._astra.algorithm.run(alg_id)
            return np.asarray(data2d.get(rec_id), dtype=np.float32)
        finally:
            self._astra.algorithm.delete(alg_id)
            data2d.delete([sino_id, rec_id])
