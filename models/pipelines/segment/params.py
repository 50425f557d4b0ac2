"""Parameters of ``segment`` (torch-free, used by the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.errors import InputRejected
from models.pipelines.segment.card import MODELS_ROOT, load_card, resolve_model


def models_root(info: ValidationInfo | None = None) -> Path:
    """The models root: ``context={"models_root": path}`` of the validation, else the default.

    Tests and tools point validation at another folder with
    ``SegmentParams.model_validate(raw, context={"models_root": folder})``; the service always
    uses :data:`~models.pipelines.segment.card.MODELS_ROOT`.
    """
    context = info.context if info is not None else None
    if isinstance(context, dict) and context.get("models_root") is not None:
        return Path(context["models_root"])
    return MODELS_ROOT


class SegmentParams(BaseModel):
    """Validated parameters of the ``segment`` pipeline.

    ``model`` names an installed model (``models/weights/segment/<model>/card.json``); its card
    fixes the network, orientation, spacing, intensity handling, window and labels. Left unset,
    :data:`~models.pipelines.segment.card.DEFAULT_MODEL` is used when installed (the shipped
    ``head-neck-oars-unet3d``), else the only installed model; the run is refused when none or
    several others are installed. A named model that is not installed is refused here, listing the
    installed ones.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None,
        description="installed segmentation model (folder name under models/weights/segment); "
        "unset: the only installed model",
    )
    overlap: float = Field(
        0.5, ge=0.0, lt=1.0, description="sliding-window overlap fraction between windows"
    )
    sw_batch: int = Field(2, ge=1, le=64, description="windows per network call")
    bf16: bool = Field(
        True,
        description="bfloat16 autocast of the network (CPU, or CUDA with bf16 support); "
        "several times faster on CPU, logits still blended in float32; may move a few border "
        "voxels",
    )
    crop_body: bool = Field(
        True,
        description="CT models: run the network only inside the body's bounding box (voxels "
        "above -500 HU, opened, plus a 10 mm margin); everything outside is background",
    )
    largest_component: bool = Field(
        False, description="keep only the largest connected component of every label"
    )
    fill_holes: bool = Field(
        False, description="fill background holes enclosed by a label (3D, per label)"
    )
    mirroring: bool = Field(
        False,
        description="test-time mirroring: average the logits over the flips the model's card "
        "allows (left-right for the shipped models; 2 network passes per flipped axis)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available, else CPU"
    )

    @field_validator("model")
    @classmethod
    def _installed(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        root = models_root(info)
        try:
            name = resolve_model(value, root)
            load_card(root / name, verify_sha256=False)
        except InputRejected as exc:
            raise ValueError(str(exc)) from None
        return name

    @model_validator(mode="after")
    def _mirroring_allowed(self, info: ValidationInfo) -> SegmentParams:
        if not self.mirroring:
            return self
        root = models_root(info)
        try:
            card = load_card(root / resolve_model(self.model, root), verify_sha256=False)
        except InputRejected as exc:
            raise ValueError(str(exc)) from None
        if card.mirroring is None:
            raise ValueError(f"model {card.name}'s card allows no test-time mirroring")
        return self
