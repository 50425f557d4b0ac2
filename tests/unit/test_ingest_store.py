"""ingest_files and the studies repository on real DICOM/NIfTI, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from models.errors import InputRejected
from service.errors import NotFound
from service.io.nifti import read_nifti
from service.io.read_any import read_volume
from service.store import studies
from service.store.blobs import BlobStore
from service.store.db import session_scope
from service.store.tables import Instance, Series, Study, Tenant

NIFTI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "totalsegmentator"


class Store:
    """A fresh store: settings, blobs, two tenants, and a staging helper."""

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.url = settings.resolved_database_url
        self.blobs = BlobStore(settings.data_dir / "blobs")
        with session_scope(self.url) as s:
            a, b = Tenant(name="a"), Tenant(name="b")
            s.add_all([a, b])
            s.flush()
            self.tenant, self.other = a.id, b.id
        self._n = 0

    def stage(self, paths: Iterable[Path]) -> list[Path]:
        """Copy files into a staging folder laid out as receive_upload does."""
        self._n += 1
        folder = self.blobs.root / "staging" / f"t{self._n}"
        out = []
        for n, path in enumerate(paths):
            dest = folder / f"{n:04d}.vgupload" / path.name
            dest.parent.mkdir(parents=True)
            shutil.copy(path, dest)
            out.append(dest)
        return out

    def ingest(self, paths: Iterable[Path], tenant: str | None = None, **kw):  # type: ignore[no-untyped-def]
        with session_scope(self.url) as s:
            return studies.ingest_files(
                s, self.blobs, tenant or self.tenant, self.stage(paths), self.settings, **kw
            )

    def counts(self) -> tuple[int, int, int, int]:
        """Rows of studies (not deleted), series, instances, and blob files on disk."""
        with session_scope(self.url) as s:
            rows = (
                s.query(Study).filter(Study.deleted_at.is_(None)).count(),
                s.query(Series).count(),
                s.query(Instance).count(),
            )
        files = [p for p in (self.blobs.root / "studies").rglob("*") if p.is_file()]
        return (*rows, len(files))


@pytest.fixture
def store(store_settings) -> Store:  # type: ignore[no-untyped-def]
    return Store(store_settings)


def _variant(src: Path, dest: Path, **attrs: str) -> Path:
    """A copy of a DICOM file with some attributes changed."""
    ds = pydicom.dcmread(src)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in attrs:
        ds.file_meta.MediaStorageSOPInstanceUID = attrs["SOPInstanceUID"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)
    return dest


def _other_study(ct3_dir: Path, folder: Path, **extra: str) -> list[Path]:
    """The three CT slices as a new study/series (new UIDs), same patient unless overridden."""
    study, series = generate_uid(), generate_uid()
    return [
        _variant(
            p,
            folder / p.name,
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            SOPInstanceUID=generate_uid(),
            **extra,
        )
        for p in sorted(ct3_dir.iterdir())
    ]


def test_ct3_upload_geometry_matches_the_reader_and_reupload_is_idempotent(store, ct3_dir):
    files = sorted(ct3_dir.iterdir())
    first = store.ingest(files)
    assert (first.instances_stored, first.instances_duplicate) == (3, 0)
    assert first.bytes_stored == sum(p.stat().st_size for p in files)
    again = store.ingest(files)
    assert again.study_ids == first.study_ids
    assert again.series_ids == first.series_ids
    assert (again.instances_stored, again.instances_duplicate, again.bytes_stored) == (0, 3, 0)
    assert store.counts() == (1, 1, 3, 3)
    with session_scope(store.url) as s:
        study = studies.get_study(s, store.tenant, first.study_ids[0])
        summary = studies.study_summary(s, study)
        series = studies.get_series(s, store.tenant, first.series_ids[0])
        path = studies.series_input_path(s, store.blobs, series)
    assert summary["study_instance_uid"] == pydicom.dcmread(files[0]).StudyInstanceUID
    assert summary["study_date"] == "20030417"
    assert not summary["uid_derived"]
    (entry,) = summary["series"]
    assert (entry["kind"], entry["modality"], entry["instance_count"]) == ("dicom", "CT", 3)
    assert entry["size_bytes"] == first.bytes_stored
    volume = read_volume(path).volume
    geometry = entry["geometry"]
    assert geometry["shape"] == list(volume.shape) == [3, 512, 512]
    np.testing.assert_allclose(geometry["affine_lps"], volume.affine, atol=1e-5)
    np.testing.assert_allclose(geometry["spacing_mm"], volume.spacing, atol=1e-5)
    assert geometry["plane"] == "axial"


def test_empty_uids_are_derived_deterministically(store, example_ct_dir):
    files = sorted(example_ct_dir.iterdir())
    assert pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID == ""
    first = store.ingest(files)
    again = store.ingest(reversed(files))
    assert again.study_ids == first.study_ids
    assert again.instances_duplicate == 20
    with session_scope(store.url) as s:
        summary = studies.study_summary(s, studies.get_study(s, store.tenant, first.study_ids[0]))
        series = studies.get_series(s, store.tenant, first.series_ids[0])
        path = studies.series_input_path(s, store.blobs, series)
    assert summary["uid_derived"]
    assert summary["series"][0]["uid_derived"]
    for uid in (summary["study_instance_uid"], summary["series"][0]["series_instance_uid"]):
        assert uid.startswith("2.25.")
        assert len(uid) <= 64
    geometry = summary["series"][0]["geometry"]
    assert geometry["shape"] == [20, 512, 512]
    volume = read_volume(path, allow_missing_study_uid=True).volume  # JPEG 2000 decoded
    np.testing.assert_allclose(geometry["affine_lps"], volume.affine, atol=1e-5)
    assert store.counts() == (1, 1, 20, 20)


def test_nifti_upload_is_one_study_with_one_series(store):
    path = NIFTI / "example_ct_sm.nii.gz"
    if not path.exists():
        pytest.skip("shared NIfTI example not available")
    report = store.ingest([path], nifti_modality="CT")
    assert store.ingest([path]).instances_duplicate == 1
    with session_scope(store.url) as s:
        summary = studies.study_summary(s, studies.get_study(s, store.tenant, report.study_ids[0]))
        series = studies.get_series(s, store.tenant, report.series_ids[0])
        stored = studies.series_input_path(s, store.blobs, series)
    (entry,) = summary["series"]
    assert (entry["kind"], entry["modality"], entry["description"]) == (
        "nifti",
        "CT",
        "example_ct_sm.nii.gz",
    )
    assert stored.name.endswith(".nii.gz")
    assert stored.read_bytes() == path.read_bytes()
    volume = read_nifti(stored)
    assert entry["geometry"]["shape"] == list(volume.shape)
    np.testing.assert_allclose(entry["geometry"]["affine_lps"], volume.affine, atol=1e-5)
    with pytest.raises(InputRejected, match="modality"):
        store.ingest([path], nifti_modality="ct; drop")


def test_pydicom_files_duplicate_sop_uid_keeps_the_first(store, pydicom_file):
    # pydicom's MR_small variants share one SOPInstanceUID but differ in encoding
    report = store.ingest([pydicom_file("MR_small.dcm"), pydicom_file("MR_small_bigendian.dcm")])
    assert (report.instances_stored, report.instances_duplicate) == (1, 1)
    assert report.duplicates_differing == 1
    assert store.counts() == (1, 1, 1, 1)


def test_mixed_patients_refused_with_nothing_stored(store, pydicom_file, ct3_dir, tmp_path):
    with pytest.raises(InputRejected, match="mixes 2 patients") as info:
        store.ingest([pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")])
    ct = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert str(ct.PatientName) not in str(info.value)
    assert ct.PatientID not in str(info.value)
    assert "MR_small.dcm" in str(info.value)
    renamed = _variant(sorted(ct3_dir.iterdir())[0], tmp_path / "x.dcm", PatientName="Other^Pat")
    with pytest.raises(InputRejected, match="mixes 2 patients"):
        store.ingest([*sorted(ct3_dir.iterdir())[1:], renamed])
    assert store.counts() == (0, 0, 0, 0)


def test_non_dicom_file_refused_by_upload_name(store, ct3_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(InputRejected, match=r"^notes\.txt: not a DICOM Part 10 file"):
        store.ingest([*sorted(ct3_dir.iterdir()), notes])
    assert store.counts() == (0, 0, 0, 0)


def test_truncated_files_are_refused(store, ct3_dir, example_ct_dir, tmp_path):
    for src in (sorted(ct3_dir.iterdir())[0], sorted(example_ct_dir.iterdir())[0]):
        cut = tmp_path / f"cut-{src.name[-8:]}.dcm"
        cut.write_bytes(src.read_bytes()[:-3000])
        with pytest.raises(InputRejected, match="truncated"):
            store.ingest([cut])
    nifti = NIFTI / "example_ct_sm.nii.gz"
    if nifti.exists():
        cut = tmp_path / "cut.nii.gz"
        cut.write_bytes(nifti.read_bytes()[:-20000])
        with pytest.raises(InputRejected, match=r"cut\.nii\.gz: truncated"):
            store.ingest([cut])
    assert store.counts() == (0, 0, 0, 0)


def test_failure_midway_leaves_no_partial_study_and_keeps_the_stored_one(store, ct3_dir, tmp_path):
    # stored first: study S of patient P
    stored = store.ingest(sorted(ct3_dir.iterdir()))
    before = store.counts()
    # then one upload of patient Q: a new study X (goes first), and study S again with new
    # instances; S belongs to P, so the upload fails after X was written.
    new_study = _other_study(ct3_dir, tmp_path / "x", PatientName="Q^Q", PatientID="Q1")
    into_s = [
        _variant(
            p,
            tmp_path / "s" / p.name,
            SOPInstanceUID=generate_uid(),
            PatientName="Q^Q",
            PatientID="Q1",
        )
        for p in sorted(ct3_dir.iterdir())
    ]
    with pytest.raises(InputRejected, match="differs from the patient of stored study"):
        store.ingest([*new_study, *into_s])
    assert store.counts() == before == (1, 1, 3, 3)
    with session_scope(store.url) as s:
        assert [st.id for st in studies.list_studies(s, store.tenant)] == stored.study_ids


def test_blob_failure_midway_removes_what_this_upload_wrote(store, ct3_dir, tmp_path, monkeypatch):
    stored = store.ingest(sorted(ct3_dir.iterdir()))
    extra = [
        _variant(p, tmp_path / "more" / p.name, SOPInstanceUID=generate_uid())
        for p in sorted(ct3_dir.iterdir())
    ]
    other = _other_study(ct3_dir, tmp_path / "other")
    real_put, calls = BlobStore.put_file, []

    def failing_put(self, source, key):  # type: ignore[no-untyped-def]
        calls.append(key)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_put(self, source, key)

    monkeypatch.setattr(BlobStore, "put_file", failing_put)
    with pytest.raises(OSError, match="No space"):
        store.ingest([*extra, *other])  # 3 into the stored series, then a new study
    assert len(calls) == 5
    assert store.counts() == (1, 1, 3, 3)
    with session_scope(store.url) as s:
        summary = studies.study_summary(s, studies.get_study(s, store.tenant, stored.study_ids[0]))
    assert summary["instance_count"] == 3
    monkeypatch.setattr(BlobStore, "put_file", real_put)
    report = store.ingest([*extra, *other])  # the same upload now goes through
    assert report.instances_stored == 6
    assert store.counts() == (2, 2, 9, 9)


def test_adding_slices_to_a_stored_series_recomputes_its_geometry(store, ct3_dir, tmp_path):
    files = sorted(ct3_dir.iterdir())
    report = store.ingest(files[:2])
    with session_scope(store.url) as s:
        assert studies.get_series(s, store.tenant, report.series_ids[0]).geometry["shape"][0] == 2
    store.ingest(files)
    with session_scope(store.url) as s:
        series = studies.get_series(s, store.tenant, report.series_ids[0])
        assert series.geometry["shape"] == [3, 512, 512]


def test_delete_study_and_reupload(store, ct3_dir):
    files = sorted(ct3_dir.iterdir())
    report = store.ingest(files)
    study_id, series_id = report.study_ids[0], report.series_ids[0]
    with session_scope(store.url) as s:
        series = studies.get_series(s, store.tenant, series_id)
        folder = studies.series_input_path(s, store.blobs, series)
        studies.delete_study(s, store.blobs, store.tenant, study_id)
    assert not folder.exists()
    with session_scope(store.url) as s:
        with pytest.raises(NotFound):
            studies.get_study(s, store.tenant, study_id)
        with pytest.raises(NotFound):
            studies.get_series(s, store.tenant, series_id)
        with pytest.raises(NotFound):
            studies.delete_study(s, store.blobs, store.tenant, study_id)
        with pytest.raises(NotFound):
            studies.series_input_path(s, store.blobs, s.get(Series, series_id))
        assert studies.list_studies(s, store.tenant) == []
        assert s.query(Instance).count() == 0
        assert s.get(Series, series_id) is not None
    again = store.ingest(files)  # revives the same study, series row reused
    assert again.study_ids == [study_id]
    assert again.instances_stored == 3
    with session_scope(store.url) as s:
        summary = studies.study_summary(s, studies.get_study(s, store.tenant, study_id))
    assert summary["series"][0]["geometry"]["shape"] == [3, 512, 512]


def test_tenant_isolation(store, ct3_dir):
    files = sorted(ct3_dir.iterdir())
    mine = store.ingest(files)
    theirs = store.ingest(files, tenant=store.other)  # same UIDs, separate study for tenant b
    assert theirs.study_ids != mine.study_ids
    assert theirs.instances_stored == 3
    with session_scope(store.url) as s:
        for tenant, report in ((store.other, mine), (store.tenant, theirs)):
            with pytest.raises(NotFound):
                studies.get_study(s, tenant, report.study_ids[0])
            with pytest.raises(NotFound):
                studies.get_series(s, tenant, report.series_ids[0])
            with pytest.raises(NotFound):
                studies.delete_study(s, store.blobs, tenant, report.study_ids[0])
        assert [x.id for x in studies.list_studies(s, store.tenant)] == mine.study_ids
        assert [x.id for x in studies.list_studies(s, store.other)] == theirs.study_ids
        with pytest.raises(NotFound):
            studies.get_study(s, store.tenant, "0" * 32)
