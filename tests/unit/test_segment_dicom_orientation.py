"""``segment`` on real DICOM CT with feet-first and oblique geometry, through to DICOM SEG.

The pixels are the real dcmqi three-slice CT; copies of its files get rewritten orientation and
position tags (a feet-first series whose rows run toward the patient's right and whose instance
order runs inferior to superior; an oblique series tilted 15 degrees about the x axis). The
network is a TorchScript module that thresholds the windowed image at 300 HU (a fixed,
exactly known segmentation of bone), so any axis mix-up between the source grid, the card's
canonical frame, the network grid and back shows up as disagreement with the same threshold
applied on the source grid. The SEG is re-read with highdicom: every frame must name the source
instance of the slice at its position and hold exactly that slice of the label map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import run
from models.provenance import file_sha256
from models.result import no_progress
from service.io.dicom_seg import write_dicom_seg
from service.io.dicom_series import load_dicom_series

BONE_HU, LOWER, UPPER = 300.0, -1000.0, 1000.0


class _Threshold(torch.nn.Module):
    """Logits ``(B, 2, ...)``: background where the windowed image is below 300 HU, bone above."""

    def __init__(self) -> None:
        super().__init__()
        self.level = (BONE_HU - LOWER) / (UPPER - LOWER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self.level
        return torch.cat([level - x, x - level], dim=1) * 100.0


def _install(root: Path) -> str:
    folder = root / "bone-threshold"
    folder.mkdir(parents=True)
    path = folder / "model.ts"
    torch.jit.save(torch.jit.trace(_Threshold(), torch.zeros(1, 1, 8, 8, 4)), str(path))
    card = {
        "name": "bone-threshold",
        "version": "0.0.1",
        "architecture": {
            "name": "unet3d",
            "args": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        },
        "weights": {"file": "model.ts", "sha256": file_sha256(path), "format": "torchscript"},
        "modality": "CT",
        "spacing_mm": [1.0, 1.0, 1.0],
        "orientation": "RAS",
        "intensity": {"kind": "window", "lower": LOWER, "upper": UPPER},
        "patch_size": [64, 64, 4],
        "labels": [{"value": 1, "name": "Bone", "type": ["272673000", "SCT", "Bone"]}],
        "training_data": "none: a fixed 300 HU threshold (test only)",
        "metrics": "none",
    }
    (folder / "card.json").write_text(json.dumps(card))
    return "bone-threshold"


def _rewrite(src: Path, dst: Path, kind: str) -> None:
    """Copy the series with new ImageOrientation/ImagePosition (and PatientPosition) tags."""
    dst.mkdir()
    files = sorted(src.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    first = np.asarray(datasets[0].ImagePositionPatient, float)
    spacing = float(datasets[0].PixelSpacing[1])
    if kind == "feet-first":
        row, col = np.array([-1.0, 0, 0]), np.array([0, 1.0, 0])
        origin = first + np.array([(datasets[0].Columns - 1) * spacing, 0, 0])
        step = np.array([0, 0, -1.0])  # instance order runs the other way
    else:
        a = np.deg2rad(15)
        row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), np.sin(a)])
        origin, step = first, np.cross(row, col)
    for n, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + n * 1.0 * step]
        ds.SliceLocation = f"{float(np.dot(origin + n * step, np.cross(row, col))):.4f}"
        ds.InstanceNumber = n + 1
        if kind == "feet-first":
            ds.PatientPosition = "FFS"
        ds.save_as(dst / f"{n:03d}.dcm")


@pytest.mark.parametrize("kind", ["feet-first", "oblique"])
def test_segment_and_seg_on_reoriented_real_series(
    kind: str, ct3_dir: Path, tmp_path: Path
) -> None:
    _rewrite(ct3_dir, tmp_path / "series", kind)
    series = load_dicom_series(tmp_path / "series")
    volume = series.volume
    if kind == "oblique":
        assert abs(volume.direction[1, 1]) < 0.99  # really oblique in LPS
    root = tmp_path / "models"
    name = _install(root)
    params = SegmentParams.model_validate(
        {"model": name, "device": "cpu", "overlap": 0.25}, context={"models_root": root}
    )
    result = run({"image": volume}, params, no_progress, models_root=root)
    seg_map = result.label_maps["segmentation"]
    np.testing.assert_array_equal(seg_map.affine, volume.affine)
    truth = volume.array > BONE_HU
    pred = seg_map.array == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    # resampling to 1 mm and back moves only boundary voxels; an axis flip would not overlap
    assert truth.sum() > 1000
    assert dice > 0.9, dice
    mirrored = np.flip(truth, axis=2)
    assert 2 * (pred & mirrored).sum() / (pred.sum() + mirrored.sum()) < dice - 0.2

    seg = write_dicom_seg(seg_map, series, "bone-threshold", "0.0.1", tmp_path / "seg.dcm")
    reread = hd.seg.segread(tmp_path / "seg.dcm")
    uids = series.sop_instance_uids
    positions = [volume.index_to_lps([k, 0, 0]) for k in range(volume.shape[0])]
    assert reread.NumberOfFrames == int(np.count_nonzero(pred.any(axis=(1, 2))))
    for frame in reread.PerFrameFunctionalGroupsSequence:
        ipp = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        k = int(np.argmin([np.linalg.norm(ipp - p) for p in positions]))
        assert np.allclose(ipp, positions[k], atol=1e-3)
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == uids[k]
    pixels = reread.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False
    )
    np.testing.assert_array_equal(pixels, seg_map.array)
    orientation = reread.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    np.testing.assert_allclose(
        np.asarray(orientation.ImageOrientationPatient, float),
        np.asarray(
            pydicom.dcmread(next((tmp_path / "series").iterdir())).ImageOrientationPatient, float
        ),
        atol=1e-5,
    )
    assert seg.SeriesInstanceUID != series.template.SeriesInstanceUID
    shutil.rmtree(tmp_path / "series")
