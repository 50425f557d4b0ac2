"""Parameters of ``sparse-view-ct`` (torch-free, used by the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LEARNED_WEIGHTS: str | None = "weights/sparse_view_ct/gloredi_sparse_view_fp16.pt"
"""Weights of the learned post-processing network, relative to ``models`` (made by
``voxelgate train sparse-view-ct --steps 4500``; see the model card); ``None`` refuses
``method="learned"``."""

DEFAULT_ITERATIONS: dict[str, int] = {"sirt": 200, "cgls": 12, "tv": 200}
"""Iterations used when ``iterations`` is not given (CGLS semi-converges: few iterations)."""

DC_ITERATIONS = 200
"""Iterations of the data-consistency step of ``learned`` (see :data:`DC_DEFAULTS`)."""

DC_DEFAULTS: dict[str, float] = {"tv_weight": 0.0002, "anchor_weight": 0.0001}
"""Data-consistency step of ``learned`` (tuned on held-out OpenKBP validation patients
pt_210-213 at 18/36/60 views, not on the patients the benchmark reports; see the model card):
a TV ten times weaker than ``tv``'s default, the network output as start and anchor."""

Method = Literal["auto", "fbp", "sirt", "cgls", "tv", "learned"]

DEFAULT_METHOD: Method = "auto"
"""``auto``: ``learned`` (with its data-consistency step) for image inputs when the weights are
shipped, else ``tv``; ``tv`` for projection data (``learned`` is refused there). On held-out
slices ``learned`` beats ``tv`` at its default weight at 18-90 views (see the model card)."""


def resolve_method(method: str, projection_data: bool) -> str:
    """The method ``auto`` stands for (see :data:`DEFAULT_METHOD`); other methods unchanged.

    Args:
        method: The ``method`` parameter.
        projection_data: Whether the input is a sinogram bundle.
    """
    if method != "auto":
        return method
    return "learned" if LEARNED_WEIGHTS is not None and not projection_data else "tv"


class SparseViewCTParams(BaseModel):
    """Validated parameters of sparse-view CT reconstruction.

    Three inputs (issue 5): (a) a sinogram bundle (measured or simulated projection data with
    its geometry JSON): reconstructed with ``method`` from all its views, or from every
    ``view_stride``-th view (retrospective sparse view; the all-view FBP is then the reference
    of the reported PSNR/SSIM); (b) ``input_kind="full-dose-ct"``: every slice (HU) is
    converted to attenuation, forward-projected with a 360 degree fan-beam scan of ``views``
    source positions, given Poisson noise of ``i0`` photons per detector bin and view (fixed
    ``seed``) and reconstructed; (c) ``input_kind="sparse-view-fbp"``: the input already is an
    FBP series from ``views`` views and is post-processed by the learned network. Geometry
    fields left unset follow ``scanner`` (see ``acquisition``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field(
        DEFAULT_METHOD,
        description="auto: learned for image inputs (tv without weights), tv for projection "
        "data; fbp: filtered backprojection; sirt / cgls: iterative least squares; "
        "tv: total-variation regularised (Chambolle-Pock) with non-negativity; learned: the "
        "trained post-processing network, then a data-consistency step on simulated scans "
        "(refused until its weights exist)",
    )
    input_kind: Literal["full-dose-ct", "sparse-view-fbp"] = Field(
        "full-dose-ct",
        description="image inputs: full-dose-ct simulates a sparse-view scan of it (the input "
        "is the reference); sparse-view-fbp post-processes an FBP series reconstructed from "
        "`views` views (method learned only). Sinogram bundles ignore it.",
    )
    views: int = Field(
        60,
        ge=4,
        le=4096,
        description="source positions over 360 degrees (simulation), or the views the "
        "sparse-view FBP input was made from",
    )
    view_stride: int = Field(
        1,
        ge=1,
        le=64,
        description="sinogram input: reconstruct from every view_stride-th view (must divide "
        "the number of views); the all-view FBP becomes the reference of PSNR/SSIM",
    )
    scanner: Literal["auto", "scaled", "clinical"] = Field(
        "auto",
        description="simulation geometry when distances are unset: scaled (source at twice "
        "the slice's half diagonal), clinical (595 / 1085.6 mm, the scanner the learned "
        "network was trained with); auto: clinical for learned, else scaled",
    )
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
    nonnegative: bool = Field(True, description="sirt/tv/learned: keep attenuation >= 0")
    data_consistency: Literal["tv", "none"] = Field(
        "tv",
        description="learned on a simulated scan: tv finishes with dc_iterations of "
        "TV-regularised least squares started from and anchored to the network output "
        "(tv_pdhg with anchor); none returns the network output. Needs projection data: "
        "sparse-view-fbp input has none",
    )
    dc_iterations: int = Field(
        DC_ITERATIONS, ge=1, le=2000, description="learned: data-consistency iterations"
    )
    dc_tv_weight: float = Field(
        DC_DEFAULTS["tv_weight"],
        gt=0.0,
        le=1.0,
        description="learned: TV strength of the data-consistency step (as tv_weight)",
    )
    dc_anchor_weight: float = Field(
        DC_DEFAULTS["anchor_weight"],
        ge=0.0,
        le=1e3,
        description="learned: pull towards the network output, relative to mean(A^T A 1)",
    )
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
        """Iterations of the chosen iterative method or data-consistency step (0 for ``fbp``)."""
        if self.method == "learned":
            return self.dc_iterations if self.data_consistency == "tv" else 0
        if self.method not in DEFAULT_ITERATIONS:
            return 0
        return self.iterations if self.iterations is not None else DEFAULT_ITERATIONS[self.method]
