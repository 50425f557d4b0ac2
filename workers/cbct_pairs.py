"""``voxelgate dataset cbct-pairs``: simulated CBCT / real CT training pairs for ``cbct-to-sct``.

No paired CBCT/CT is available to this project, so every pair is a real planning CT (the
target) and a CBCT simulated from that same CT (the input) with
:func:`models.physics.cbct.simulate_cbct`: scatter, Poisson noise, cupping and, in some cases,
detector truncation drawn from :func:`models.physics.cbct_params.random_artefacts` with a seed
fixed per case. Misregistration is switched off for training pairs (a real CBCT/CT training
pair is deformably registered first; a shifted target would teach the network to blur).

Cases come from the OpenKBP head-and-neck CTs (official train/validation split, QC-flagged
cases out; :mod:`workers.openkbp_dataset`): train patients -> ``training``, validation
patients -> ``validation``, so the split is by patient. Output layout::

    OUT/dataset.json
    OUT/<split>/<case>/cbct.nii.gz   simulated CBCT, HU (int16), on the CT grid
    OUT/<split>/<case>/fov.nii.gz    1 inside the reconstructable field of view
    OUT/<split>/<case>/facts.json    every simulation parameter (written last: "done")

The CT itself is referenced by absolute path, not copied. Re-running skips finished cases, so
an interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from models.volume import Volume
from service.errors import InvalidParameters
from workers.openkbp_dataset import build_dataset

SEED_BASE = 7_000_000
"""Per-case seed = ``SEED_BASE + patient number`` (OpenKBP ``pt_N``): fixed and distinct."""

DEFAULT_PROJECTIONS = 180
"""Projections over 360 degrees: 128 in-plane voxels need about 128 * pi / 2 = 200 for full
angular sampling at the periphery; 180 keeps the streaks of a fast clinical CBCT mode."""


def case_seed(case: str) -> int:
    """The fixed seed of OpenKBP case ``pt_N``."""
    try:
        return SEED_BASE + int(case.rsplit("_", 1)[-1])
    except ValueError:
        raise InvalidParameters(f"case name {case!r} does not end in a number") from None


def _entry(task: dict[str, Any]) -> dict[str, Any]:
    """The dataset entry of one pair."""
    folder = Path(task["folder"])
    return {
        "case": task["case"],
        "ct": task["ct"],
        "cbct": str(folder / "cbct.nii.gz"),
        "fov": str(folder / "fov.nii.gz"),
    }


def detector_pitch_mm(ct: Volume, sad_mm: float, sdd_mm: float) -> float:
    """Detector pixel pitch (mm) of a pair: the CT's coarser in-plane voxel, magnified.

    In-plane means across the rotation axis (the array axis nearest LPS z), whatever the
    array order of the CT.
    """
    from models.physics.cbct_geometry import axial_axis
    from models.pipelines.cbct_to_sct.masks import in_plane_spacing

    return max(in_plane_spacing(ct, axial_axis(ct))) * sdd_mm / sad_mm


def simulate_pair(task: dict[str, Any]) -> dict[str, Any]:
    """Simulate one pair (runs in a worker process); returns its dataset entry."""
    from models.physics.cbct import CBCTGeometry, random_artefacts, simulate_cbct
    from service.io.nifti import read_nifti, write_nifti

    folder = Path(task["folder"])
    facts_path = folder / "facts.json"
    entry = _entry(task)
    if facts_path.is_file():
        return entry
    folder.mkdir(parents=True, exist_ok=True)
    ct = read_nifti(Path(task["ct"]))
    ct = ct.with_array(ct.array, modality="CT", units="HU")
    seed = case_seed(task["case"])
    artefacts = dataclasses.replace(
        random_artefacts(seed), shift_mm=(0.0, 0.0, 0.0), rotation_deg=(0.0, 0.0, 0.0)
    )
    pitch = detector_pitch_mm(ct, task["sad_mm"], task["sdd_mm"])
    geometry = CBCTGeometry(
        sad_mm=task["sad_mm"],
        sdd_mm=task["sdd_mm"],
        n_projections=task["projections"],
        detector_pitch_mm=pitch,
    )
    result = simulate_cbct(ct, geometry, artefacts, seed=seed, threads=task["threads"])
    hu = np.clip(np.rint(result.volume.array), -1024, 3071).astype(np.int16)
    write_nifti(result.volume.with_array(hu), folder / "cbct.nii.gz")
    write_nifti(
        result.fov_mask.with_array(result.fov_mask.array.astype(np.uint8)), folder / "fov.nii.gz"
    )
    tmp = facts_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.facts, indent=1), encoding="utf-8")
    tmp.replace(facts_path)
    return entry


def build_pairs(
    src: Path,
    out: Path,
    *,
    projections: int = DEFAULT_PROJECTIONS,
    jobs: int = 1,
    threads: int = 1,
    limit: int = 0,
    splits: tuple[str, ...] = ("training", "validation"),
    log: Any = None,
) -> dict[str, Any]:
    """Simulate every pair (skipping finished ones) and write ``OUT/dataset.json``.

    Args:
        src: The OpenKBP folder (``splits.json``, ``train-pats``, ``validation-pats``).
        out: Output folder.
        projections: Projections per simulated scan.
        jobs: Worker processes (each imports RTK once, about 20 CPU-seconds).
        threads: ITK threads per process.
        limit: Only the first ``limit`` cases of each split (0: all).
        splits: Splits to simulate, in this order (``"training"``, ``"validation"``); the
            dataset lists the finished pairs of the others too.
        log: ``log(message)`` for progress lines, or ``None``.

    Returns:
        The dataset dict that was written.
    """
    if projections < 8 or jobs < 1 or threads < 1 or limit < 0:
        raise InvalidParameters("projections >= 8, jobs >= 1, threads >= 1, limit >= 0")
    source = build_dataset(src)
    tasks: dict[str, list[dict[str, Any]]] = {}
    folders = {"training": "train-pats", "validation": "validation-pats"}
    unknown = set(splits) - set(folders)
    if unknown:
        raise InvalidParameters(f"unknown split(s) {sorted(unknown)}; known: {sorted(folders)}")
    for split, folder_name in folders.items():
        cases = source[split][:limit] if limit else source[split]
        tasks[split] = [
            {
                "case": c["case"],
                "ct": c["image"],
                "folder": str(out / folder_name / c["case"]),
                "projections": projections,
                "threads": threads,
                "sad_mm": 1000.0,
                "sdd_mm": 1500.0,
            }
            for c in cases
        ]
    entries: dict[str, list[dict[str, Any]]] = {"training": [], "validation": []}
    start = time.perf_counter()
    flat = [(split, t) for split in splits for t in tasks[split]]
    for split in set(folders) - set(splits):  # finished pairs of splits not simulated now
        entries[split] = [
            _entry(t) for t in tasks[split] if (Path(t["folder"]) / "facts.json").is_file()
        ]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for n, ((split, _), entry) in enumerate(
            zip(flat, pool.map(simulate_pair, [t for _, t in flat]), strict=True), start=1
        ):
            entries[split].append(entry)
            if log is not None:
                log(f"{n}/{len(flat)} {entry['case']} ({time.perf_counter() - start:.0f} s)")
    dataset = {
        "name": "Simulated CBCT / real CT pairs (OpenKBP head and neck)",
        "description": (
            "Input: CBCT simulated from each real OpenKBP planning CT (cone-beam Joseph "
            f"projection, {projections} projections, SAD 1000 / SDD 1500 mm, kernel scatter, "
            "Poisson noise, cupping, truncation in some cases, FDK; models.physics.cbct). "
            "Target: the same real CT. Split by patient (official OpenKBP train/validation)."
        ),
        "simulated_input": True,
        "projections": projections,
        "seed_rule": f"{SEED_BASE} + patient number; random_artefacts(seed), no misregistration",
        "excluded": source["excluded"],
        **entries,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")
    return dataset
