"""Safe zip extraction: traversal, symlinks, truncation, zip bombs (declared and actual sizes)."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from models.errors import InputRejected
from service.errors import PayloadTooLarge
from service.ingest.archive import ExpansionBudget, _extract_member, extract_zip, looks_like_zip
from service.settings import Settings

MiB = 1024 * 1024


def _settings(tmp_path: Path, **limits: float) -> Settings:
    return Settings(data_dir=tmp_path / "vg", **limits)


def _extract(archive: Path, dest: Path, settings: Settings) -> list[Path]:
    return extract_zip(
        archive, dest, archive.name, settings, ExpansionBudget.from_settings(settings)
    )


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_real_dicom_zip_extracts_members_in_subfolders(tmp_path, ct3_dir):
    members = {f"CT/{p.name}": p.read_bytes() for p in sorted(ct3_dir.iterdir())}
    members["__MACOSX/CT/._01.dcm"] = b"litter"
    members["CT/.DS_Store"] = b"litter"
    archive = _zip(tmp_path / "study.zip", members)
    files = _extract(archive, tmp_path / "out", _settings(tmp_path))
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == [
        "CT/01.dcm",
        "CT/02.dcm",
        "CT/03.dcm",
    ]
    for f in files:
        assert f.read_bytes() == (ct3_dir / f.name).read_bytes()
    assert looks_like_zip(archive)
    assert not looks_like_zip(ct3_dir / "01.dcm")


@pytest.mark.parametrize(
    "name", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "..\\evil.dcm", "C:/evil.dcm"]
)
def test_path_traversal_and_absolute_members_are_refused(tmp_path, name):
    archive = _zip(tmp_path / "t.zip", {"ok.txt": b"x", name: b"payload"})
    dest = tmp_path / "deep" / "out"
    with pytest.raises(InputRejected, match="unsafe zip member name"):
        _extract(archive, dest, _settings(tmp_path))
    assert not (tmp_path / "deep" / "evil.dcm").exists()
    assert not (tmp_path / "evil.dcm").exists()
    assert not list(dest.rglob("*"))  # refused from the central directory, nothing written


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("series/link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InputRejected, match="symbolic link"):
        _extract(archive, tmp_path / "out", _settings(tmp_path))
    assert not (tmp_path / "out" / "series" / "link.dcm").exists()


def test_truncated_and_corrupt_zips_are_refused(tmp_path, ct3_dir):
    members = {p.name: p.read_bytes() for p in sorted(ct3_dir.iterdir())}
    good = _zip(tmp_path / "good.zip", members).read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputRejected, match="truncated or corrupt"):
        _extract(truncated, tmp_path / "o1", _settings(tmp_path))
    # flip bytes inside the first member's compressed data: CRC / inflate error
    corrupt = tmp_path / "corrupt.zip"
    data = bytearray(good)
    for n in range(200, 260):
        data[n] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(InputRejected, match="truncated or corrupt"):
        _extract(corrupt, tmp_path / "o2", _settings(tmp_path))


def test_bomb_refused_by_compression_ratio_before_extraction(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(64 * MiB)})
    assert archive.stat().st_size < MiB  # ~1000-fold
    with pytest.raises(PayloadTooLarge, match=r"expands \d+-fold"):
        _extract(archive, tmp_path / "out", _settings(tmp_path))
    assert _tree_bytes(tmp_path / "out") == 0


def test_refused_by_declared_total_size(tmp_path):
    payload = os.urandom(3 * MiB)  # incompressible: the ratio check does not apply
    archive = _zip(tmp_path / "big.zip", {"a.bin": payload, "b.bin": payload})
    settings = _settings(tmp_path, max_expanded_bytes=5 * MiB)
    with pytest.raises(PayloadTooLarge, match="declared expanded size"):
        _extract(archive, tmp_path / "out", settings)
    assert _tree_bytes(tmp_path / "out") == 0


def _lie_about_size(archive: Path, declared: int) -> None:
    """Overwrite the uncompressed size in the local header and the central directory."""
    data = bytearray(archive.read_bytes())
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, declared)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)
    archive.write_bytes(bytes(data))


def test_header_that_understates_the_size_is_refused_after_the_declared_bytes(tmp_path):
    archive = _zip(tmp_path / "liar.zip", {"zeros.bin": bytes(48 * MiB)})
    _lie_about_size(archive, 1000)
    assert zipfile.ZipFile(archive).infolist()[0].file_size == 1000
    dest = tmp_path / "out"
    with pytest.raises(InputRejected, match="truncated or corrupt"):
        _extract(archive, dest, _settings(tmp_path))
    assert _tree_bytes(dest) <= 1000  # never more than declared was written


def test_header_that_overstates_the_size_is_refused_by_declared_size(tmp_path):
    archive = _zip(tmp_path / "liar.zip", {"small.bin": os.urandom(1000)})
    _lie_about_size(archive, 3 * 1024**3)
    with pytest.raises(PayloadTooLarge):
        _extract(archive, tmp_path / "out", _settings(tmp_path, max_expanded_bytes=2 * 1024**3))


class _LyingArchive:
    """A stand-in whose member stream yields more bytes than the ZipInfo declares."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open(self, info: zipfile.ZipInfo) -> io.BytesIO:
        return io.BytesIO(self.data)


def test_actual_bytes_are_counted_against_declared_size_and_budget(tmp_path):
    settings = _settings(tmp_path)
    info = zipfile.ZipInfo("m.bin")
    info.file_size, info.compress_size = 1000, 1000
    archive = _LyingArchive(bytes(3 * MiB))
    with pytest.raises(InputRejected, match="beyond its declared size"):
        _extract_member(
            archive,
            info,
            tmp_path / "a.bin",
            "x.zip",
            settings,  # type: ignore[arg-type]
            ExpansionBudget(10 * MiB, 10),
        )
    assert (tmp_path / "a.bin").stat().st_size <= MiB  # stopped at the first 1 MiB chunk
    info.file_size = 10 * MiB
    with pytest.raises(PayloadTooLarge, match="expands beyond the limit"):
        _extract_member(
            archive,
            info,
            tmp_path / "b.bin",
            "x.zip",
            settings,  # type: ignore[arg-type]
            ExpansionBudget(2 * MiB, 10),
        )


def test_budget_is_shared_by_the_archives_of_one_upload(tmp_path):
    settings = _settings(tmp_path, max_expanded_bytes=5 * MiB, max_archive_members=3)
    budget = ExpansionBudget.from_settings(settings)
    first = _zip(tmp_path / "1.zip", {"a.bin": os.urandom(3 * MiB), "b.txt": b"b"})
    second = _zip(tmp_path / "2.zip", {"c.bin": os.urandom(3 * MiB)})
    assert len(extract_zip(first, tmp_path / "o1", "1.zip", settings, budget)) == 2
    assert budget.members_left == 1
    with pytest.raises(PayloadTooLarge, match="declared expanded size"):
        extract_zip(second, tmp_path / "o2", "2.zip", settings, budget)


def test_member_count_limit(tmp_path):
    archive = _zip(tmp_path / "many.zip", {f"{n}.txt": b"x" for n in range(5)})
    with pytest.raises(PayloadTooLarge, match="5 archive members"):
        _extract(archive, tmp_path / "out", _settings(tmp_path, max_archive_members=4))


def test_duplicate_member_names_are_refused(tmp_path):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.dcm", b"one")
        with pytest.warns(UserWarning, match="Duplicate"):
            zf.writestr("a.dcm", b"two")
    with pytest.raises(InputRejected, match="duplicate zip member"):
        _extract(archive, tmp_path / "out", _settings(tmp_path))
