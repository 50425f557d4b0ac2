"""Transcoding decisions and conversions for C-STORE, on the real CT files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from models.errors import InputRejected
from service.delivery.transcode import Plan, apply, plan, proposed_syntaxes


def _first(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if p.is_file())[0]


def _reread(ds: object) -> object:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    buffer.seek(0)
    return dcmread(buffer)


@pytest.mark.parametrize(
    ("stored", "accepted", "expected"),
    [
        (
            ExplicitVRLittleEndian,
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
            Plan(ExplicitVRLittleEndian, "none"),
        ),
        (
            ExplicitVRLittleEndian,
            [ImplicitVRLittleEndian],
            Plan(ImplicitVRLittleEndian, "reencode"),
        ),
        (
            ImplicitVRLittleEndian,
            [RLELossless, ExplicitVRLittleEndian],
            Plan(ExplicitVRLittleEndian, "reencode"),
        ),
        (JPEG2000Lossless, [ImplicitVRLittleEndian], Plan(ImplicitVRLittleEndian, "decompress")),
        (
            JPEG2000Lossless,
            [JPEG2000Lossless, ImplicitVRLittleEndian],
            Plan(JPEG2000Lossless, "none"),
        ),
        (JPEG2000Lossless, [RLELossless], Plan(RLELossless, "compress")),
        (ExplicitVRLittleEndian, [RLELossless], Plan(RLELossless, "compress")),
    ],
)
def test_plan_prefers_the_stored_syntax_then_uncompressed_then_rle(
    stored: str, accepted: list[str], expected: Plan
) -> None:
    assert plan(stored, accepted) == expected


def test_plan_refuses_what_it_cannot_reach() -> None:
    with pytest.raises(InputRejected, match="accepts none"):
        plan(JPEG2000Lossless, [JPEGBaseline8Bit])
    with pytest.raises(InputRejected):
        plan(ExplicitVRLittleEndian, [DeflatedExplicitVRLittleEndian])
    with pytest.raises(InputRejected, match="Big Endian"):
        plan(ExplicitVRBigEndian, [ExplicitVRLittleEndian])
    assert plan(ExplicitVRBigEndian, [ExplicitVRBigEndian]).action == "none"


def test_proposed_syntaxes_start_with_the_stored_ones() -> None:
    assert proposed_syntaxes([JPEG2000Lossless, ExplicitVRLittleEndian]) == [
        JPEG2000Lossless,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
    ]


def test_jpeg2000_ct_decompressed_to_implicit_keeps_pixels_and_uid(example_ct_dir: Path) -> None:
    ds = dcmread(_first(example_ct_dir))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    pixels, uid = ds.pixel_array.copy(), ds.SOPInstanceUID
    out = _reread(apply(ds, plan(JPEG2000Lossless, [ImplicitVRLittleEndian])))
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian  # type: ignore[attr-defined]
    assert out.SOPInstanceUID == uid  # type: ignore[attr-defined]
    assert np.array_equal(out.pixel_array, pixels)  # type: ignore[attr-defined]


@pytest.mark.parametrize("source", ["ct3", "j2k"])
def test_rle_compression_is_lossless(source: str, ct3_dir: Path, example_ct_dir: Path) -> None:
    ds = dcmread(_first(ct3_dir if source == "ct3" else example_ct_dir))
    pixels, uid = ds.pixel_array.copy(), ds.SOPInstanceUID
    out = _reread(apply(ds, plan(ds.file_meta.TransferSyntaxUID, [RLELossless])))
    assert out.file_meta.TransferSyntaxUID == RLELossless  # type: ignore[attr-defined]
    assert out.SOPInstanceUID == uid  # type: ignore[attr-defined]
    assert np.array_equal(out.pixel_array, pixels)  # type: ignore[attr-defined]


def test_implicit_to_explicit_reencoding_keeps_every_element(ct3_dir: Path) -> None:
    original = dcmread(_first(ct3_dir))
    assert original.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    out = _reread(
        apply(dcmread(_first(ct3_dir)), plan(ImplicitVRLittleEndian, [ExplicitVRLittleEndian]))
    )
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # type: ignore[attr-defined]
    # every element but the retired group lengths (xxxx,0000), which pydicom drops on writing
    kept = [e.tag for e in original if e.tag.element != 0]
    assert [e.tag for e in out] == kept  # type: ignore[attr-defined]
    assert np.array_equal(out.pixel_array, original.pixel_array)  # type: ignore[attr-defined]
