"""Iterative reconstruction: SIRT, CGLS and TV-regularised PDHG (Chambolle-Pock).

Every method takes a measured sinogram and a :class:`~models.physics.projector.Projector`
(parallel or fan beam, any backend) and returns a :class:`Reconstruction`: the image and a
:class:`ReconstructionReport` whose data-consistency residuals ``||A x_k - y|| / ||y||`` (one
per iterate, the starting image included) are the quality flag of the result. The same
residual of any image, e.g. an FBP, is :func:`data_residual`.

Shapes and units are those of :mod:`models.physics.projector`: a single sinogram
``(n_views, n_det)`` of line integrals in, an image ``(N, N)`` of attenuation (1/mm) out
(float32). Inputs are checked before any projection: the sinogram must match the projector's
geometry, be finite and not all zero, the view count must be at least :data:`MIN_VIEWS` and
the iteration count within ``1..MAX_ITERATIONS``.

Progress: pass ``progress(iteration, total, residual)``; it is called after every iteration
with the residual of the newest iterate that is known at that point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.projector import Projector

MAX_ITERATIONS = 5000
"""Largest iteration count accepted by every method."""

MIN_VIEWS = 4
"""Smallest number of views accepted for reconstruction."""

ProgressCallback = Callable[[int, int, float], None]
"""``progress(iteration, total, residual)``, called after each iteration."""

_F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ReconstructionReport:
    """What an iterative reconstruction did and how well the result explains the data.

    Attributes:
        method: ``"sirt"``, ``"cgls"`` or ``"tv"``.
        iterations: Iterations run (fewer than asked only if CGLS converged exactly).
        residuals: ``||A x_k - y|| / ||y||`` for ``k = 0..iterations`` (``x_0`` the start).
        residual: The residual of the returned image (``residuals[-1]``).
        seconds: Wall time of the reconstruction.
        parameters: The method's parameters (JSON-serialisable values).
    """

    method: str
    iterations: int
    residuals: tuple[float, ...]
    residual: float
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reconstruction:
    """An image (1/mm, ``(N, N)``, float32) and the report of how it was made."""

    image: npt.NDArray[np.float32]
    report: ReconstructionReport


# --------------------------------------------------------------------------- checks


def _check(sinogram: npt.ArrayLike, projector: Projector, iterations: int) -> _F64:
    """Validate the inputs of a reconstruction; return the sinogram as float64."""
    if not isinstance(projector, Projector):
        raise InputRejected(f"projector must implement Projector, got {type(projector)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer):
        raise InputRejected(f"iterations must be an integer, got {iterations!r}")
    if not 1 <= int(iterations) <= MAX_ITERATIONS:
        raise InputRejected(f"iterations must be in 1..{MAX_ITERATIONS}, got {iterations}")
    geometry = projector.geometry
    if geometry.n_views < MIN_VIEWS:
        raise InputRejected(
            f"{geometry.n_views} views are too few to reconstruct; at least {MIN_VIEWS}"
        )
    y = np.asarray(sinogram)
    if y.dtype.kind not in "fiu":
        raise InputRejected(f"sinogram must hold real numbers, got dtype {y.dtype}")
    if y.shape != geometry.sinogram_shape:
        raise InputRejected(
            f"sinogram shape {y.shape} does not match the geometry's (n_views, n_det) = "
            f"{geometry.sinogram_shape}"
        )
    y = y.astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise InputRejected("sinogram contains NaN or infinity")
    if not np.any(y):
        raise InputRejected("sinogram is all zero: nothing to reconstruct")
    return y


def _finite_options(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not math.isfinite(float(value)) or float(value) <= 0:
            raise InputRejected(f"{name} must be > 0 and finite, got {value!r}")


def data_residual(image: npt.ArrayLike, sinogram: npt.ArrayLike, projector: Projector) -> float:
    """Relative data-consistency residual ``||A x - y|| / ||y||`` of any image.

    Args:
        image: Attenuation (1/mm), shape ``(N, N)``.
        sinogram: Measured line integrals, shape ``(n_views, n_det)``.
        projector: The projector ``A`` of the scan.

    Returns:
        The residual (0 = the image explains the data exactly).

    Raises:
        InputRejected: Mismatched or non-finite inputs.
    """
    y = _check(sinogram, projector, 1)
    return _relative(projector.forward(image), y)


def _relative(ax: npt.ArrayLike, y: _F64) -> float:
    return float(np.linalg.norm(np.asarray(ax, dtype=np.float64) - y) / np.linalg.norm(y))


def _inverse(values: npt.ArrayLike) -> _F64:
    """``1 / values`` where values > a tiny fraction of their maximum, else 0."""
    v = np.asarray(values, dtype=np.float64)
    positive = v > 1e-6 * float(v.max(initial=0.0))
    out = np.zeros_like(v)
    out[positive] = 1.0 / v[positive]
    return out


class _Tracker:
    """Collects residuals, calls the progress callback and times the run."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total, self.progress = total, progress
        self.residuals: list[float] = []
        self.start = time.perf_counter()

    def add(self, residual: float, iteration: int | None = None) -> None:
        self.residuals.append(residual)
        if self.progress is not None and iteration is not None:
            self.progress(iteration, self.total, residual)

    def result(self, method: str, image: _F64, parameters: dict[str, Any]) -> Reconstruction:
        report = ReconstructionReport(
            method=method,
            iterations=len(self.residuals) - 1,
            residuals=tuple(self.residuals),
            residual=self.residuals[-1],
            seconds=time.perf_counter() - self.start,
            parameters=parameters,
        )
        return Reconstruction(np.asarray(image, dtype=np.float32), report)


# --------------------------------------------------------------------------- SIRT


def sirt(
    sinogram: npt.ArrayLike,
    projector: Projector,
    iterations: int = 100,
    *,
    relaxation: float = 1.0,
    nonnegative: bool = True,
    progress: ProgressCallback | None = None,
) -> Reconstruction:
    """Simultaneous iterative reconstruction (SIRT, as ASTRA's ``SIRT``).

    ``x <- x + relaxation * C A^T R (y - A x)`` with ``R = 1 / (A 1)`` (per ray) and
    ``C = 1 / (A^T 1)`` (per pixel), from ``x = 0``; optionally clipped at 0 after each step.
    One forward and one adjoint projection per iteration, plus one for the final residual.

    Args:
        sinogram: Line integrals, shape ``(n_views, n_det)``.
        projector: Projector of the scan.
        iterations: Number of iterations, 1..:data:`MAX_ITERATIONS`.
        relaxation: Step factor in (0, 2).
        nonnegative: Clip negative attenuation to 0 after every iteration.
        progress: Optional ``progress(iteration, total, residual)``.

    Returns:
        The image (1/mm) and its report.

    Raises:
        InputRejected: Bad sinogram, projector, iteration count or relaxation.
    """
    y = _check(sinogram, projector, iterations)
    _finite_options(relaxation=relaxation)
    if relaxation >= 2.0:
        raise InputRejected(f"relaxation must be in (0, 2), got {relaxation!r}")
    n_image = projector.geometry.image_shape
    ray_weight = _inverse(projector.forward(np.ones(n_image, dtype=np.float32)))
    pixel_weight = relaxation * _inverse(projector.adjoint(np.ones(y.shape, dtype=np.float32)))
    x = np.zeros(n_image)
    tracker = _Tracker(iterations, progress)
    tracker.add(1.0)
    for k in range(int(iterations)):
        residual = y - projector.forward(x) if k else y.copy()
        if k:
            tracker.add(float(np.linalg.norm(residual) / np.linalg.norm(y)), k)
        x += pixel_weight * projector.adjoint(residual * ray_weight)
        if nonnegative:
            np.maximum(x, 0.0, out=x)
    tracker.add(_relative(projector.forward(x), y), int(iterations))
    params = {"relaxation": float(relaxation), "nonnegative": bool(nonnegative)}
    return tracker.result("sirt", x, params)


# --------------------------------------------------------------------------- CGLS


def cgls(
    sinogram: npt.ArrayLike,
    projector: Projector,
    iterations: int = 30,
    *,
    progress: ProgressCallback | None = None,
) -> Reconstruction:
    """Conjugate gradients on the normal equations ``A^T A x = A^T y`` (CGLS), from ``x = 0``.

    Unconstrained least squares; the iteration count is the regulariser (semi-convergence:
    with few views, noise grows after a few tens of iterations). Per-iteration residuals come
    from the CG recurrence; the final one is recomputed from the image. Stops early if the
    gradient vanishes.

    Args:
        sinogram: Line integrals, shape ``(n_views, n_det)``.
        projector: Projector of the scan.
        iterations: Maximum number of iterations, 1..:data:`MAX_ITERATIONS`.
        progress: Optional ``progress(iteration, total, residual)``.

    Returns:
        The image (1/mm) and its report.

    Raises:
        InputRejected: Bad sinogram, projector or iteration count.
    """
    y = _check(sinogram, projector, iterations)
    norm_y = float(np.linalg.norm(y))
    x = np.zeros(projector.geometry.image_shape)
    r = y.copy()
    s = projector.adjoint(r).astype(np.float64)
    p = s.copy()
    gamma = float(np.vdot(s, s))
    tracker = _Tracker(iterations, progress)
    tracker.add(1.0)
    done = 0
    for k in range(1, int(iterations) + 1):
        q = projector.forward(p).astype(np.float64)
        qq = float(np.vdot(q, q))
        if gamma <= 0.0 or qq <= 0.0:
            break  # A^T r = 0: x is a least-squares solution already
        alpha = gamma / qq
        x += alpha * p
        r -= alpha * q
        done = k
        if k == iterations:
            break
        tracker.add(float(np.linalg.norm(r)) / norm_y, k)
        s = projector.adjoint(r).astype(np.float64)
        gamma_next = float(np.vdot(s, s))
        p = s + (gamma_next / gamma) * p
        gamma = gamma_next
    exact = _relative(projector.forward(x), y)
    if done < len(tracker.residuals):  # stopped early: replace the recurrence's last value
        tracker.residuals.pop()
    tracker.add(exact, done)
    return tracker.result("cgls", x, {})


# --------------------------------------------------------------------------- TV (PDHG)


def _gradient(x: _F64) -> _F64:
    """Forward differences with Neumann boundary, ``(N, N)`` -> ``(2, N, N)`` (rows, cols)."""
    g = np.zeros((2, *x.shape))
    g[0, :-1] = x[1:] - x[:-1]
    g[1, :, :-1] = x[:, 1:] - x[:, :-1]
    return g


def _divergence(g: _F64) -> _F64:
    """Negative adjoint of :func:`_gradient`: ``<grad x, g> = -<x, div g>``."""
    d = np.zeros(g.shape[1:])
    d[:-1] += g[0, :-1]
    d[1:] -= g[0, :-1]
    d[:, :-1] += g[1, :, :-1]
    d[:, 1:] -= g[1, :, :-1]
    return d


def tv_pdhg(
    sinogram: npt.ArrayLike,
    projector: Projector,
    iterations: int = 300,
    *,
    tv_weight: float = 0.001,
    nonnegative: bool = True,
    initial: npt.ArrayLike | None = None,
    anchor: npt.ArrayLike | None = None,
    anchor_weight: float = 0.0,
    progress: ProgressCallback | None = None,
) -> Reconstruction:
    """Total-variation regularised reconstruction by preconditioned PDHG (Chambolle-Pock).

    Minimises ``1/2 ||A x - y||^2 + lambda TV(x) + mu/2 ||x - z||^2`` subject to ``x >= 0``
    (if ``nonnegative``), with the isotropic TV of forward pixel differences,
    ``TV(x) = sum |grad x|`` (1/mm), and ``lambda = tv_weight * mean(A^T 1)``, so that
    ``tv_weight`` does not depend on the view count or pixel size (``A^T 1`` is the summed path
    length through a pixel, mm). The last term, present only with an ``anchor`` image ``z``,
    keeps the result near a prior estimate (e.g. a network's output: a data-consistency step
    anchored to it), with ``mu = anchor_weight * mean(A^T A 1)`` on the scale of the data
    term's curvature. The operator ``K = [A; grad]`` is handled with the diagonal
    preconditioning of Pock and Chambolle (ICCV 2011, alpha = 1): dual steps ``1 / (A 1)`` per
    ray and ``1/2`` for the gradient, primal steps ``tau = 1 / (A^T 1 + 4)`` per pixel, so no
    operator norm is needed and convergence is guaranteed; the anchor enters the primal
    proximal step in closed form, ``x = (v + tau mu z) / (1 + tau mu)``, then clipped at 0. One
    forward and one adjoint projection per iteration (one more with an ``initial`` image).

    Args:
        sinogram: Line integrals, shape ``(n_views, n_det)``.
        projector: Projector of the scan.
        iterations: Number of iterations, 1..:data:`MAX_ITERATIONS`.
        tv_weight: Regularisation strength relative to ``mean(A^T 1)``, > 0.
        nonnegative: Constrain the attenuation to be >= 0.
        initial: Starting image (1/mm, the projector's image shape); zeros if ``None``.
        anchor: Prior image ``z`` (1/mm, the image shape), needed when ``anchor_weight > 0``.
        anchor_weight: ``mu`` relative to ``mean(A^T A 1)``, >= 0 (0: no anchor term).
        progress: Optional ``progress(iteration, total, residual)``.

    Returns:
        The image (1/mm, >= 0 if ``nonnegative``) and its report.

    Raises:
        InputRejected: Bad sinogram, projector, iteration count, weights, or an initial or
            anchor image of the wrong shape or not finite.
    """
    y = _check(sinogram, projector, iterations)
    _finite_options(tv_weight=tv_weight)
    if (
        isinstance(anchor_weight, bool)
        or not math.isfinite(float(anchor_weight))
        or anchor_weight < 0.0
        or (anchor_weight > 0.0 and anchor is None)
    ):
        raise InputRejected(
            f"anchor_weight must be >= 0 and needs an anchor image, got {anchor_weight!r}"
        )
    norm_y = float(np.linalg.norm(y))
    shape = projector.geometry.image_shape
    column_sums = projector.adjoint(np.ones(y.shape, dtype=np.float32)).astype(np.float64)
    lam = float(tv_weight) * float(column_sums.mean())
    row_sums = projector.forward(np.ones(shape, dtype=np.float32))
    sigma = _inverse(row_sums)
    tau = 1.0 / (np.maximum(column_sums, 0.0) + 4.0)
    mu, z = 0.0, np.zeros(shape)
    if anchor_weight > 0.0 and anchor is not None:
        curvature = float(projector.adjoint(row_sums).astype(np.float64).mean())
        mu, z = float(anchor_weight) * curvature, _image(anchor, shape, "anchor")
    x = np.zeros(shape) if initial is None else _image(initial, shape, "initial")
    x_bar = x.copy()
    ax_prev = np.zeros(y.shape) if initial is None else projector.forward(x).astype(np.float64)
    p, q = np.zeros(y.shape), np.zeros((2, *shape))
    tracker = _Tracker(iterations, progress)
    tracker.add(_relative(ax_prev, y) if initial is not None else 1.0)
    for k in range(int(iterations)):
        ax_bar = projector.forward(x_bar).astype(np.float64) if k else ax_prev.copy()
        if k:  # x_bar = 2 x_k - x_{k-1}, so A x_k = (A x_bar + A x_{k-1}) / 2
            ax_k = 0.5 * (ax_bar + ax_prev)
            tracker.add(float(np.linalg.norm(ax_k - y)) / norm_y, k)
            ax_prev = ax_k
        p = (p + sigma * (ax_bar - y)) / (1.0 + sigma)
        q += 0.5 * _gradient(x_bar)
        q /= np.maximum(1.0, np.sqrt(np.sum(q * q, axis=0)) / lam)[None]
        x_next = x - tau * (projector.adjoint(p).astype(np.float64) - _divergence(q))
        if mu:
            x_next = (x_next + tau * mu * z) / (1.0 + tau * mu)
        if nonnegative:
            np.maximum(x_next, 0.0, out=x_next)
        x_bar = 2.0 * x_next - x
        x = x_next
    tracker.add(_relative(projector.forward(x), y), int(iterations))
    params = {
        "tv_weight": float(tv_weight),
        "lambda": lam,
        "nonnegative": bool(nonnegative),
        "warm_start": initial is not None,
        "anchor_weight": float(anchor_weight),
        "mu": mu,
    }
    return tracker.result("tv", x, params)


def _image(values: npt.ArrayLike, shape: tuple[int, ...], name: str) -> _F64:
    """``values`` as a finite float64 image of ``shape``, else :class:`InputRejected`."""
    image = np.asarray(values, dtype=np.float64)
    if image.shape != tuple(shape) or not np.isfinite(image).all():
        raise InputRejected(
            f"{name} image must be finite with the projector's image shape {tuple(shape)}, "
            f"got {image.shape}"
        )
    return image.copy()
