"""The pipeline registry: the single, torch-free source of truth for what can be run.

Adding a pipeline is adding a :class:`PipelineSpec` to ``_SPECS``. Listing the registry or
validating parameters imports neither torch nor the pipeline code; only :func:`load_pipeline`
imports the factory module, on a worker or in the CLI.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ValidationError

from models.errors import InvalidParameters, UnknownPipeline
from models.pipelines.cbct_to_sct.params import LEARNED_WEIGHTS as CBCT_TO_SCT_WEIGHTS
from models.pipelines.cbct_to_sct.params import CBCTToSCTParams
from models.pipelines.segment.params import SegmentParams
from models.pipelines.sparse_view_ct.params import LEARNED_WEIGHTS, SparseViewCTParams
from models.pipelines.zeroshot_denoise.params import ZeroShotDenoiseParams
from models.provenance import code_version, file_sha256
from models.result import ProgressCallback, Provenance, Result
from models.sinogram import Sinogram
from models.volume import Volume

PipelineFn = Callable[[Mapping[str, Volume | Sinogram], Any, ProgressCallback], Result]
"""``run(inputs, params, progress) -> Result``: the signature every factory returns."""

Queue = Literal["gpu", "cpu"]
"""Worker queues: ``gpu`` for pipelines that benefit from CUDA, ``cpu`` for the rest."""
QUEUES: tuple[str, ...] = get_args(Queue)
IO_QUEUE = "io"
"""Queue of network work that needs no torch: deliveries to DICOM nodes, PACS cohort fetches."""
WORKER_QUEUES: tuple[str, ...] = (*QUEUES, IO_QUEUE)
"""Every queue a worker can serve (``voxelgate serve`` runs one worker on all of them)."""

CARDS_DIR = Path(__file__).resolve().parent / "cards"


@dataclass(frozen=True)
class InputSpec:
    """One named input of a pipeline.

    Attributes:
        name: Key in the ``inputs`` mapping.
        modalities: Accepted DICOM modalities (e.g. ``("CT", "MR")``).
        description: What the input must be.
        required: False for an optional input (e.g. a reference for evaluation); the first
            input of every pipeline is required.
    """

    name: str
    modalities: tuple[str, ...]
    description: str
    required: bool = True


@dataclass(frozen=True)
class PipelineSpec:
    """Registry record of one pipeline.

    Attributes:
        name: Unique kebab-case name used by the CLI and the API.
        version: Semantic version of code + weights; bump when either changes.
        summary: One line for listings.
        inputs: Named inputs.
        outputs: Names of the output volumes in the Result.
        queue: Worker queue: ``"gpu"`` if it benefits from CUDA, else ``"cpu"``.
        params_model: Pydantic model validating the parameters (torch-free).
        factory: ``"module:function"`` returning a :data:`PipelineFn`.
        model_card: File name in ``models/cards``.
        weights: Path of the weights file relative to the repository's ``models`` package, or
            ``None`` for a weight-free pipeline.
        time_limit_s: Hard time limit for one job, seconds.
        sinogram_input: What projection data the pipeline accepts instead of its image input
            (passed as ``inputs["sinogram"]``, a :class:`~models.sinogram.Sinogram`), or
            ``None`` when it takes images only.
    """

    name: str
    version: str
    summary: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    queue: Queue
    params_model: type[BaseModel]
    factory: str
    model_card: str
    weights: str | None = None
    time_limit_s: int = 3600
    sinogram_input: str | None = None

    def card_text(self) -> str:
        """Return the model card (Markdown)."""
        return (CARDS_DIR / self.model_card).read_text(encoding="utf-8")

    def weights_sha256(self) -> str:
        """Return the sha256 of the weights file, or ``"none"`` for weight-free pipelines."""
        if self.weights is None:
            return "none"
        return file_sha256(Path(__file__).resolve().parent / self.weights)


_SPECS: tuple[PipelineSpec, ...] = (
    PipelineSpec(
        name="zeroshot-denoise",
        version="1.1.0",
        summary=(
            "Self-supervised single-scan denoising (ZS-N2N-style pair downsampling, "
            "neighbouring-slice context, early stopping; or, domain=sinogram, conjugate-ray "
            "flicking of a 360 degree sinogram, then FBP); no training data, no weights."
        ),
        inputs=(InputSpec("image", ("CT", "MR", "OT"), "a CT (HU) or MR volume"),),
        outputs=("denoised", "fbp"),
        queue="gpu",
        params_model=ZeroShotDenoiseParams,
        factory="models.pipelines.zeroshot_denoise.pipeline:run",
        model_card="zeroshot_denoise.md",
        time_limit_s=3600,
        sinogram_input="domain=sinogram only: a sinogram bundle (geometry JSON + npy/TIFF/NIfTI) "
        "of a full 360 degree parallel- or fan-beam scan (conjugate-ray flicking needs every "
        "ray measured twice); outputs denoised (flicking + FBP) and fbp (plain FBP)",
    ),
    PipelineSpec(
        name="sparse-view-ct",
        version="0.4.0",
        summary=(
            "Sparse-view CT from a sinogram bundle, a simulated fan-beam scan of a CT volume or "
            "a sparse-view FBP series: FBP, SIRT, CGLS, TV or the learned GloReDi-style "
            "network followed by a TV data-consistency step anchored to it (default for image "
            "inputs); data residual, PSNR/SSIM against the reference."
        ),
        inputs=(
            InputSpec(
                "image",
                ("CT",),
                "a full-dose CT volume in HU, square pixels (simulation), or a sparse-view FBP "
                "series (input_kind sparse-view-fbp)",
            ),
        ),
        outputs=("reconstruction",),
        queue="gpu",
        params_model=SparseViewCTParams,
        factory="models.pipelines.sparse_view_ct.pipeline:run",
        model_card="sparse_view_ct.md",
        weights=LEARNED_WEIGHTS,
        time_limit_s=3600,
        sinogram_input="a sinogram bundle (geometry JSON + npy/TIFF/NIfTI): parallel or fan "
        "beam, counts, transmission or line integrals",
    ),
    PipelineSpec(
        name="segment",
        version="1.1.0",
        summary=(
            "3D segmentation with an installed model (3D U-Net, UNet++ or DynUNet, chosen by "
            "its card): canonical orientation, card spacing, CT body crop, Gaussian sliding "
            "window streamed in bf16 (optional test-time mirroring), labels returned "
            "nearest-neighbour onto the input grid. "
            "Ships head-neck-oars-unet3d (default) and head-neck-oars-unetpp: 7 head-and-neck "
            "organs at risk on CT, trained on OpenKBP (validation mean Dice 0.71 and 0.52), "
            "and the DynUNet baseline head-neck-oars-dynunet."
        ),
        inputs=(InputSpec("image", ("CT", "MR", "OT"), "a CT (HU) or MR volume, any orientation"),),
        outputs=("segmentation",),
        queue="gpu",
        params_model=SegmentParams,
        factory="models.pipelines.segment.pipeline:run",
        model_card="segment.md",
        weights="weights/segment/head-neck-oars-unet3d/model.pt",
        time_limit_s=3600,
    ),
    PipelineSpec(
        name="cbct-to-sct",
        version="0.3.0",
        summary=(
            "Synthetic CT in HU from a cone-beam CT: the learned network (default: the 2.5D "
            "GLFC-style UNet with Mamba-2 selective-scan skips; or the plain 2.5D or 3D UNet "
            "baselines), trained on CBCT "
            "simulated from real OpenKBP head-and-neck CTs; or identity / hu-calibration "
            "(quantile matching of body HU to a reference distribution of OpenKBP training "
            "CTs); field of view estimated from the CBCT and truncation flagged; "
            "MAE/PSNR/SSIM (SynthRAD definitions) against an optional planning CT in the same "
            "frame of reference."
        ),
        inputs=(
            InputSpec(
                "image",
                ("CT",),
                "a CBCT volume in HU (DICOM series with HU rescale, or NIfTI declared HU)",
            ),
            InputSpec(
                "reference",
                ("CT",),
                "optional planning CT (same frame of reference) for evaluation",
                required=False,
            ),
        ),
        outputs=("sct", "body", "fov"),
        queue="gpu",
        params_model=CBCTToSCTParams,
        factory="models.pipelines.cbct_to_sct.pipeline:run",
        model_card="cbct_to_sct.md",
        weights=CBCT_TO_SCT_WEIGHTS,
        time_limit_s=3600,
    ),
)

_BY_NAME: dict[str, PipelineSpec] = {spec.name: spec for spec in _SPECS}


def all_specs() -> tuple[PipelineSpec, ...]:
    """Return every registered pipeline, in registration order."""
    return _SPECS


def get_spec(name: str) -> PipelineSpec:
    """Return the record for ``name``.

    Raises:
        UnknownPipeline: With the closest registered names as suggestions.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(_BY_NAME))
        raise UnknownPipeline(f"unknown pipeline {name!r}{hint} (known: {known})") from None


def validate_params(spec: PipelineSpec, raw: Mapping[str, Any]) -> BaseModel:
    """Validate raw parameters against the pipeline's model.

    Unknown keys are refused with a did-you-mean hint (a typo must not silently fall back to
    a default).

    Raises:
        InvalidParameters: Naming each bad key and why.
    """
    fields = spec.params_model.model_fields
    unknown = [k for k in raw if k not in fields]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InvalidParameters(
            f"{spec.name}: unknown parameter {', '.join(parts)}; "
            f"accepted: {', '.join(sorted(fields))}"
        )
    try:
        return spec.params_model.model_validate(dict(raw))
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidParameters(f"{spec.name}: {reasons}") from None


def load_pipeline(spec: PipelineSpec) -> PipelineFn:
    """Import and return the pipeline's run function (this may import torch)."""
    module_name, _, attr = spec.factory.partition(":")
    fn: PipelineFn = getattr(importlib.import_module(module_name), attr)
    return fn


def provenance_for(name: str, params: BaseModel, image: Volume | Sinogram) -> Provenance:
    """The provenance stamp of one run of pipeline ``name`` on ``image``.

    Args:
        name: Registry name of the pipeline that ran.
        params: Its validated parameters.
        image: The input volume (its ``series_instance_uid`` meta, if any, is recorded) or
            sinogram (its ``source_file`` name is).

    Returns:
        Pipeline name, version, weights sha256, code version, parameters and input UIDs.
    """
    spec = get_spec(name)
    return Provenance(
        pipeline=spec.name,
        version=spec.version,
        weights_sha256=spec.weights_sha256(),
        code_version=code_version(),
        parameters=params.model_dump(),
        input_uids=[str(image.meta.get("series_instance_uid", image.meta.get("source_file", "")))]
        if image.meta
        else [],
    )
