"""Study/series queries as data, shared by C-FIND (``scu``) and QIDO-RS (``dicomweb``).

A :class:`StudyQuery` is validated once (date range syntax, DICOM keywords) and turned into a
C-FIND identifier or QIDO-RS search filters. Answers become :class:`StudyMatch` /
:class:`SeriesMatch`: UIDs, dates, modalities, descriptions and counts, never patient names or
IDs (a caller may *filter* on ``PatientID``; it is not echoed back).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Return keys asked for at study / series level (empty = "return it").
STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
# Identifying keys a query may filter on but that answers never carry back.
_NEVER_RETURNED = frozenset({"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs"})


def check_uid(value: str) -> str:
    """Return ``value`` if it is a syntactically valid DICOM UID, else raise ``ValueError``."""
    if len(value) > 64 or not _UID.match(value):
        raise ValueError(f"not a DICOM UID: {value[:70]!r}")
    return value


def check_date_range(value: str) -> str:
    """Return a DICOM date or range (``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``-YYYYMMDD``, ...).

    Raises:
        ValueError: Not of that form, or the range ends before it starts.
    """
    match = _DATE_RANGE.match(value.strip())
    if not match or not value.strip() or value.strip() == "-":
        raise ValueError(f"study date must be YYYYMMDD or YYYYMMDD-YYYYMMDD, got {value!r}")
    start, end = match.group(1), match.group(3)
    if start and end and end < start:
        raise ValueError(f"study date range ends before it starts: {value!r}")
    return value.strip()


class StudyQuery(BaseModel):
    """What to look for at study level.

    Attributes:
        modality: Modality that must be in the study (``ModalitiesInStudy``), e.g. ``"CT"``.
        study_date: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (open ends allowed).
        study_uid: One StudyInstanceUID.
        keys: Further matching keys by DICOM keyword (e.g. ``{"StudyDescription": "*CHEST*"}``),
            sent as given (wildcards ``*``/``?`` as the peer supports them).
        limit: Most matches returned.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str | None = Field(None, max_length=16)
    study_date: str | None = None
    study_uid: str | None = None
    keys: dict[str, str] = Field(default_factory=dict)
    limit: int = Field(1000, ge=1, le=10000)

    @field_validator("study_date")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        return None if value is None else check_date_range(value)

    @field_validator("study_uid")
    @classmethod
    def _uid(cls, value: str | None) -> str | None:
        return None if value is None else check_uid(value)

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        for keyword, text in value.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"not a DICOM keyword: {keyword!r}")
            if dictionary_VR(keyword) == "SQ":
                raise ValueError(f"sequence keys cannot be matched: {keyword!r}")
            if len(text) > 256:
                raise ValueError(f"value of {keyword} too long")
        return value

    def filters(self) -> dict[str, str]:
        """Matching keys by keyword (only the given ones)."""
        out = dict(self.keys)
        if self.modality:
            out["ModalitiesInStudy"] = self.modality
        if self.study_date:
            out["StudyDate"] = self.study_date
        if self.study_uid:
            out["StudyInstanceUID"] = self.study_uid
        return out

    def safe_summary(self) -> dict[str, Any]:
        """The query for logs and audit: identifying keys replaced by ``"<given>"``."""
        return {k: ("<given>" if k in _NEVER_RETURNED else v) for k, v in self.filters().items()}


def study_identifier(query: StudyQuery) -> Dataset:
    """The C-FIND identifier of ``query`` (study level; return keys empty)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_RETURN_KEYS:
        setattr(ds, keyword, "")
    for keyword, value in query.filters().items():
        setattr(ds, keyword, value)
    return ds


def series_identifier(study_uid: str) -> Dataset:
    """The C-FIND identifier for the series of one study."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    for keyword in SERIES_RETURN_KEYS:
        setattr(ds, keyword, "")
    ds.StudyInstanceUID = check_uid(study_uid)
    return ds


@dataclass(frozen=True)
class StudyMatch:
    """One study a peer reported (no patient identifiers).

    Attributes:
        study_uid: StudyInstanceUID.
        study_date: StudyDate (``YYYYMMDD``, may be empty).
        study_time: StudyTime (may be empty).
        description: StudyDescription.
        modalities: ModalitiesInStudy.
        n_series: NumberOfStudyRelatedSeries, if reported.
        n_instances: NumberOfStudyRelatedInstances, if reported.
    """

    study_uid: str
    study_date: str = ""
    study_time: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()
    n_series: int | None = None
    n_instances: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data


@dataclass(frozen=True)
class SeriesMatch:
    """One series a peer reported.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality.
        description: SeriesDescription.
        number: SeriesNumber, if any.
        body_part: BodyPartExamined.
        n_instances: NumberOfSeriesRelatedInstances, if reported.
    """

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    body_part: str = ""
    n_instances: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, MultiValue | list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value).split("\\") if v.strip())


def study_match(ds: Dataset) -> StudyMatch | None:
    """A :class:`StudyMatch` from a C-FIND answer or QIDO-RS result (None without a UID)."""
    uid = _text(ds, "StudyInstanceUID")
    if not uid:
        return None
    return StudyMatch(
        study_uid=str(UID(uid)),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        description=_text(ds, "StudyDescription"),
        modalities=_multi(ds, "ModalitiesInStudy"),
        n_series=_int(ds, "NumberOfStudyRelatedSeries"),
        n_instances=_int(ds, "NumberOfStudyRelatedInstances"),
    )


def series_match(ds: Dataset, study_uid: str = "") -> SeriesMatch | None:
    """A :class:`SeriesMatch` from a C-FIND answer or QIDO-RS result (None without a UID)."""
    uid = _text(ds, "SeriesInstanceUID")
    if not uid:
        return None
    return SeriesMatch(
        study_uid=_text(ds, "StudyInstanceUID") or study_uid,
        series_uid=uid,
        modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"),
        number=_int(ds, "SeriesNumber"),
        body_part=_text(ds, "BodyPartExamined"),
        n_instances=_int(ds, "NumberOfSeriesRelatedInstances"),
    )


def unique_studies(matches: Iterable[StudyMatch | None], limit: int) -> list[StudyMatch]:
    """Matches without ``None`` and repeated UIDs, at most ``limit``, in arrival order."""
    seen: set[str] = set()
    out: list[StudyMatch] = []
    for match in matches:
        if match is None or match.study_uid in seen:
            continue
        seen.add(match.study_uid)
        out.append(match)
        if len(out) >= limit:
            break
    return out
