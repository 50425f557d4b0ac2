"""Run one pipeline on one input: load -> validate -> compute -> write outputs atomically.

Used by the CLI now and by the queue workers later; it holds no transport-specific logic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import InputRejected, PipelineFailed, VoxelgateError
from models.registry import PipelineSpec, all_specs, get_spec, load_pipeline, validate_params
from models.result import ProgressCallback, Result
from service.io.outputs import write_outputs
from service.io.read_any import read_volume
from service.io.sinogram import find_bundle_json, read_sinogram


@dataclass(frozen=True)
class LocalJob:
    """One pipeline run on local files.

    Attributes:
        pipeline: Registry name.
        input_path: DICOM folder/zip/file, NIfTI, NRRD or MHA; or a sinogram bundle (its
            geometry JSON, or a folder holding it) for pipelines that take projection data.
        output_dir: Destination folder (appears atomically).
        params: Raw parameters (validated against the registry before any work).
        series_uid: Series to pick when the input holds several.
        allow_missing_study_uid: Accept DICOM with an empty StudyInstanceUID.
        study_uid: StudyInstanceUID for the derived DICOM outputs when the source's is empty
            (the store's derived UID); ``None``: a new one is generated then.
    """

    pipeline: str
    input_path: Path
    output_dir: Path
    params: Mapping[str, Any]
    series_uid: str | None = None
    allow_missing_study_uid: bool = False
    study_uid: str | None = None


def _check_modality(spec: PipelineSpec, modality: str) -> None:
    accepted = spec.inputs[0].modalities
    if modality not in accepted:
        raise InputRejected(
            f"{spec.name} accepts modalities {', '.join(accepted)}, the input is {modality!r}"
        )


def run_local(job: LocalJob, progress: ProgressCallback) -> dict[str, Any]:
    """Execute ``job`` and return the content of its ``result.json``.

    Raises:
        UnknownPipeline, InvalidParameters, InputRejected: Before any heavy work.
        PipelineFailed: When the computation itself raised an unexpected error.
    """
    spec = get_spec(job.pipeline)
    params = validate_params(spec, job.params)
    if Path(job.input_path).exists() and find_bundle_json(job.input_path) is not None:
        return _run_sinogram(spec, params, job, progress)
    loaded = read_volume(job.input_path, job.series_uid, job.allow_missing_study_uid)
    template = loaded.dicom.template if loaded.dicom is not None else None
    if job.study_uid and template is not None and not str(template.get("StudyInstanceUID", "")):
        template.StudyInstanceUID = job.study_uid
    _check_modality(spec, loaded.volume.modality)
    result = _compute(spec, {spec.inputs[0].name: loaded.volume}, params, progress)
    return write_outputs(result, job.output_dir, loaded.dicom)


def _compute(
    spec: PipelineSpec, inputs: Mapping[str, Any], params: Any, progress: ProgressCallback
) -> Result:
    run = load_pipeline(spec)
    try:
        return run(inputs, params, progress)
    except VoxelgateError:
        raise
    except Exception as exc:  # translate once: any unexpected error is a failed pipeline
        raise PipelineFailed(f"{spec.name} failed: {type(exc).__name__}: {exc}") from exc


def _run_sinogram(
    spec: PipelineSpec, params: Any, job: LocalJob, progress: ProgressCallback
) -> dict[str, Any]:
    if spec.sinogram_input is None:
        takers = [s.name for s in all_specs() if s.sinogram_input is not None]
        raise InputRejected(
            f"{spec.name} takes images, not projection data; sinogram bundles are accepted by "
            f"{', '.join(takers) or 'no pipeline'}"
        )
    sinogram = read_sinogram(job.input_path)
    result = _compute(spec, {"sinogram": sinogram}, params, progress)
    return write_outputs(result, job.output_dir, None)
