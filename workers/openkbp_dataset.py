"""``voxelgate dataset openkbp``: the OpenKBP head-and-neck CTs as a segmentation dataset JSON.

Reads ``<src>/splits.json`` and the ``train-pats``/``validation-pats`` folders (``ct.nii.gz``
int16 HU, ``oars.nii.gz`` uint8, 0 background, 1..7 the organs below) and writes the dataset
JSON that :mod:`workers.train_segment` reads: ``training`` from the official train split,
``validation`` from the official validation split, each entry with absolute paths and
``present`` = the organs that have at least one voxel in that case. In OpenKBP an organ with no
voxel was not contoured (it is not "background"), which is what ``present`` tells the loss.
Cases flagged in ``splits.json`` (implausible contours, partial field of view) are left out and
listed under ``excluded`` with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from service.errors import InvalidParameters

LABELS = {
    "0": "background",
    "1": "Brainstem",
    "2": "SpinalCord",
    "3": "RightParotid",
    "4": "LeftParotid",
    "5": "Esophagus",
    "6": "Larynx",
    "7": "Mandible",
}
"""OpenKBP OAR values (as converted in ``../shared/data/openkbp``, PROVENANCE.md)."""

_CATEGORY = ["123037004", "SCT", "Anatomical Structure"]
LABEL_CODES: dict[str, dict[str, Any]] = {
    "1": {"type": ["15926001", "SCT", "Brain stem"], "colour": [255, 200, 0]},
    "2": {"type": ["2748008", "SCT", "Spinal cord"], "colour": [255, 255, 0]},
    "3": {"type": ["45289007", "SCT", "Parotid gland"], "colour": [0, 200, 255]},
    "4": {"type": ["45289007", "SCT", "Parotid gland"], "colour": [0, 100, 255]},
    "5": {"type": ["32849002", "SCT", "Esophagus"], "colour": [200, 100, 50]},
    "6": {"type": ["4596009", "SCT", "Larynx"], "colour": [150, 0, 200]},
    "7": {"type": ["91609006", "SCT", "Mandible"], "colour": [230, 230, 230]},
}
"""SNOMED-CT segmented property types (DICOM CID 7151/7153), category Anatomical Structure.
The laterality of the parotids is in the label names (no laterality modifier is written)."""

MIRROR_PAIRS = ("3:4",)
"""Right/left parotid: the labels a left-right flip exchanges."""


def _entries(src: Path, split: str, flags: dict[str, str]) -> tuple[list[Any], list[Any]]:
    entries, excluded = [], []
    folder = src / split
    if not folder.is_dir():
        raise InvalidParameters(f"{folder} is not a folder")
    names = sorted(
        (p.name for p in folder.iterdir() if p.is_dir()), key=lambda n: int(n.split("_")[-1])
    )
    for name in names:
        key = f"{split}/{name}"
        if key in flags:
            excluded.append({"case": key, "reason": flags[key]})
            continue
        image, label = folder / name / "ct.nii.gz", folder / name / "oars.nii.gz"
        if not image.is_file() or not label.is_file():
            excluded.append({"case": key, "reason": "ct.nii.gz or oars.nii.gz missing"})
            continue
        values = np.unique(np.asarray(nib.load(label).dataobj))  # type: ignore[attr-defined]
        present = [int(v) for v in values if 1 <= v <= len(LABELS) - 1]
        entries.append(
            {
                "case": name,
                "image": str(image.resolve()),
                "label": str(label.resolve()),
                "present": present,
            }
        )
    return entries, excluded


def build_dataset(src: Path) -> dict[str, Any]:
    """The dataset dict (``training``, ``validation``, ``labels``, ``label_codes``...)."""
    try:
        splits = json.loads((src / "splits.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidParameters(f"cannot read {src / 'splits.json'}: {exc}") from None
    flags = dict(splits.get("qc_flags", {}))
    training, ex_train = _entries(src, "train-pats", flags)
    validation, ex_val = _entries(src, "validation-pats", flags)
    return {
        "name": "OpenKBP head-and-neck OARs",
        "description": (
            "OpenKBP Grand Challenge planning CTs (Babier et al., Med Phys 2021; TCIA sources), "
            "128^3 as released, 7 OARs from the clinical contours; official train/validation "
            "splits, QC-flagged cases excluded."
        ),
        "modality": {"0": "CT"},
        "labels": LABELS,
        "label_codes": LABEL_CODES,
        "mirror_pairs": list(MIRROR_PAIRS),
        "training": training,
        "validation": validation,
        "excluded": ex_train + ex_val,
    }


def run(src: Path, out: Path) -> dict[str, int]:
    """Write the dataset JSON to ``out``; return case counts."""
    dataset = build_dataset(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dataset, indent=1), encoding="utf-8")
    return {k: len(dataset[k]) for k in ("training", "validation", "excluded")}
