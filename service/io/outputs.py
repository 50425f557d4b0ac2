"""Write a pipeline Result to an output folder: NIfTI, derived DICOM, result.json, PNGs.

The folder appears complete or not at all (it is assembled in a temporary sibling and
renamed). ``result.json`` lists every file with its sha256 and the provenance record.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from models.provenance import file_sha256
from models.result import Result
from service.io.atomic import atomic_dir
from service.io.dicom_derived import write_derived_series
from service.io.dicom_series import DicomSeries
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


def write_outputs(result: Result, out_dir: Path, source: DicomSeries | None) -> dict[str, Any]:
    """Write every output of ``result`` into ``out_dir`` atomically.

    Args:
        result: Pipeline result.
        out_dir: Destination folder (replaced if it exists, only once complete).
        source: The DICOM series the input came from, if any; then each output volume is also
            written as a derived DICOM series under ``dicom/<name>/``.

    Returns:
        The content of ``result.json``.
    """
    with atomic_dir(out_dir) as tmp:
        _write_volumes(result, tmp, source)
        for figure in result.figures:
            write_png(figure.rgb, tmp / f"{figure.name}.png")
        files = {
            str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        record = {
            "provenance": dataclasses.asdict(result.provenance),
            "measurements": result.measurements,
            "figures": {f.name: f.caption for f in result.figures},
            "files": files,
        }
        (tmp / "result.json").write_text(json.dumps(record, indent=2, sort_keys=True), "utf-8")
    return record
