"""Run one pipeline on its inputs: load -> validate -> compute -> write outputs atomically.

Used by the CLI and by the queue workers; it holds no transport-specific logic. The main input
(the pipeline's first InputSpec) gives the geometry and DICOM template of the outputs; extra
inputs (:mod:`service.jobs.inputs`, e.g. a ``reference`` CT) are read by the same loader, checked
against their InputSpec and passed to the pipeline under their names. Every input's series UID
ends up in the provenance's ``input_uids``.

A declared modality (CLI ``--modality``; the worker passes the modality stored with an uploaded
NIfTI series) is applied by the loader with
:func:`~service.io.read_any.declare_modality`: a file read as ``"OT"`` takes it (a CT gets
``units="HU"``), a file naming another modality is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import InputRejected, PipelineFailed, VoxelgateError
from models.registry import PipelineSpec, all_specs, get_spec, load_pipeline, validate_params
from models.result import ProgressCallback, Result
from models.sinogram import Sinogram
from models.volume import Volume
from service.io.outputs import write_outputs
from service.io.read_any import LoadedInput, read_volume
from service.io.sinogram import find_bundle_json, read_sinogram
from service.jobs.inputs import check_extra_modality, check_extra_names


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
        extra_inputs: The pipeline's other inputs by name (e.g. ``{"reference": path}``), any
            format :func:`~service.io.read_any.read_volume` reads, one series each. Nothing is
            derived from them, so an empty StudyInstanceUID is accepted there.
        modality: Declared modality of the main input (e.g. ``"CT"``: its values are HU);
            ``None``: as its file says.
        extra_modalities: Declared modality of extra inputs, by name (absent: as the file says).
    """

    pipeline: str
    input_path: Path
    output_dir: Path
    params: Mapping[str, Any]
    series_uid: str | None = None
    allow_missing_study_uid: bool = False
    study_uid: str | None = None
    extra_inputs: Mapping[str, Path] = field(default_factory=dict)
    modality: str | None = None
    extra_modalities: Mapping[str, str] = field(default_factory=dict)


def _undeclared_hint(loaded: LoadedInput) -> str:
    """How to declare the modality of an "OT" input whose format records none (else ``""``)."""
    if loaded.volume.modality != "OT" or loaded.kind == "dicom":
        return ""
    kind = "NIfTI" if loaded.kind == "nifti" else "NRRD/MetaImage"
    return (
        f"; a {kind} file records no modality (a NIfTI does only when voxelgate wrote it): "
        "declare it if its values are HU, e.g. 'voxelgate run ... --modality CT', or upload "
        "it with nifti_modality=CT"
    )


def _check_modality(spec: PipelineSpec, loaded: LoadedInput) -> None:
    accepted = spec.inputs[0].modalities
    modality = loaded.volume.modality
    if modality not in accepted:
        raise InputRejected(
            f"{spec.name} accepts modalities {', '.join(accepted)}, the input is {modality!r}"
            f"{_undeclared_hint(loaded)}"
        )


def run_local(job: LocalJob, progress: ProgressCallback) -> dict[str, Any]:
    """Execute ``job`` and return the content of its ``result.json``.

    Raises:
        UnknownPipeline, InvalidParameters, InputRejected: Before any heavy work.
        PipelineFailed: When the computation itself raised an unexpected error.
    """
    spec = get_spec(job.pipeline)
    params = validate_params(spec, job.params)
    check_extra_names(spec, job.extra_inputs)
    if Path(job.input_path).exists() and find_bundle_json(job.input_path) is not None:
        return _run_sinogram(spec, params, job, progress)
    loaded = read_volume(
        job.input_path, job.series_uid, job.allow_missing_study_uid, modality=job.modality
    )
    template = loaded.dicom.template if loaded.dicom is not None else None
    if job.study_uid and template is not None and not str(template.get("StudyInstanceUID", "")):
        template.StudyInstanceUID = job.study_uid
    _check_modality(spec, loaded)
    inputs = {spec.inputs[0].name: loaded.volume, **_read_extras(spec, job)}
    result = _compute(spec, inputs, params, progress)
    return write_outputs(result, job.output_dir, loaded.dicom)


def _read_extras(spec: PipelineSpec, job: LocalJob) -> dict[str, Volume]:
    """Read and check each extra input (names were checked before anything was read)."""
    paths = job.extra_inputs
    volumes = {}
    for item in check_extra_names(spec, paths):
        declared = job.extra_modalities.get(item.name)
        try:
            loaded = read_volume(
                paths[item.name], None, allow_missing_study_uid=True, modality=declared
            )
        except InputRejected as exc:
            raise InputRejected(f"input {item.name!r}: {exc}") from None
        try:
            check_extra_modality(spec, item, loaded.volume.modality, f"{paths[item.name]}")
        except InputRejected as exc:
            raise InputRejected(f"{exc}{_undeclared_hint(loaded)}") from None
        volumes[item.name] = loaded.volume
    return volumes


def _input_uid(value: Volume | Sinogram) -> str:
    meta = value.meta or {}
    return str(meta.get("series_instance_uid") or meta.get("source_file") or "")


def _units_notes(inputs: Mapping[str, Any]) -> str:
    """What the loaders noted about the inputs' units (e.g. a CT without HU calibration)."""
    notes = [
        f"input {name!r}: {value.meta['units_note']}"
        for name, value in inputs.items()
        if isinstance(value, Volume) and value.meta.get("units_note")
    ]
    return "; ".join(notes)


def _compute(
    spec: PipelineSpec, inputs: Mapping[str, Any], params: Any, progress: ProgressCallback
) -> Result:
    """Run the pipeline; add every input's UID to the provenance.

    An :class:`InputRejected` from the pipeline gets the loaders' units notes appended (so
    "needs HU" names the series that has no Rescale Slope/Intercept), unless it says them.
    """
    run = load_pipeline(spec)
    try:
        result = run(inputs, params, progress)
    except InputRejected as exc:
        notes = _units_notes(inputs)
        if not notes or notes in str(exc):
            raise
        raise InputRejected(f"{exc} ({notes})") from exc
    except VoxelgateError:
        raise
    except Exception as exc:  # translate once: any unexpected error is a failed pipeline
        raise PipelineFailed(f"{spec.name} failed: {type(exc).__name__}: {exc}") from exc
    uids = list(result.provenance.input_uids)
    uids += [u for u in map(_input_uid, inputs.values()) if u and u not in uids]
    if uids == result.provenance.input_uids:
        return result
    provenance = dataclasses.replace(result.provenance, input_uids=uids)
    return dataclasses.replace(result, provenance=provenance)


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
    if job.modality and job.modality.upper() != sinogram.modality:
        raise InputRejected(
            f"{job.input_path}: declared modality {job.modality.upper()}, but the sinogram "
            f"bundle's geometry JSON says {sinogram.modality}; set it there"
        )
    inputs = {"sinogram": sinogram, **_read_extras(spec, job)}
    result = _compute(spec, inputs, params, progress)
    return write_outputs(result, job.output_dir, None)
