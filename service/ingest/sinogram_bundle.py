"""Find sinogram bundles in an upload and scan them (headers only, no values loaded).

A bundle is a geometry JSON (``"format": "voxelgate-sinogram/1"``, schema
:class:`models.sinogram.SinogramSpec`) and the data file its ``data`` field names, anywhere in
the same upload (zip members or multipart parts, matched by file name). Each bundle becomes one
study with one series of kind ``"sinogram"`` holding two instances, the JSON and the data; all
UIDs are derived from the content (the same bundle uploaded twice is a duplicate). Projection
data carry no patient attributes.

The stored JSON is rewritten so that its ``data`` names the stored data file
(``<derived UID><suffix>``): the series folder is then a bundle that
:func:`service.io.sinogram.read_sinogram` reads as it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.errors import InputRejected
from models.provenance import file_sha256
from service.ingest.scan import ScannedFile, derive_uid, upload_label
from service.io.sinogram import DATA_SUFFIXES, check_data_file, is_bundle_json, read_spec
from service.store.blobs import instance_file_name


def _suffix(name: str) -> str:
    lower = name.lower()
    return next(s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if lower.endswith(s))


def _geometry_summary(spec: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    sizes = dict(zip(spec.axes, shape, strict=True))
    return {
        "kind": "sinogram",
        "beam": spec.beam,
        "quantity": spec.quantity,
        "slices": int(sizes.get("slices", 1)),
        "views": int(sizes["views"]),
        "detectors": int(sizes["detectors"]),
        "arc_deg": spec.angles.stop_deg,
    }


def split_sinogram_bundles(files: Sequence[Path]) -> tuple[list[ScannedFile], list[Path]]:
    """Scan the upload's sinogram bundles and return the files that are not part of one.

    Args:
        files: The staged files of one upload.

    Returns:
        ``(scanned bundle files, the other files)``: two :class:`ScannedFile` per bundle (JSON
        first), and the files left for the DICOM/NIfTI scan, in upload order.

    Raises:
        InputRejected: A geometry JSON that breaks the schema, names a data file the upload
            does not hold (or holds twice), a data file that is unreadable, too large or of
            another shape than the JSON says; each message names the upload file.
    """
    jsons = [f for f in files if is_bundle_json(Path(f))]
    if not jsons:
        return [], list(files)
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(Path(upload_label(Path(f))).name, []).append(Path(f))
    used: set[Path] = set()
    scanned: list[ScannedFile] = []
    for json_path in jsons:
        label = upload_label(json_path)
        spec = read_spec(json_path)
        matches = [p for p in by_name.get(spec.data, []) if p not in jsons]
        if len(matches) != 1:
            found = "is not in the upload" if not matches else f"is in it {len(matches)} times"
            raise InputRejected(f"{label}: its data file {spec.data!r} {found}")
        data = matches[0]
        if data in used:
            raise InputRejected(f"{label}: data file {spec.data!r} belongs to another bundle")
        shape = check_data_file(data, spec)
        used |= {json_path, data}
        suffix = _suffix(data.name)
        data_sha = file_sha256(data)
        data_uid = derive_uid("sinogram-instance", data_sha)
        content = json.loads(json_path.read_text(encoding="utf-8"))
        content["data"] = instance_file_name(data_uid, suffix)
        json_path.write_text(json.dumps(content, indent=2, sort_keys=True), encoding="utf-8")
        json_sha = file_sha256(json_path)
        study_uid = derive_uid("sinogram-study", json_sha)
        series_uid = derive_uid("sinogram-series", json_sha)
        summary = _geometry_summary(spec, shape)
        common: dict[str, Any] = {
            "kind": "sinogram",
            "study_uid": study_uid,
            "series_uid": series_uid,
            "derived": {"study", "series", "instance"},
            "modality": spec.modality,
            "description": (spec.description or f"sinogram {Path(label).name}")[:64],
            "sinogram_geometry": summary,
        }
        scanned.append(
            ScannedFile(
                path=json_path,
                label=label,
                size=json_path.stat().st_size,
                sha256=json_sha,
                sop_instance_uid=derive_uid("sinogram-instance", json_sha),
                stored_suffix=".json",
                **common,
            )
        )
        scanned.append(
            ScannedFile(
                path=data,
                label=upload_label(data),
                size=data.stat().st_size,
                sha256=data_sha,
                sop_instance_uid=data_uid,
                stored_suffix=suffix,
                **common,
            )
        )
    return scanned, [Path(f) for f in files if Path(f) not in used]
