"""cbct-to-sct training files: pair dataset rules and a ``voxelgate train cbct-to-sct`` run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.pipelines.cbct_to_sct.learned import load_weights
from models.volume import Volume
from service.cli import main
from service.errors import InvalidParameters
from service.io.nifti import read_nifti, write_nifti
from tests.unit.cbct_to_sct_data import full_ct
from workers.cbct_pairs import (
    SEED_BASE,
    build_pairs,
    case_seed,
    detector_pitch_mm,
    simulate_pair,
)
from workers.train_sct import load_case, read_dataset, spacing_range


def test_case_seeds_are_fixed_and_distinct() -> None:
    assert case_seed("pt_12") == SEED_BASE + 12
    assert case_seed("pt_201") != case_seed("pt_21")
    with pytest.raises(InvalidParameters, match="number"):
        case_seed("patient")


def test_detector_pitch_is_the_in_plane_voxel_whatever_the_array_order() -> None:
    # 3.9 mm slices along LPS z, 2.7 x 2.0 mm in-plane; array axis 0 along z (OpenKBP order),
    # then the same grid transposed so that array axis 2 runs along z
    axial_first = Volume(
        np.zeros((4, 5, 6), np.float32), np.diag([3.9, 2.7, 2.0, 1.0])[[2, 1, 0, 3]]
    )
    axial_last = Volume(np.zeros((6, 5, 4), np.float32), np.diag([2.0, 2.7, 3.9, 1.0]))
    for ct in (axial_first, axial_last):  # never the 3.9 mm slice spacing
        assert detector_pitch_mm(ct, 1000.0, 1500.0) == pytest.approx(2.7 * 1.5)


def test_finished_pairs_are_not_simulated_again(tmp_path: Path) -> None:
    folder = tmp_path / "pt_3"
    folder.mkdir()
    (folder / "facts.json").write_text("{}")
    task = {"case": "pt_3", "ct": "/nonexistent/ct.nii.gz", "folder": str(folder)}
    entry = simulate_pair(task)  # would fail reading the CT if it simulated
    assert entry == {
        "case": "pt_3",
        "ct": "/nonexistent/ct.nii.gz",
        "cbct": str(folder / "cbct.nii.gz"),
        "fov": str(folder / "fov.nii.gz"),
    }


def test_unknown_splits_and_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameters, match="projections"):
        build_pairs(tmp_path, tmp_path / "out", projections=2)
    with pytest.raises(InvalidParameters):
        build_pairs(tmp_path, tmp_path / "out", splits=("test",))


def _write_pair(root: Path, name: str, bias: float) -> dict[str, str]:
    """A real CT crop and a 'CBCT' with a HU bias inside a disc FOV (file layout of a pair)."""
    ct = full_ct()
    affine = ct.affine.copy()
    affine[:3, 3] = ct.index_to_lps([44, 0, 0])
    crop = np.asarray(ct.array[44:52], np.float32)
    ct = dataclasses.replace(ct, array=crop, affine=affine)
    rows, cols = np.mgrid[:128, :128]
    fov = ((rows - 63.5) ** 2 + (cols - 63.5) ** 2 < 60**2)[None].repeat(crop.shape[0], 0)
    cbct = np.where(fov, crop * 0.9 + bias, -1000.0).astype(np.int16)
    folder = root / name
    folder.mkdir(parents=True)
    paths = {k: str(folder / f"{k}.nii.gz") for k in ("ct", "cbct", "fov")}
    write_nifti(ct.with_array(crop.astype(np.int16)), Path(paths["ct"]))
    write_nifti(ct.with_array(cbct), Path(paths["cbct"]))
    write_nifti(ct.with_array(fov.astype(np.uint8), modality="OT", units=""), Path(paths["fov"]))
    return {"case": name, **paths}


def test_train_command_writes_loadable_weights_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "pairs"
    dataset = {
        "description": "test pairs",
        "simulated_input": True,
        "training": [_write_pair(data, "pt_1", -80.0), _write_pair(data, "pt_2", -60.0)],
        "validation": [_write_pair(data, "pt_3", -70.0)],
    }
    (data / "dataset.json").write_text(json.dumps(dataset))
    case, spacing = load_case(read_dataset(data)["training"][0])
    assert case.cbct.shape == (8, 128, 128)
    assert spacing_range([spacing])["slice"][0] == pytest.approx(spacing[0], abs=1e-3)
    out = tmp_path / "run"
    args = ["train", "cbct-to-sct", "--data", str(data), "--out", str(out), "--arch", "unet"]
    args += ["--batch-size", "2", "--validate-every", "2", "--checkpoint-every", "1", "-q"]
    assert main([*args, "--steps", "2"]) == 0
    _, record = load_weights(out / "model.pt", torch.device("cpu"))
    assert record["network"]["arch"] == "unet"
    assert record["training"]["training_cases"] == ["pt_1", "pt_2"]
    assert record["training"]["validation_cases"] == ["pt_3"]
    sha = (out / "model.pt.sha256").read_text().split()[0]
    assert json.loads((out / "metrics.json").read_text())["sha256"] == sha
    assert main([*args, "--steps", "2"]) == 2  # would clobber the checkpoint: refused
    assert main([*args, "--steps", "3", "--resume"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "validation" in h] == [2, 3]


def test_pairs_on_different_grids_are_refused(tmp_path: Path) -> None:
    entry = _write_pair(tmp_path, "pt_9", 0.0)
    cbct = read_nifti(Path(entry["cbct"]))
    moved = dataclasses.replace(cbct, affine=cbct.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    write_nifti(moved, Path(entry["cbct"]))
    with pytest.raises(InvalidParameters, match="same grid"):
        load_case(entry)
