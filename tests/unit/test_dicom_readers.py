"""DICOM reading: transfer syntaxes, enhanced multi-frame, series selection and bad inputs."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from models.errors import InputRejected
from service.io import dicom_files
from service.io.dicom_derived import write_derived_series
from service.io.dicom_pixels import decode_frames
from service.io.dicom_series import (
    DicomSeries,
    list_series,
    load_dicom_series,
)
from service.io.read_any import read_volume

# ----------------------------------------------------------------------------------------------
# transfer syntaxes
# ----------------------------------------------------------------------------------------------

MR_SMALL_VARIANTS = [
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small_expb.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small_padded.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
]


@pytest.mark.parametrize(("name", "syntax"), MR_SMALL_VARIANTS)
def test_lossless_mr_small_variants_equal_uncompressed(
    name: str, syntax: str, pydicom_file: Callable[[str], Path]
) -> None:
    reference = load_dicom_series(pydicom_file("MR_small.dcm")).volume
    series = load_dicom_series(pydicom_file(name))
    assert series.transfer_syntax_uids == {syntax}
    assert series.volume.meta["source_transfer_syntaxes"] == [syntax]
    assert series.volume.array.dtype == reference.array.dtype
    assert np.array_equal(series.volume.array, reference.array)
    assert np.array_equal(series.volume.affine, reference.affine)


def test_mr_small_single_slice_geometry(pydicom_file: Callable[[str], Path]) -> None:
    path = pydicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    volume = load_dicom_series(path).volume
    assert volume.shape == (1, 64, 64)
    assert volume.modality == "MR"
    assert volume.units == ""
    assert volume.array.dtype == np.int16  # no rescale: stored integers kept exactly
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    thickness = float(ds.get("SpacingBetweenSlices") or ds.SliceThickness)
    assert np.allclose(volume.affine[:3, 0], normal * thickness)
    assert np.allclose(volume.affine[:3, 3], np.array(ds.ImagePositionPatient, dtype=float))


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ],
)
def test_jpeg2000_lossless_volume_equals_uncompressed(
    name: str, reference: str, pydicom_file: Callable[[str], Path]
) -> None:
    ours = load_dicom_series(pydicom_file(name)).volume
    ref = load_dicom_series(pydicom_file(reference)).volume
    assert np.array_equal(ours.array, ref.array)
    assert np.array_equal(ours.affine, ref.affine)


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ],
)
def test_enhanced_mr_frames_decode_like_uncompressed(
    name: str, pydicom_file: Callable[[str], Path]
) -> None:
    reference = pydicom.dcmread(pydicom_file("emri_small.dcm"))
    ds = pydicom.dcmread(pydicom_file(name))
    frames = decode_frames(ds, name)
    assert frames.shape == (10, 64, 64)
    assert frames.dtype.isnative
    assert np.array_equal(frames, decode_frames(reference, "emri_small.dcm"))


def test_enhanced_mr_without_functional_groups_is_refused(
    pydicom_file: Callable[[str], Path],
) -> None:
    path = pydicom_file("emri_small.dcm")
    with pytest.raises(InputRejected, match="without per-frame geometry"):
        load_dicom_series(path)


def test_jpeg_lossless_matches_independent_decoder(
    dcm2niix: str, tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = pydicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(src, folder / src.name)
    subprocess.run(
        [dcm2niix, "-b", "n", "-f", "out", "-o", str(tmp_path), str(folder)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    theirs = np.asarray(nib.load(str(tmp_path / "out.nii")).dataobj)[:, :, 0]
    ours = decode_frames(pydicom.dcmread(src), src.name)[0]
    assert np.array_equal(ours, theirs.T[::-1])  # dcm2niix stores columns first, rows flipped


def test_jpeg_lossless_16bit_and_deflate_decode(pydicom_file: Callable[[str], Path]) -> None:
    jll = pydicom.dcmread(pydicom_file("JPEG-LL.dcm"))
    assert jll.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    frames = decode_frames(jll, "JPEG-LL.dcm")
    assert frames.shape == (1, 1024, 256)
    assert frames.std() > 0
    dfl = pydicom.dcmread(pydicom_file("image_dfl.dcm"))
    assert dfl.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    frames = decode_frames(dfl, "image_dfl.dcm")
    assert frames.shape == (1, 512, 512)
    assert frames.std() > 0


def test_enhanced_ct_multiframe_volume(pydicom_file: Callable[[str], Path]) -> None:
    path = pydicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = load_dicom_series(path).volume
    raw = decode_frames(ds, path.name)
    # IOP (-1,0,0 / 0,1,0): normal = -z; frame 2 (z=-149) comes before frame 1 (z=-159).
    assert volume.shape == (2, 512, 512)
    assert np.allclose(volume.affine[:3, 0], [0.0, 0.0, -10.0])
    assert np.allclose(volume.affine[:3, 3], [99.5, -301.5, -149.0])
    assert np.allclose(volume.affine[:3, 1], [0.0, 0.388672, 0.0])
    assert np.allclose(volume.affine[:3, 2], [-0.388672, 0.0, 0.0])
    assert volume.array.dtype == np.float32
    assert np.array_equal(volume.array, raw[::-1].astype(np.float64) - 1024.0)
    assert volume.units == ""  # RescaleType "US" (a perfusion map), not HU


def test_ct_small_rescaled_to_hu(pydicom_file: Callable[[str], Path]) -> None:
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = load_dicom_series(path).volume
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    assert volume.units == "HU"
    assert volume.array.dtype == np.float32
    assert np.array_equal(volume.array[0], expected)


# ----------------------------------------------------------------------------------------------
# sources: folder, zip, several series
# ----------------------------------------------------------------------------------------------


def _copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_non_dicom_files_in_folder_are_skipped(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "ct")
    (folder / "notes.txt").write_text("not dicom")
    (folder / "sub").mkdir()
    (folder / "sub" / "junk.bin").write_bytes(b"\x00" * 300)
    assert load_dicom_series(folder).volume.shape == (3, 512, 512)


def test_zip_source_loads_like_folder(
    ct3_dir: Path, ct3_series: DicomSeries, tmp_path: Path
) -> None:
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(ct3_dir.glob("*.dcm")):
            zf.write(path, f"series/{path.name}")
        zf.writestr("README.txt", "hello")
    infos = list_series(archive)
    assert len(infos) == 1
    assert set(infos[0].files) == {"series/01.dcm", "series/02.dcm", "series/03.dcm"}
    loaded = read_volume(archive)
    assert loaded.kind == "dicom"
    assert np.array_equal(loaded.volume.array, ct3_series.volume.array)
    assert np.array_equal(loaded.volume.affine, ct3_series.volume.affine)


def test_several_series_need_a_uid(ct3_dir: Path, ct3_series: DicomSeries, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "mixed")
    write_derived_series(
        ct3_series.volume,
        ct3_series.template,
        ct3_series.sop_instance_uids,
        str(ct3_series.template.SOPClassUID),
        folder / "derived",
        series_description="second series",
        derivation_description="copy",
    )
    infos = list_series(folder)
    assert len(infos) == 2
    with pytest.raises(InputRejected) as info:
        load_dicom_series(folder)
    message = str(info.value)
    for series in infos:
        assert series.series_instance_uid in message
    assert "second series" in message
    assert "3 files" in message
    assert "CT" in message
    derived = next(s for s in infos if s.series_description == "second series")
    loaded = load_dicom_series(folder, series_uid=derived.series_instance_uid)
    assert loaded.volume.meta["series_instance_uid"] == derived.series_instance_uid
    with pytest.raises(InputRejected, match="not found"):
        load_dicom_series(folder, series_uid="1.2.3.4")


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def test_single_non_dicom_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "scan.dcm"
    bogus.write_bytes(b"hello, I am not DICOM" * 20)
    with pytest.raises(InputRejected, match="not a DICOM file") as info:
        load_dicom_series(bogus)
    assert str(bogus) in str(info.value)


def test_unknown_format_names_accepted_formats(tmp_path: Path) -> None:
    bogus = tmp_path / "scan.png"
    bogus.write_bytes(b"\x89PNG....")
    with pytest.raises(InputRejected) as info:
        read_volume(bogus)
    assert str(bogus) in str(info.value)
    assert "NIfTI" in str(info.value)


def test_truncated_pixel_data_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "cut")
    victim = folder / "02.dcm"
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(InputRejected, match="truncated") as info:
        load_dicom_series(folder)
    assert "02.dcm" in str(info.value)


def test_truncated_jpeg2000_file_is_refused(example_ct_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(example_ct_dir, tmp_path / "cut")
    victim = sorted(folder.iterdir())[7]
    victim.write_bytes(victim.read_bytes()[:-5000])
    with pytest.raises(InputRejected, match="truncated") as info:
        load_dicom_series(folder, allow_missing_study_uid=True)
    assert victim.name in str(info.value)


def test_missing_slice_is_refused(example_ct_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(example_ct_dir, tmp_path / "gap")
    sorted(folder.iterdir())[10].unlink()
    with pytest.raises(InputRejected, match="missing slice"):
        load_dicom_series(folder, allow_missing_study_uid=True)


def test_duplicate_slice_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "dup")
    ds = pydicom.dcmread(folder / "02.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "02b.dcm")
    with pytest.raises(InputRejected, match="duplicate slice position"):
        load_dicom_series(folder)


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_uneven_spacing_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "uneven")
    ipp = [float(v) for v in pydicom.dcmread(folder / "03.dcm").ImagePositionPatient]
    _edit(folder / "03.dcm", ImagePositionPatient=[ipp[0], ipp[1], ipp[2] - 0.1])
    with pytest.raises(InputRejected, match="uneven slice spacing"):
        load_dicom_series(folder)


def test_inconsistent_orientation_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "orient")
    angle = np.radians(2.0)
    _edit(
        folder / "02.dcm",
        ImageOrientationPatient=[
            np.cos(angle),
            np.sin(angle),
            0.0,
            -np.sin(angle),
            np.cos(angle),
            0.0,
        ],
    )
    with pytest.raises(InputRejected, match="inconsistent orientations") as info:
        load_dicom_series(folder)
    assert "02.dcm" in str(info.value)


def test_inconsistent_pixel_spacing_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "spacing")
    _edit(folder / "03.dcm", PixelSpacing=[0.9, 0.9])
    with pytest.raises(InputRejected, match="PixelSpacing"):
        load_dicom_series(folder)


def test_mixed_frames_of_reference_are_refused(ct3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_series(ct3_dir, tmp_path / "for")
    _edit(folder / "01.dcm", FrameOfReferenceUID=generate_uid())
    with pytest.raises(InputRejected, match="mixed frames of reference"):
        load_dicom_series(folder)


def test_zip_with_parent_member_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(ct3_dir / "01.dcm", "ok/01.dcm")
        zf.write(ct3_dir / "02.dcm", "../escape.dcm")
    with pytest.raises(InputRejected, match="unsafe zip member"):
        load_dicom_series(archive)


def test_zip_with_absolute_member_is_refused(ct3_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/etc/01.dcm"), (ct3_dir / "01.dcm").read_bytes())
    with pytest.raises(InputRejected, match="unsafe zip member"):
        list_series(archive)


def test_zip_uncompressed_size_is_capped(
    ct3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(ct3_dir.glob("*.dcm")):
            zf.write(path, path.name)
    monkeypatch.setattr(dicom_files, "MAX_ZIP_UNCOMPRESSED_BYTES", 1_000_000)
    with pytest.raises(InputRejected, match="exceeds the limit"):
        load_dicom_series(archive)
