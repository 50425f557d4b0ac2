"""Per-slice reconstruction with the chosen method and its data residual.

Images are attenuation (1/mm), ``(N, N)`` per slice; sinograms ``(n_views, n_det)`` of line
integrals. Every method returns ``||A x - y|| / ||y||`` of its image, computed with the same
projector ``A`` and the noisy data ``y``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from models.physics.iterative import Reconstruction, cgls, data_residual, sirt, tv_pdhg
from models.physics.projector import Projector
from models.pipelines.sparse_view_ct.params import SparseViewCTParams

SliceProgress = Callable[[float], None]
"""``progress(fraction_of_this_slice)``."""


def reconstruct_slice(
    sinogram: npt.NDArray[np.float32],
    projector: Projector,
    params: SparseViewCTParams,
    progress: SliceProgress,
) -> tuple[npt.NDArray[np.float32], float]:
    """Reconstruct one slice with ``params.method`` (``sirt``, ``cgls`` or ``tv``).

    Args:
        sinogram: Noisy line integrals, ``(n_views, n_det)``.
        projector: The scan's projector.
        params: Validated parameters (method, iterations, tv_weight, nonnegative).
        progress: Called with the fraction of this slice's iterations done.

    Returns:
        The image (1/mm, ``(N, N)``) and its residual ``||A x - y|| / ||y||``.
    """
    iterations = params.resolved_iterations()

    def report(it: int, total: int, _residual: float) -> None:
        progress(it / max(total, 1))

    rec: Reconstruction
    if params.method == "sirt":
        rec = sirt(sinogram, projector, iterations, nonnegative=params.nonnegative, progress=report)
    elif params.method == "cgls":
        rec = cgls(sinogram, projector, iterations, progress=report)
    elif params.method == "tv":
        rec = tv_pdhg(
            sinogram,
            projector,
            iterations,
            tv_weight=params.tv_weight,
            nonnegative=params.nonnegative,
            progress=report,
        )
    else:
        raise ValueError(f"reconstruct_slice handles sirt, cgls and tv, not {params.method!r}")
    return rec.image, rec.report.residual


def refine_slice(
    sinogram: npt.NDArray[np.float32],
    projector: Projector,
    prior_mu: npt.NDArray[np.float32],
    params: SparseViewCTParams,
    progress: SliceProgress,
) -> tuple[npt.NDArray[np.float32], float]:
    """The data-consistency step of ``learned``: TV least squares anchored to the network.

    ``params.dc_iterations`` of :func:`tv_pdhg` started from ``prior_mu`` with the anchor term
    ``mu/2 ||x - prior_mu||^2`` (``dc_anchor_weight``) and ``dc_tv_weight``.

    Args:
        sinogram: Noisy line integrals, ``(n_views, n_det)``.
        projector: The scan's projector.
        prior_mu: The network's image (1/mm, ``(N, N)``).
        params: Validated parameters.
        progress: Called with the fraction of this slice's iterations done.

    Returns:
        The image (1/mm, ``(N, N)``) and its residual ``||A x - y|| / ||y||``.
    """
    rec = tv_pdhg(
        sinogram,
        projector,
        params.dc_iterations,
        tv_weight=params.dc_tv_weight,
        nonnegative=params.nonnegative,
        initial=prior_mu,
        anchor=prior_mu,
        anchor_weight=params.dc_anchor_weight,
        progress=lambda it, total, _r: progress(it / max(total, 1)),
    )
    return rec.image, rec.report.residual


def residuals(
    images_mu: npt.NDArray[np.float32], sinograms: npt.NDArray[np.float32], projector: Projector
) -> list[float]:
    """``||A x_k - y_k|| / ||y_k||`` of every slice ``k`` (e.g. of the FBP images)."""
    return [data_residual(x, y, projector) for x, y in zip(images_mu, sinograms, strict=True)]
