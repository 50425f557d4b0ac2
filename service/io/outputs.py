"""Write a pipeline Result to an output folder: NIfTI, derived DICOM, SEG, SR, result.json, PNGs.

The folder appears complete or not at all (it is assembled in a temporary sibling and
renamed). ``result.json`` lists every file with its sha256 and the provenance record.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from models.errors import PipelineFailed
from models.provenance import file_sha256
from models.result import Result
from service.io.atomic import atomic_dir
from service.io.dicom_derived import write_derived_series
from service.io.dicom_seg import write_dicom_seg
from service.io.dicom_series import DicomSeries
from service.io.dicom_sr import write_measurement_sr
from service.io.nifti import write_nifti
from service.io.png import write_png


def _write_volumes(result: Result, folder: Path, source: DicomSeries | None) -> None:
    prov = result.provenance
    for name, volume in result.volumes.items():
        write_nifti(volume, folder / f"{name}.nii.gz")
        if source is None:
            continue
        write_derived_series(
            volume,
            source.template,
            source.sop_instance_uids,
            str(source.template.get("SOPClassUID", "")),
            folder / "dicom" / name,
            series_description=f"{name} ({prov.pipeline} {prov.version})"[:64],
            derivation_description=(
                f"voxelgate {prov.pipeline} {prov.version}, weights {prov.weights_sha256[:16]}, "
                f"code {prov.code_version}"
            )[:1024],
        )


def _write_label_maps(result: Result, folder: Path, source: DicomSeries | None) -> None:
    """Per label map: NIfTI + label table JSON; with a DICOM source also SEG and SR.

    SEG and SR are each a one-instance series in their own folder under ``dicom/`` (like the
    derived series), so the job runner zips and delivers them as it does every DICOM series.
    """
    prov = result.provenance
    series = {f"{n}_{kind}" for n in result.label_maps for kind in ("seg", "sr")}
    clash = (set(result.label_maps) | series) & set(result.volumes)
    if clash:
        raise PipelineFailed(f"volume names clash with label-map outputs: {sorted(clash)}")
    for name, label_map in result.label_maps.items():
        write_nifti(label_map, folder / f"{name}.nii.gz")
        table = {"label_map": f"{name}.nii.gz", "labels": label_map.label_table()}
        (folder / f"{name}_labels.json").write_text(json.dumps(table, indent=2), "utf-8")
        if source is None:
            continue
        weights = prov.weights_sha256 if prov.weights_sha256 != "none" else None
        seg = write_dicom_seg(
            label_map,
            source,
            prov.pipeline,
            prov.version,
            folder / "dicom" / f"{name}_seg" / f"{name}_seg.dcm",
            weights_sha256=weights,
            series_description=f"{name} ({prov.pipeline} {prov.version})",
        )
        write_measurement_sr(
            label_map,
            source,
            prov.pipeline,
            prov.version,
            folder / "dicom" / f"{name}_sr" / f"{name}_sr.dcm",
            segmentation=seg,
            weights_sha256=weights,
        )


def _label_records(result: Result) -> dict[str, Any]:
    """result.json entry: per label map, per label name: value, voxel count, volume (mL)."""
    return {
        name: {
            label: {"value": v.value, "voxel_count": v.voxel_count, "volume_ml": v.volume_ml}
            for label, v in label_map.volumes_ml().items()
        }
        for name, label_map in result.label_maps.items()
    }


def write_outputs(result: Result, out_dir: Path, source: DicomSeries | None) -> dict[str, Any]:
    """Write every output of ``result`` into ``out_dir`` atomically.

    Args:
        result: Pipeline result.
        out_dir: Destination folder (replaced if it exists, only once complete).
        source: The DICOM series the input came from, if any; then each output volume is also
            written as a derived DICOM series under ``dicom/<name>/``, and each label map as a
            DICOM SEG ``dicom/<name>_seg/<name>_seg.dcm`` and a TID 1500 SR
            ``dicom/<name>_sr/<name>_sr.dcm`` (one folder per series).
            Label maps are always written as ``<name>.nii.gz`` (integer) with their label table
            in ``<name>_labels.json``.

    Returns:
        The content of ``result.json``.
    """
    with atomic_dir(out_dir) as tmp:
        _write_volumes(result, tmp, source)
        _write_label_maps(result, tmp, source)
        for figure in result.figures:
            write_png(figure.rgb, tmp / f"{figure.name}.png")
        files = {
            str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        record = {
            "provenance": dataclasses.asdict(result.provenance),
            "measurements": result.measurements,
            "figures": {f.name: f.caption for f in result.figures},
            **({"label_maps": _label_records(result)} if result.label_maps else {}),
            "files": files,
        }
        (tmp / "result.json").write_text(json.dumps(record, indent=2, sort_keys=True), "utf-8")
    return record
