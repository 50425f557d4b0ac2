"""Parameters of ``zeroshot-denoise`` (torch-free, used by the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ZeroShotDenoiseParams(BaseModel):
    """Validated parameters of the zero-shot denoiser.

    The denoiser fits one small CNN per scan with the ZS-N2N pair-downsampling loss on
    random crops of random slices, each slice seen with ``context_slices`` neighbours on
    either side as extra input channels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    context_slices: int = Field(
        1, ge=0, le=3, description="neighbouring slices on each side given to the network"
    )
    max_iterations: int = Field(1200, ge=10, le=20000, description="upper bound on optimiser steps")
    min_iterations: int = Field(
        300, ge=0, le=20000, description="steps before early stopping may trigger"
    )
    plateau_patience: int = Field(
        200,
        ge=10,
        le=5000,
        description="stop when the smoothed loss has not improved by plateau_tolerance "
        "for this many steps",
    )
    plateau_tolerance: float = Field(
        0.002, ge=0.0, le=0.5, description="relative improvement counted as progress"
    )
    learning_rate: float = Field(1e-3, gt=0.0, le=0.1)
    features: int = Field(48, ge=8, le=256, description="hidden channels of the CNN")
    crop_size: int = Field(128, ge=32, le=1024, description="training crop side, pixels")
    batch_size: int = Field(8, ge=1, le=128, description="crops per optimiser step")
    inference_batch: int = Field(4, ge=1, le=256, description="slices per inference batch")
    seed: int = Field(0, ge=0, description="seed of every random choice (deterministic)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available, else CPU"
    )
