"""NIfTI and ITK (NRRD/MHA) readers/writers: round trips, conventions, refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from models.errors import InputRejected
from models.volume import Volume
from service.io.dicom_series import DicomSeries
from service.io.itk_image import read_itk_image
from service.io.nifti import read_nifti, write_nifti
from service.io.read_any import read_volume


def _oblique_affine() -> np.ndarray:
    theta = np.radians(25.0)
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([3.0, 0.7, 0.9])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


# ----------------------------------------------------------------------------------------------
# NIfTI round trips
# ----------------------------------------------------------------------------------------------


def test_real_ct_nifti_roundtrip_is_exact(example_ct_series: DicomSeries, tmp_path: Path) -> None:
    volume = example_ct_series.volume
    path = tmp_path / "ct.nii.gz"
    write_nifti(volume, path)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int16  # integral HU stored as int16
    assert int(img.header["sform_code"]) == 1
    assert int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    back = read_nifti(path)
    assert back.array.dtype == np.float32  # CT in HU reads back as float32, like DICOM
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-6)
    assert (back.modality, back.units, back.frame_of_reference_uid) == (
        "CT",
        "HU",
        volume.frame_of_reference_uid,
    )


def test_nifti_affine_is_ras_of_ijk(example_ct_series: DicomSeries, tmp_path: Path) -> None:
    volume = example_ct_series.volume
    path = tmp_path / "ct.nii"
    write_nifti(volume, path)
    img = nib.load(str(path))
    assert img.shape == (512, 512, 20)  # (i, j, k) = (columns, rows, slices)
    # Voxel (k=3, j=10, i=40) in our order is NIfTI voxel (40, 10, 3); RAS = LPS with x, y negated.
    lps = volume.index_to_lps([[3, 10, 40]])[0]
    ras = (img.affine @ np.array([40, 10, 3, 1.0]))[:3]
    assert np.allclose(ras, [-lps[0], -lps[1], lps[2]])
    assert np.asarray(img.dataobj)[40, 10, 3] == volume.array[3, 10, 40]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_nifti_roundtrip_keeps_dtype_and_values(dtype: type, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((5, 7, 9)) * 100).astype(dtype)
    volume = Volume(data, _oblique_affine(), modality="MR")
    write_nifti(volume, tmp_path / "v.nii.gz")
    back = read_nifti(tmp_path / "v.nii.gz")
    assert back.array.dtype == data.dtype
    assert np.array_equal(back.array, data)
    assert np.allclose(back.affine, volume.affine, atol=1e-6)
    assert back.modality == "MR"


def test_nifti_non_integral_hu_stays_float(tmp_path: Path) -> None:
    data = np.linspace(-1000.0, 500.0, 5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) + 0.25
    volume = Volume(data, np.diag([2.0, 1.0, 1.0, 1.0]), modality="CT", units="HU")
    write_nifti(volume, tmp_path / "f.nii.gz")
    assert nib.load(str(tmp_path / "f.nii.gz")).get_data_dtype() == np.float32
    assert np.array_equal(read_nifti(tmp_path / "f.nii.gz").array, data)


def test_nifti_sheared_affine_kept_in_sform(tmp_path: Path) -> None:
    affine = np.diag([2.0, 0.5, 0.5, 1.0])
    affine[1, 0] = 0.6  # gantry tilt: each slice shifted along y
    volume = Volume(np.zeros((3, 4, 5), np.int16), affine)
    write_nifti(volume, tmp_path / "tilt.nii")
    img = nib.load(str(tmp_path / "tilt.nii"))
    assert int(img.header["qform_code"]) == 0
    assert int(img.header["sform_code"]) == 1
    assert np.allclose(read_nifti(tmp_path / "tilt.nii").affine, affine)


def test_nifti_qform_used_when_no_sform(tmp_path: Path) -> None:
    ras = np.diag([-1.5, -1.5, 2.0, 1.0])
    ras[:3, 3] = [5.0, 6.0, 7.0]
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), None)
    img.set_qform(ras, code=1)
    img.set_sform(np.eye(4), code=0)
    nib.save(img, str(tmp_path / "q.nii"))
    back = read_nifti(tmp_path / "q.nii")
    assert back.shape == (4, 3, 2)
    assert np.allclose(back.affine[:3, 3], [-5.0, -6.0, 7.0])  # RAS origin -> LPS
    assert np.allclose(back.spacing, (2.0, 1.5, 1.5))


def test_nifti_4d_singleton_is_squeezed(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4))
    nib.save(img, str(tmp_path / "one.nii.gz"))
    assert read_nifti(tmp_path / "one.nii.gz").shape == (6, 5, 4)


def test_shared_segmentation_nifti_on_dicom_grid(
    shared_file: Callable[[str], Path], example_ct_series: DicomSeries
) -> None:
    seg = read_nifti(shared_file("totalsegmentator/example_seg_dicom.nii.gz"))
    assert seg.array.dtype == np.uint8
    ct = example_ct_series.volume
    assert seg.shape == ct.shape
    # Same voxel centres; the NIfTI indexes rows in the opposite direction (as dcm2niix does).
    m = np.linalg.inv(ct.affine) @ seg.affine
    expected = np.eye(4)
    expected[1, 1], expected[1, 3] = -1.0, ct.shape[1] - 1
    assert np.abs(m - expected).max() < 1e-4


# ----------------------------------------------------------------------------------------------
# NIfTI refusals
# ----------------------------------------------------------------------------------------------


def _save(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray, code: int = 1) -> Path:
    img = nib.Nifti1Image(data, None)
    img.set_sform(affine, code=code)
    img.set_qform(None, code=0)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


def test_nifti_singular_affine_is_refused(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 0.0, 1.0])
    path = _save(tmp_path, "flat.nii.gz", np.zeros((3, 3, 3), np.int16), affine)
    with pytest.raises(InputRejected, match="singular affine") as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_nifti_without_orientation_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, "noorient.nii", np.zeros((3, 3, 3), np.int16), np.eye(4), code=0)
    with pytest.raises(InputRejected, match="no orientation"):
        read_nifti(path)


def test_nifti_4d_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, "dyn.nii.gz", np.zeros((3, 3, 3, 2), np.int16), np.eye(4))
    with pytest.raises(InputRejected, match="3D") as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_nifti_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputRejected):
        read_volume(path)


# ----------------------------------------------------------------------------------------------
# ITK: MHA and NRRD
# ----------------------------------------------------------------------------------------------


def test_itk_mha_head(shared_file: Callable[[str], Path]) -> None:
    volume = read_itk_image(shared_file("cil-head/head.mha"))
    assert volume.shape == (93, 64, 64)
    assert volume.array.dtype == np.uint16
    assert np.allclose(volume.spacing, (1.5, 3.2, 3.2))


def test_itk_nrrd_label_map_on_ct3slice_grid(
    shared_file: Callable[[str], Path], ct3_series: DicomSeries
) -> None:
    label = read_volume(shared_file("dcmqi/liver_seg.nrrd"))
    assert label.kind == "itk"
    assert label.dicom is None
    ct = ct3_series.volume
    assert label.volume.shape == ct.shape
    assert np.abs(label.volume.affine - ct.affine).max() < 1e-3
    assert set(np.unique(label.volume.array)) <= {0, 1}
    assert label.volume.array.any()


def test_itk_index_order_and_direction(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # [k, j, i]
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    theta = np.radians(30.0)
    direction = [np.cos(theta), -np.sin(theta), 0.0, np.sin(theta), np.cos(theta), 0.0, 0, 0, 1]
    image.SetDirection(direction)
    path = tmp_path / "oblique.mha"
    sitk.WriteImage(image, str(path))
    volume = read_itk_image(path)
    assert np.array_equal(volume.array, data)
    for k, j, i in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        expected = image.TransformIndexToPhysicalPoint((i, j, k))
        assert np.allclose(volume.index_to_lps([[k, j, i]])[0], expected)


def test_itk_nrrd_in_ras_space_converted_to_lps(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # [k, j, i]
    header = (
        "NRRD0004\n"
        "type: short\n"
        "dimension: 3\n"
        "space: right-anterior-superior\n"
        "sizes: 4 3 2\n"
        "space directions: (1.5,0,0) (0,2,0) (0,0,3)\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: raw\n"
        "space origin: (10,20,30)\n\n"
    )
    path = tmp_path / "ras.nrrd"
    path.write_bytes(header.encode() + data.astype("<i2").tobytes())
    volume = read_itk_image(path)
    assert np.array_equal(volume.array, data)
    # RAS (10, 20, 30) is LPS (-10, -20, 30); +i goes Right = -x in LPS.
    assert np.allclose(volume.affine[:3, 3], [-10.0, -20.0, 30.0])
    assert np.allclose(volume.affine[:3, 2], [-1.5, 0.0, 0.0])
    assert np.allclose(volume.affine[:3, 1], [0.0, -2.0, 0.0])
    assert np.allclose(volume.affine[:3, 0], [0.0, 0.0, 3.0])


def test_itk_2d_image_is_refused(shared_file: Callable[[str], Path]) -> None:
    path = shared_file("monai/CT_2D_head_fixed.mha")
    with pytest.raises(InputRejected, match="3D") as info:
        read_itk_image(path)
    assert str(path) in str(info.value)


def test_read_volume_dispatches_nifti(shared_file: Callable[[str], Path]) -> None:
    loaded = read_volume(shared_file("monai/anatomical.nii"))
    assert loaded.kind == "nifti"
    assert loaded.dicom is None
    assert loaded.volume.shape == (25, 41, 33)
