"""Parameters of ``zeroshot-denoise`` (torch-free, used by the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.physics.fbp_filters import FilterName

MAX_SIMULATED_I0 = 1e12
"""Largest incident photon count per bin and view accepted by ``simulate_i0``."""


class ZeroShotDenoiseParams(BaseModel):
    """Validated parameters of the zero-shot denoiser.

    ``domain="image"`` denoises a reconstructed volume: ``slice_split`` fits a network that
    predicts each slice from its ``context_slices`` neighbours on either side; ``pair_split``
    fits the ZS-N2N pair-downsampling CNN on each slice with its neighbours as extra channels.
    ``domain="sinogram"`` denoises 360 degree projection data by conjugate-ray flicking, then
    reconstructs by FBP (``filter_name``); the optimiser settings (``max_iterations``,
    ``min_iterations``, ``plateau_patience``, ``learning_rate``, ``features``, ``crop_size``,
    ``batch_size``, ``seed``) apply to both domains, the ``flicking_*`` ones to the sinogram
    domain only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: Literal["image", "sinogram"] = Field(
        "image",
        description="image: denoise a reconstructed CT/MR volume; sinogram: denoise 360 "
        "degree projection data by conjugate-ray flicking, then FBP. The sinogram domain "
        "needs a full 360 degree scan, given as a sinogram bundle (geometry JSON + data "
        "file), or a CT volume with simulate_i0 set (a simulated scan of it)",
    )

    context_slices: int = Field(
        1, ge=1, le=3, description="neighbouring slices on each side given to the networks"
    )
    method: Literal["auto", "slice_split", "pair_split"] = Field(
        "auto",
        description="slice_split: learn each slice from its neighbours (Noise2Noise across "
        "slices; needs noise independent between slices and neighbours showing nearly the "
        "same anatomy); pair_split: ZS-N2N pair downsampling within each slice (needs noise "
        "independent between neighbouring pixels); auto: slice_split for CT with 3+ slices, "
        "else pair_split",
    )
    restore_detail: bool = Field(
        True,
        description="slice_split only: add back the in-plane-smoothed residual where it "
        "exceeds 4-6 robust noise deviations (structure that differs from the neighbours)",
    )
    max_iterations: int = Field(600, ge=10, le=20000, description="upper bound on optimiser steps")
    min_iterations: int = Field(
        150, ge=0, le=20000, description="steps before early stopping may trigger"
    )
    plateau_patience: int = Field(
        100,
        ge=10,
        le=5000,
        description="a plateau is this many steps without a relative improvement of "
        "plateau_tolerance; the first halves the learning rate, the second stops",
    )
    plateau_tolerance: float = Field(
        0.002, ge=0.0, le=0.5, description="relative improvement counted as progress"
    )
    learning_rate: float = Field(1e-3, gt=0.0, le=0.1)
    features: int = Field(48, ge=8, le=256, description="hidden channels of the pair-split CNN")
    split_features: int = Field(
        32, ge=8, le=256, description="hidden channels of the slice-split CNN"
    )
    crop_size: int = Field(96, ge=32, le=1024, description="training crop side, pixels")
    batch_size: int = Field(4, ge=1, le=128, description="crops per optimiser step")
    inference_batch: int = Field(4, ge=1, le=256, description="slices per inference batch")
    seed: int = Field(0, ge=0, description="seed of every random choice (deterministic)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available, else CPU"
    )
    flicking_copies: int = Field(
        16,
        ge=1,
        le=4096,
        description="sinogram domain: flicked copies (random conjugate-swap masks) in the "
        "training pool, each giving one Noise2Noise pair",
    )
    flicking_ensemble: int = Field(
        4,
        ge=1,
        le=4096,
        description="sinogram domain: copies denoised and averaged at the end (<= flicking_copies)",
    )
    filter_name: FilterName = Field(
        "ram-lak", description="sinogram domain: FBP filter of both reconstructions"
    )
    simulate_i0: float | None = Field(
        None,
        gt=0.0,
        le=MAX_SIMULATED_I0,
        description="sinogram domain with a CT volume as input (research/QA): simulate a 360 "
        "degree fan-beam scan of every slice with Poisson noise at this many incident photons "
        "per detector bin and view (fixed seed), then denoise it; outputs are labelled "
        "simulated and PSNR/SSIM against the input are reported",
    )
    simulate_views: int = Field(
        720,
        ge=16,
        le=10000,
        description="simulate_i0 only: source positions over 360 degrees",
    )

    @model_validator(mode="after")
    def _check_domain(self) -> ZeroShotDenoiseParams:
        if self.flicking_ensemble > self.flicking_copies:
            raise ValueError(
                f"flicking_ensemble ({self.flicking_ensemble}) must not exceed flicking_copies "
                f"({self.flicking_copies})"
            )
        if self.simulate_i0 is not None and self.domain != "sinogram":
            raise ValueError(
                "simulate_i0 simulates projection data for domain='sinogram'; set "
                "domain='sinogram' or leave simulate_i0 unset"
            )
        return self
