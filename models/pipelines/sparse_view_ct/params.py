"""Parameters of ``sparse-view-ct`` (torch-free, used by the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LEARNED_WEIGHTS: str | None = None
"""Weights of the learned post-processing network, relative to ``models``; ``None`` until a
trained file is shipped and registered (``method="learned"`` is refused until then)."""

DEFAULT_ITERATIONS: dict[str, int] = {"sirt": 200, "cgls": 12, "tv": 200}
"""Iterations used when ``iterations`` is not given (CGLS semi-converges: few iterations)."""

Method = Literal["fbp", "sirt", "cgls", "tv", "learned"]


class SparseViewCTParams(BaseModel):
    """Validated parameters of the sparse-view CT simulation and reconstruction.

    Every slice of the input (HU) is converted to attenuation, forward-projected with a 360
    degree fan-beam scan of ``views`` source positions, given Poisson noise of ``i0`` photons
    per detector bin and view (fixed ``seed``), and reconstructed with ``method``. Geometry
    fields left unset are scaled to the slice's field of view (see ``acquisition``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field(
        "tv",
        description="fbp: filtered backprojection; sirt / cgls: iterative least squares; "
        "tv: total-variation regularised (Chambolle-Pock) with non-negativity; learned: the "
        "trained post-processing network (refused until its weights exist)",
    )
    views: int = Field(60, ge=4, le=4096, description="source positions over 360 degrees")
    iterations: int | None = Field(
        None,
        ge=1,
        le=2000,
        description="iterations of sirt/cgls/tv; unset: sirt 200, cgls 12, tv 200",
    )
    filter_name: Literal["ram-lak", "shepp-logan", "cosine", "hann"] = Field(
        "ram-lak", description="FBP filter (the fbp method and the FBP shown for comparison)"
    )
    tv_weight: float = Field(
        0.002,
        gt=0.0,
        le=1.0,
        description="tv: regularisation strength relative to the mean summed path length",
    )
    nonnegative: bool = Field(True, description="sirt/tv: keep attenuation >= 0")
    i0: float = Field(1e5, ge=1e2, le=1e9, description="incident photons per detector bin and view")
    seed: int = Field(0, ge=0, description="seed of the Poisson noise (deterministic)")
    detector: Literal["equiangular", "flat"] = Field(
        "equiangular", description="curved (equiangular, as clinical scanners) or flat"
    )
    source_to_isocentre_mm: float | None = Field(
        None,
        gt=0.0,
        le=20000.0,
        description="source to rotation centre, mm; unset: twice the slice's half diagonal",
    )
    source_to_detector_mm: float | None = Field(
        None,
        gt=0.0,
        le=40000.0,
        description="source to detector centre, mm; unset: twice source_to_isocentre_mm",
    )
    n_detectors: int | None = Field(
        None, ge=8, le=16384, description="detector bins; unset: the fewest that cover the slice"
    )
    detector_bins_per_pixel: int = Field(
        2, ge=1, le=4, description="bins per pixel width at the isocentre (sets the bin pitch)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available, else CPU"
    )

    @field_validator("method")
    @classmethod
    def _learned_needs_weights(cls, value: str) -> str:
        if value == "learned" and LEARNED_WEIGHTS is None:
            raise ValueError(
                "method='learned' needs trained sparse-view-ct weights and none are shipped "
                "yet (train with `voxelgate train sparse-view-ct`, then register the weights "
                "file and its sha256 in models/registry.py); use fbp, sirt, cgls or tv"
            )
        return value

    def resolved_iterations(self) -> int:
        """Iterations of the chosen iterative method (0 for ``fbp``)."""
        if self.method not in DEFAULT_ITERATIONS:
            return 0
        return self.iterations if self.iterations is not None else DEFAULT_ITERATIONS[self.method]
