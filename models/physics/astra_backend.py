"""Optional projector backend on the ASTRA toolbox (2D, CPU), used as a cross-check.

ASTRA is licensed under the **GPLv3**: it is an optional extra (``pip install .[astra]``), never
a dependency of the default path, and this module imports it only inside functions. Only the
2D CPU code is used: parallel beam with the ``linear`` (Joseph, like our torch backend),
``strip`` or ``line`` kernels, and its CPU ``FBP`` algorithm; fan beam (flat detector,
``fanflat_vec``) with the ``line_fanflat`` kernel, forward and back projection only. No 3D
call is ever made (without CUDA, ASTRA's 3D code kills the process instead of raising) and no
CUDA algorithm is used.

Conventions are those of :mod:`models.physics.geometry` and
:mod:`models.physics.fan_geometry`. ASTRA works in pixel units with its y axis pointing up the
rows, so the wrapper passes the angles negated (``-theta``), the
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
from models.physics.fan_geometry import FanBeamGeometry, Geometry
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


class _Astra2D:
    """Forward projection and backprojection on an ASTRA 2D CPU projector (float32)."""

    _astra: ModuleType
    _geometry: Geometry
    _projector_id: int

    def _start(self, proj_geom: dict[str, Any], kernel: str) -> None:
        n = self._geometry.image_size
        self._vol_geom = self._astra.create_vol_geom(n, n)
        self._proj_geom = proj_geom
        self._projector_id = self._astra.create_projector(kernel, proj_geom, self._vol_geom)
        weakref.finalize(self, self._astra.projector.delete, self._projector_id)

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

    def _create_sino(self, image: FloatArray) -> FloatArray:
        sino_id, sino = self._astra.create_sino(image, self._projector_id)
        self._astra.data2d.delete(sino_id)
        return np.asarray(sino, dtype=np.float32)

    def _backproject(self, sinogram: FloatArray) -> FloatArray:
        vol_id, vol = self._astra.create_backprojection(sinogram, self._projector_id)
        self._astra.data2d.delete(vol_id)
        return np.asarray(vol, dtype=np.float32)


def fan_vectors(geometry: FanBeamGeometry) -> npt.NDArray[np.float64]:
    """ASTRA ``fanflat_vec`` rows ``(src_x, src_y, det_x, det_y, u_x, u_y)`` of a flat detector.

    ASTRA's 2D frame is in pixels with y pointing up the rows, so a point ``(x, y)`` mm of
    :mod:`models.physics.fan_geometry` becomes ``(x, -y) / pixel``; ``u`` is the vector from
    one bin centre to the next.

    Args:
        geometry: A fan-beam geometry with a flat detector.

    Returns:
        Shape ``(n_views, 6)``.
    """
    beta = geometry.angles_rad
    d0 = np.stack([-np.sin(beta), np.cos(beta)], axis=-1)
    e_t = np.stack([np.cos(beta), np.sin(beta)], axis=-1)
    source = -geometry.source_to_isocentre_mm * d0
    centre = source + geometry.source_to_detector_mm * d0
    flip = np.array([1.0, -1.0]) / geometry.pixel_size_mm
    return np.concatenate(
        [source * flip, centre * flip, e_t * geometry.det_spacing_mm * flip], axis=1
    )


class AstraFanProjector(_Astra2D):
    """Fan-beam (flat detector) forward projection and adjoint on ASTRA's CPU code.

    Uses ASTRA's ``fanflat_vec`` geometry (:func:`fan_vectors`) and its ``line_fanflat``
    kernel (weights = intersection lengths of the ray with the pixels, not Joseph's
    interpolation, so sinograms agree with ours to about 1 %, not to rounding). ASTRA has no
    curved 2D detector and its CPU code no fan-beam FBP, so :meth:`fbp` is refused.

    Args:
        geometry: A fan-beam geometry with ``detector="flat"``.

    Raises:
        InputRejected: ASTRA missing, or a curved detector.
    """

    def __init__(self, geometry: FanBeamGeometry) -> None:
        if not isinstance(geometry, FanBeamGeometry) or geometry.detector != "flat":
            raise InputRejected("ASTRA's 2D fan-beam code supports only a flat detector")
        self._astra = _import_astra()
        self._geometry = geometry
        vectors = fan_vectors(geometry)
        self._start(
            self._astra.create_proj_geom("fanflat_vec", geometry.n_det, vectors), "line_fanflat"
        )

    @property
    def geometry(self) -> FanBeamGeometry:
        """The scan geometry."""
        assert isinstance(self._geometry, FanBeamGeometry)
        return self._geometry

    def fbp(self, sinogram: npt.ArrayLike, filter_name: FilterName = "ram-lak") -> FloatArray:
        """Refused: ASTRA's CPU FBP does not handle fan beam.

        Raises:
            InputRejected: Always; use :class:`~models.physics.fan_projector.TorchFanProjector`.
        """
        raise InputRejected(
            "ASTRA's CPU FBP does not support fan beam; use the torch backend's fbp"
        )


class AstraParallelProjector(_Astra2D):
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
        spacing = geometry.det_spacing_mm / geometry.pixel_size_mm
        self._start(
            self._astra.create_proj_geom("parallel", spacing, geometry.n_det, -geometry.angles_rad),
            kernel,
        )

    @property
    def geometry(self) -> ParallelBeamGeometry:
        """The scan geometry."""
        assert isinstance(self._geometry, ParallelBeamGeometry)
        return self._geometry

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
