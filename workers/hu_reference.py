"""``voxelgate dataset hu-reference``: the reference HU distribution of ``hu-calibration``.

Reads the OpenKBP planning CTs of the official **training** split only
(``<src>/train-pats/pt_*/ct.nii.gz``, listed in ``<src>/splits.json``; QC-flagged cases left
out); the validation patients are the held-out test set of ``cbct-to-sct`` and are never read.
For each case the body (:func:`models.pipelines.cbct_to_sct.masks.body_mask`: above the
threshold, largest component, holes filled per axial slice) gives the HU quantiles of its
voxels at 201 levels (0, 0.5, ..., 100 %); the table is their mean over cases (the 1D
Wasserstein barycentre: a typical patient, each case weighted equally whatever its size).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidParameters

LEVELS = 201
"""Quantile levels 0, 0.5, ..., 100 %."""

SPLIT = "train-pats"
"""The only OpenKBP split read."""


def _training_cases(src: Path) -> tuple[list[Path], dict[str, str]]:
    """CT files of the training patients and the QC-flagged cases left out."""
    try:
        splits = json.loads((src / "splits.json").read_text(encoding="utf-8"))
        names = list(splits[SPLIT])
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidParameters(
            f"cannot read the {SPLIT} list of {src / 'splits.json'}: {exc}"
        ) from None
    flags = {k: v for k, v in dict(splits.get("qc_flags", {})).items() if k.startswith(SPLIT)}
    paths = [src / SPLIT / n / "ct.nii.gz" for n in names if f"{SPLIT}/{n}" not in flags]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InvalidParameters(f"{len(missing)} training CTs missing, e.g. {missing[0]}")
    return paths, flags


def build_hu_reference(
    src: Path,
    threshold_hu: float = -500.0,
    limit: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The reference table (JSON-compatible) from the OpenKBP training CTs under ``src``.

    Args:
        src: OpenKBP folder (``splits.json``, ``train-pats/``).
        threshold_hu: Body threshold (HU).
        limit: First K training cases only (0: all), for quick checks.
        log: Progress lines, or None.

    Returns:
        ``levels_pct``, ``quantiles_hu`` (mean over cases), the cases used, their voxel
        counts and the provenance of the table.
    """
    from models.pipelines.cbct_to_sct.masks import HU_LIMITS, axial_axis, body_mask
    from service.io.nifti import read_nifti

    paths, flags = _training_cases(src)
    if limit:
        paths = paths[:limit]
    levels = np.linspace(0.0, 100.0, LEVELS)
    per_case, cases, voxels, medians = [], [], 0, []
    for n, path in enumerate(paths, 1):
        ct = read_nifti(path)
        hu = np.clip(np.asarray(ct.array, dtype=np.float32), *HU_LIMITS)
        body = body_mask(hu, threshold_hu, axial_axis(ct))
        values = hu[body]
        if values.size == 0:
            raise InvalidParameters(f"{path}: no voxel above {threshold_hu:g} HU")
        per_case.append(np.percentile(values, levels))
        cases.append(path.parent.name)
        voxels += int(values.size)
        medians.append(round(float(np.median(values)), 1))
        if log is not None and (n % 20 == 0 or n == len(paths)):
            log(f"hu-reference: {n}/{len(paths)} cases")
    quantiles = np.maximum.accumulate(np.mean(per_case, axis=0))
    listing = sha256_of(src / "splits.json")
    return {
        "description": "body-voxel HU quantiles of planning CTs: the reference distribution "
        "of cbct-to-sct hu-calibration",
        "source": "OpenKBP Grand Challenge planning CTs (Babier et al., Med Phys 2021), "
        "128^3 NIfTI as converted in shared/data/openkbp",
        "split": f"{SPLIT} only (validation-pats are the held-out test set and were not read)",
        "splits_json_sha256": listing,
        "excluded": flags,
        "n_cases": len(cases),
        "cases": cases,
        "voxels": voxels,
        "body_threshold_hu": threshold_hu,
        "body_mask": "HU > threshold, largest 6-connected component, holes filled per axial "
        "slice (models.pipelines.cbct_to_sct.masks.body_mask)",
        "hu_clip": list(HU_LIMITS),
        "aggregation": "mean over cases of each case's quantiles (1D Wasserstein barycentre)",
        "made_by": "voxelgate dataset hu-reference",
        "per_case_median_hu": medians,
        "levels_pct": [round(float(v), 4) for v in levels],
        "quantiles_hu": [round(float(v), 2) for v in quantiles],
    }


def sha256_of(path: Path) -> str:
    """sha256 (hex) of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(
    src: Path,
    out: Path,
    threshold_hu: float = -500.0,
    limit: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the table to ``out`` (JSON, atomically); return a short summary."""
    table = build_hu_reference(src, threshold_hu, limit, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    q = dict(zip(table["levels_pct"], table["quantiles_hu"], strict=True))
    return {
        "out": str(out),
        "n_cases": table["n_cases"],
        "median_hu": q[50.0],
        "sha256": sha256_of(out),
    }
