"""<A x, y> = <x, A^T y> for every projector we have: one test over all operators (deepinv-style).

Each case builds an operator (backend x geometry x precision); ASTRA cases skip when the
optional package is absent. The identity is checked on random batches, and a wrong adjoint
(the FBP backprojector, where the operator has one) must break it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from models.errors import InputRejected
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.fan_projector import TorchFanProjector
from models.physics.geometry import ParallelBeamGeometry
from models.physics.projector import Projector, TorchParallelProjector

Builder = Callable[[], Projector]


def _astra(geometry: ParallelBeamGeometry | FanBeamGeometry, kernel: str = "linear") -> Projector:
    pytest.importorskip("astra")
    from models.physics.astra_backend import AstraFanProjector, AstraParallelProjector

    if isinstance(geometry, FanBeamGeometry):
        return AstraFanProjector(geometry)
    return AstraParallelProjector(geometry, kernel)  # type: ignore[arg-type]


PAR = ParallelBeamGeometry(33, 0.8, 17)
PAR_360_COARSE = ParallelBeamGeometry(40, 0.5, 45, None, 0.65, 360.0)
PAR_TRUNCATED = ParallelBeamGeometry(20, 1.0, 7, 25, 0.6)
PAR_ONE_VIEW = ParallelBeamGeometry(31, 1.0, 1)
FAN_CURVED = FanBeamGeometry(33, 0.8, 23, 60.0, 100.0, "equiangular")
FAN_FLAT = FanBeamGeometry(33, 0.8, 23, 60.0, 100.0, "flat")
FAN_SHORT = FanBeamGeometry(28, 1.0, 19, 45.0, 90.0, "equiangular", arc_deg=240.0)
FAN_TRUNCATED = FanBeamGeometry(30, 1.0, 11, 50.0, 70.0, "flat", 21, 0.9)  # misses the corners
FAN_FINE = FanBeamGeometry(24, 1.0, 9, 40.0, 80.0, "equiangular", detector_spacing_mm=0.7)

# (id, builder, relative tolerance, has a distinct FBP backprojector)
OPERATORS: list[tuple[str, Builder, float, bool]] = [
    ("torch-parallel-f64", lambda: TorchParallelProjector(PAR, dtype="float64"), 1e-10, True),
    (
        "torch-parallel-360-coarse-f64",
        lambda: TorchParallelProjector(PAR_360_COARSE, dtype="float64"),
        1e-10,
        True,
    ),
    (
        "torch-parallel-truncated-f64",
        lambda: TorchParallelProjector(PAR_TRUNCATED, dtype="float64"),
        1e-10,
        True,
    ),
    (
        "torch-parallel-one-view-f64",
        lambda: TorchParallelProjector(PAR_ONE_VIEW, dtype="float64"),
        1e-10,
        True,
    ),
    (
        "torch-parallel-scatter-adjoint-f64",  # no cache: the ray engine's scatter transpose
        lambda: TorchParallelProjector(PAR, dtype="float64", cache_mb=0),
        1e-10,
        True,
    ),
    ("torch-parallel-f32", lambda: TorchParallelProjector(PAR), 1e-5, True),
    ("torch-fan-curved-f64", lambda: TorchFanProjector(FAN_CURVED, dtype="float64"), 1e-10, True),
    ("torch-fan-flat-f64", lambda: TorchFanProjector(FAN_FLAT, dtype="float64"), 1e-10, True),
    ("torch-fan-short-f64", lambda: TorchFanProjector(FAN_SHORT, dtype="float64"), 1e-10, True),
    (
        "torch-fan-truncated-f64",
        lambda: TorchFanProjector(FAN_TRUNCATED, dtype="float64"),
        1e-10,
        True,
    ),
    ("torch-fan-fine-f64", lambda: TorchFanProjector(FAN_FINE, dtype="float64"), 1e-10, True),
    ("torch-fan-curved-f32", lambda: TorchFanProjector(FAN_CURVED), 1e-5, True),
    (
        "torch-fan-flat-small-chunks-f32",
        lambda: TorchFanProjector(FAN_FLAT, memory_budget_mb=0.01),
        1e-5,
        True,
    ),
    ("astra-parallel-linear", lambda: _astra(PAR, "linear"), 1e-5, True),
    ("astra-parallel-strip", lambda: _astra(PAR, "strip"), 1e-5, True),
    ("astra-parallel-line", lambda: _astra(PAR_360_COARSE, "line"), 1e-5, True),
    ("astra-fan-flat", lambda: _astra(FAN_FLAT), 1e-5, False),
    ("astra-fan-truncated", lambda: _astra(FAN_TRUNCATED), 1e-5, False),
]


@pytest.mark.parametrize(
    ("build", "rtol", "has_fbp"),
    [pytest.param(b, r, f, id=name) for name, b, r, f in OPERATORS],
)
def test_adjoint_is_the_transpose(build: Builder, rtol: float, has_fbp: bool) -> None:
    proj = build()
    assert isinstance(proj, Projector)
    geo = proj.geometry
    rng = np.random.default_rng(geo.image_size + geo.n_views)
    x = rng.random((2, *geo.image_shape))
    y = rng.standard_normal((2, *geo.sinogram_shape))
    ax, aty = proj.forward(x), proj.adjoint(y)
    assert ax.shape == (2, *geo.sinogram_shape)
    assert aty.shape == (2, *geo.image_shape)
    lhs = float(np.vdot(ax.astype(np.float64), y))
    rhs = float(np.vdot(x, aty.astype(np.float64)))
    scale = float(np.linalg.norm(ax) * np.linalg.norm(y))  # |<Ax, y>| can be ~0 for signed y
    assert abs(lhs - rhs) <= rtol * scale, (lhs, rhs, scale)
    # the operator sees the image: A is not (nearly) zero
    assert float(np.linalg.norm(ax)) > 0.1 * float(np.linalg.norm(x))
    if has_fbp:
        try:
            wrong = float(np.vdot(x, proj.fbp(y).astype(np.float64)))
        except InputRejected:  # e.g. FBP of an arc too short for it
            return
        assert abs(wrong - lhs) > 1e-3 * scale


def test_gather_and_scatter_adjoints_agree() -> None:
    y = np.random.default_rng(5).standard_normal((3, *PAR_360_COARSE.sinogram_shape))
    gather = TorchParallelProjector(PAR_360_COARSE, dtype="float64")
    scatter = TorchParallelProjector(PAR_360_COARSE, dtype="float64", cache_mb=0)
    assert gather._pixel_adjoint is not None
    assert scatter._pixel_adjoint is None
    np.testing.assert_allclose(gather.adjoint(y), scatter.adjoint(y), rtol=1e-9, atol=1e-12)
