"""DICOM geometry against an independent reference (dcm2niix) and known synthetic affines."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from models.errors import InputRejected
from models.volume import Volume, from_ijk_order, ras_to_lps
from service.io.dicom_derived import write_derived_series
from service.io.dicom_series import DicomSeries, load_dicom_series

AFFINE_TOL_MM = 1e-3


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def run_dcm2niix(exe: str, folder: Path, out: Path) -> list[Path]:
    """Convert ``folder`` with dcm2niix; return the NIfTI files (no tilt-corrected copies)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [exe, "-z", "y", "-b", "n", "-f", "out", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    files = sorted(p for p in out.glob("*.nii.gz") if "_Tilt" not in p.name)
    assert files, f"dcm2niix produced nothing:\n{proc.stdout}\n{proc.stderr}"
    return files


def nifti_as_kji_lps(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """A dcm2niix NIfTI in our convention: array [k, j, i], affine (k, j, i) -> LPS."""
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(), dtype=np.float64)
    return from_ijk_order(data, ras_to_lps(np.asarray(img.affine, dtype=np.float64)))


def index_mapping(
    ours: npt.NDArray[np.float64], theirs: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> tuple[list[int], list[int]]:
    """Signed axis permutation taking their index to ours (no resampling needed).

    Returns ``(perm, signs)``: their axis ``a`` is our axis ``perm[a]``, reversed when
    ``signs[a] == -1``. Fails when the two grids are not the same set of voxel centres.
    """
    m = np.linalg.inv(ours) @ theirs
    r = np.round(m)
    assert np.abs(m - r).max() < 1e-3, f"grids differ (not an index permutation):\n{m}"
    p = r[:3, :3]
    assert np.array_equal(np.abs(p).sum(axis=0), [1, 1, 1]), f"not a permutation:\n{p}"
    perm = [int(np.flatnonzero(p[:, a])[0]) for a in range(3)]
    signs = [int(p[perm[a], a]) for a in range(3)]
    for a in range(3):
        expected = 0 if signs[a] == 1 else shape[perm[a]] - 1
        assert r[perm[a], 3] == expected, f"offset {r[perm[a], 3]} on axis {perm[a]}"
    return perm, signs


def in_their_order(array: npt.NDArray[Any], perm: list[int], signs: list[int]) -> npt.NDArray[Any]:
    """Our array re-indexed into the other reader's index order (transpose + flips only)."""
    out = array.transpose(perm)
    for axis, sign in enumerate(signs):
        if sign == -1:
            out = np.flip(out, axis=axis)
    return out


def compare_with_dcm2niix(
    volume: Volume, exe: str, folder: Path, tmp_path: Path
) -> tuple[float, float]:
    """Assert geometry and voxels equal dcm2niix's; return (max affine diff mm, max voxel diff)."""
    files = run_dcm2niix(exe, folder, tmp_path / "dcm2niix")
    assert len(files) == 1, files
    their_array, their_affine = nifti_as_kji_lps(files[0])
    perm, signs = index_mapping(volume.affine, their_affine, volume.shape)
    # Compare the maps as the world positions of the 8 corners of the grid.
    corners = np.array(
        [
            [a, b, c, 1.0]
            for a in (0, their_array.shape[0] - 1)
            for b in (0, their_array.shape[1] - 1)
            for c in (0, their_array.shape[2] - 1)
        ]
    )
    r = np.round(np.linalg.inv(volume.affine) @ their_affine)
    ours_world = (volume.affine @ r @ corners.T).T
    their_world = (their_affine @ corners.T).T
    affine_diff = float(np.abs(ours_world - their_world).max())
    assert affine_diff < AFFINE_TOL_MM
    mapped = in_their_order(volume.array, perm, signs)
    assert mapped.shape == their_array.shape
    voxel_diff = float(np.abs(mapped.astype(np.float64) - their_array).max())
    assert voxel_diff == 0.0
    return affine_diff, voxel_diff


def _crop(series: DicomSeries) -> Volume:
    """A small non-square, anisotropic piece of the real CT (k, j, i) = (20, 96, 128)."""
    v = series.volume
    return Volume(
        array=np.ascontiguousarray(v.array[:, 200:296, 150:278]),
        affine=v.affine.copy(),
        modality="CT",
        units="HU",
        frame_of_reference_uid=v.frame_of_reference_uid,
    )


def _rotation(ax: float, ay: float, az: float) -> npt.NDArray[np.float64]:
    cx, sx, cy, sy, cz, sz = (f(np.radians(a)) for a in (ax, ay, az) for f in (np.cos, np.sin))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------------------------
# real series
# ----------------------------------------------------------------------------------------------


def test_empty_study_uid_refused_by_default_with_opt_in_hint(example_ct_dir: Path) -> None:
    with pytest.raises(InputRejected) as info:
        load_dicom_series(example_ct_dir)
    message = str(info.value)
    assert "StudyInstanceUID is empty" in message
    assert "allow_missing_study_uid=True" in message
    assert str(example_ct_dir) in message


def test_example_ct_opt_in_volume(example_ct_series: DicomSeries) -> None:
    v = example_ct_series.volume
    assert v.shape == (20, 512, 512)
    assert v.array.dtype == np.float32
    assert v.modality == "CT"
    assert v.units == "HU"
    assert v.meta["study_uid_missing"] is True
    assert set(v.meta) == {
        "series_instance_uid",
        "study_instance_uid",
        "sop_instance_uids",
        "series_description",
        "source_transfer_syntaxes",
        "study_uid_missing",
    }
    assert v.meta["source_transfer_syntaxes"] == ["1.2.840.10008.1.2.4.90"]
    assert example_ct_series.transfer_syntax_uids == {"1.2.840.10008.1.2.4.90"}
    assert np.allclose(v.spacing, (2.0, 0.9765625, 0.9765625))
    assert "PixelData" not in example_ct_series.template
    assert len(example_ct_series.sop_instance_uids) == 20
    # HU, not stored values: -1024 outside the field of view, air near -1000, soft tissue ~0.
    assert v.array.min() == -1024.0
    assert np.mean((v.array > -1100) & (v.array < -900) & (v.array != -1024)) > 0.2
    assert np.mean((v.array > -100) & (v.array < 100)) > 0.2


def test_example_ct_slices_sorted_along_normal(
    example_ct_dir: Path, example_ct_series: DicomSeries
) -> None:
    v = example_ct_series.volume
    z_by_uid = {}
    for path in example_ct_dir.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        z_by_uid[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
    z = [z_by_uid[uid] for uid in example_ct_series.sop_instance_uids]
    assert z == sorted(z)
    assert np.allclose(v.index_to_lps([[19, 0, 0]])[0, 2], z[-1])


def test_example_ct_matches_dcm2niix(
    example_ct_series: DicomSeries, example_ct_dir: Path, dcm2niix: str, tmp_path: Path
) -> None:
    affine_diff, voxel_diff = compare_with_dcm2niix(
        example_ct_series.volume, dcm2niix, example_ct_dir, tmp_path
    )
    assert affine_diff < AFFINE_TOL_MM
    assert voxel_diff == 0.0


def test_ct3slice_matches_dcm2niix(
    ct3_series: DicomSeries, ct3_dir: Path, dcm2niix: str, tmp_path: Path
) -> None:
    compare_with_dcm2niix(ct3_series.volume, dcm2niix, ct3_dir, tmp_path)


def test_ct3slice_affine_columns_from_headers(ct3_series: DicomSeries, ct3_dir: Path) -> None:
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in ct3_dir.glob("*.dcm")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),  # normal = +z
    )
    a = ct3_series.volume.affine
    ipp = [np.array(ds.ImagePositionPatient, dtype=float) for ds in headers]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(x) for x in headers[0].PixelSpacing)
    assert np.allclose(a[:3, 3], ipp[0])
    assert np.allclose(a[:3, 0], ipp[1] - ipp[0])
    assert np.allclose(a[:3, 1], iop[3:] * row_spacing)
    assert np.allclose(a[:3, 2], iop[:3] * col_spacing)


def test_enhanced_ct_matches_dcm2niix(
    dcm2niix: str, tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = pydicom_file("eCT_Supplemental.dcm")
    folder = tmp_path / "ect"
    folder.mkdir()
    (folder / src.name).write_bytes(src.read_bytes())
    volume = load_dicom_series(folder).volume
    assert volume.shape == (2, 512, 512)
    compare_with_dcm2niix(volume, dcm2niix, folder, tmp_path)


# ----------------------------------------------------------------------------------------------
# synthetic oblique and gantry-tilt series written from the real CT
# ----------------------------------------------------------------------------------------------


def _write_and_reload(series: DicomSeries, volume: Volume, out: Path) -> Volume:
    write_derived_series(
        volume,
        series.template,
        series.sop_instance_uids,
        str(series.template.SOPClassUID),
        out,
        series_description="geometry test",
        derivation_description="synthetic geometry from real CT voxels",
    )
    return load_dicom_series(out).volume


def test_oblique_series_roundtrip_and_dcm2niix(
    example_ct_series: DicomSeries, dcm2niix: str, tmp_path: Path
) -> None:
    base = _crop(example_ct_series)
    rotation = _rotation(20.0, -12.0, 33.0)
    affine = np.eye(4)
    # columns (k, j, i): k along the normal i x j, row spacing 0.6 mm, column spacing 0.9 mm.
    affine[:3, :3] = rotation[:, ::-1] @ np.diag([2.5, 0.6, 0.9])
    affine[:3, 3] = [-40.0, 25.0, -700.0]
    oblique = Volume(base.array, affine, modality="CT", units="HU")
    back = _write_and_reload(example_ct_series, oblique, tmp_path / "oblique")
    assert np.abs(back.affine - affine).max() < AFFINE_TOL_MM
    assert np.array_equal(back.array, oblique.array)
    compare_with_dcm2niix(back, dcm2niix, tmp_path / "oblique", tmp_path)


def test_slices_against_normal_read_back_reversed(
    example_ct_series: DicomSeries, tmp_path: Path
) -> None:
    base = _crop(example_ct_series)
    affine = base.affine.copy()
    affine[:3, 0] *= -1.0  # k runs against row x column: readers sort it the other way
    reversed_volume = Volume(base.array, affine, modality="CT", units="HU")
    back = _write_and_reload(example_ct_series, reversed_volume, tmp_path / "rev")
    n = base.shape[0]
    assert np.array_equal(back.array, base.array[::-1])
    assert np.allclose(
        back.index_to_lps([[0, 5, 7]]), reversed_volume.index_to_lps([[n - 1, 5, 7]])
    )


def test_gantry_tilt_sheared_affine_is_kept(
    example_ct_series: DicomSeries, dcm2niix: str, tmp_path: Path
) -> None:
    base = _crop(example_ct_series)
    tilt = np.radians(15.0)
    affine = base.affine.copy()
    # Slice planes stay axial but each slice is shifted along y (posterior): a sheared grid.
    affine[:3, 0] = [0.0, 2.0 * np.tan(tilt), 2.0]
    tilted = Volume(base.array, affine, modality="CT", units="HU")
    out = tmp_path / "tilt"
    back = _write_and_reload(example_ct_series, tilted, out)
    assert np.abs(back.affine - affine).max() < AFFINE_TOL_MM
    assert np.array_equal(back.array, tilted.array)
    # The step is not parallel to the normal: the true geometry is sheared.
    normal = np.cross(back.affine[:3, 2], back.affine[:3, 1])
    normal /= np.linalg.norm(normal)
    step = back.affine[:3, 0]
    assert np.linalg.norm(np.cross(step, normal)) > 0.5
    # dcm2niix writes an uncorrected file (sheared sform) besides a resampled *_Tilt_* one.
    compare_with_dcm2niix(back, dcm2niix, out, tmp_path)
