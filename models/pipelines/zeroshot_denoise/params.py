"""Parameters of ``zeroshot-denoise`` (torch-free, used by the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ZeroShotDenoiseParams(BaseModel):
    """Validated parameters of the zero-shot denoiser.

    ``slice_split`` fits a network that predicts each slice from its ``context_slices``
    neighbours on either side; ``pair_split`` fits the ZS-N2N pair-downsampling CNN on each
    slice with its neighbours as extra channels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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
