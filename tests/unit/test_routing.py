"""Routing rules as data: matching, and what route_series queues and audits (SQLite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from models.errors import InvalidParameters
from service.dicom.config import parse_dicom_config
from service.dicom.routing import Arrival, SeriesFacts, route_series, rule_matches
from service.store.db import session_scope
from service.store.tables import AuditEvent, Job
from tests.conftest import seed_series

BASE = '[nodes.pacs]\nae_title = "ORTHANC"\nport = 4242\n'


def rule(**fields: object) -> object:
    """One rule parsed from TOML (values written as JSON, which TOML accepts for these)."""
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    text = BASE + '\n[[rules]]\nname = "r"\npipeline = "zeroshot-denoise"\n' + body
    (parsed,) = parse_dicom_config(text).rules
    return parsed


CT = SeriesFacts("s1", "CT", "Thorax 1.0 B31f", "CHEST")
DIMSE = Arrival("dimse", "ORTHANC", "VOXELGATE")


def test_missing_patterns_match_anything() -> None:
    assert rule_matches(rule(), DIMSE, CT)  # type: ignore[arg-type]
    assert rule_matches(rule(), Arrival("stow"), CT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"modality": "CT"}, True),
        ({"modality": "ct"}, True),  # case-insensitive
        ({"modality": "C"}, False),  # full match, not search
        ({"modality": "MR|CT"}, True),
        ({"series_description": ".*thorax.*"}, True),
        ({"series_description": "thorax"}, False),
        ({"body_part": "CHEST|ABDOMEN"}, True),
        ({"body_part": "HEAD"}, False),
        ({"calling_ae": "ORTHANC"}, True),
        ({"calling_ae": "ORTH"}, False),
        ({"called_ae": "VOXEL.*"}, True),
        ({"called_ae": "OTHER"}, False),
        ({"modality": "CT", "body_part": "HEAD"}, False),  # every pattern must match
    ],
)
def test_patterns(fields: dict[str, str], expected: bool) -> None:
    assert rule_matches(rule(**fields), DIMSE, CT) is expected  # type: ignore[arg-type]


def test_source_filter_and_stow_has_no_ae() -> None:
    dimse_only = rule(source=["dimse"])
    assert rule_matches(dimse_only, DIMSE, CT)  # type: ignore[arg-type]
    assert not rule_matches(dimse_only, Arrival("stow"), CT)  # type: ignore[arg-type]
    # a calling-AE pattern never matches STOW-RS (no AE title)
    assert not rule_matches(rule(calling_ae="ORTHANC"), Arrival("stow"), CT)  # type: ignore[arg-type]


def test_series_description_is_stripped_before_matching() -> None:
    padded = SeriesFacts("s1", "CT ", " Thorax ", "")
    assert rule_matches(rule(modality="CT", series_description="thorax"), DIMSE, padded)  # type: ignore[arg-type]


def test_invalid_rules_are_refused_when_loaded() -> None:
    with pytest.raises(InvalidParameters, match="regular expression"):
        rule(modality="CT(")
    with pytest.raises(InvalidParameters, match="unknown destination"):
        parse_dicom_config(
            BASE + '[[rules]]\nname = "x"\npipeline = "zeroshot-denoise"\ndestinations = ["nope"]\n'
        )
    with pytest.raises(InvalidParameters):
        parse_dicom_config(BASE + '[[rules]]\nname = "x"\npipeline = "no-such-pipeline"\n')


def test_route_series_queues_matching_rules_and_audits(sqlite_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = sqlite_settings.resolved_database_url
    tenant_id, series_id = seed_series(url)
    config = parse_dicom_config(
        BASE
        + '[[rules]]\nname = "denoise"\nmodality = "CT"\npipeline = "zeroshot-denoise"\n'
        + 'priority = 7\ndestinations = ["pacs"]\n'
        + '[[rules]]\nname = "mr-only"\nmodality = "MR"\npipeline = "zeroshot-denoise"\n'
        + '[[rules]]\nname = "second"\ncalling_ae = "ORTHANC"\npipeline = "zeroshot-denoise"\n'
    )
    routed = route_series(sqlite_settings, config, tenant_id, [series_id], DIMSE)
    assert [r.rule for r in routed] == ["denoise", "second"]
    with session_scope(url) as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        assert set(jobs) == {r.job_id for r in routed}
        first = jobs[routed[0].job_id]
        assert first.priority == 7
        assert first.deliver_to == ["pacs"]
        assert first.state == "queued"
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "route")).all()
        assert sorted(e.detail["rule"] for e in events) == ["denoise", "second"]


def test_route_series_skips_a_rule_the_pipeline_refuses(sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    """An SR series cannot be denoised: the rule is skipped and audited, nothing raised."""
    url = sqlite_settings.resolved_database_url
    tenant_id, series_id = seed_series(url, modality="SR")
    config = parse_dicom_config(BASE + '[[rules]]\nname = "any"\npipeline = "zeroshot-denoise"\n')
    assert route_series(sqlite_settings, config, tenant_id, [series_id], DIMSE) == []
    with session_scope(url) as s:
        assert s.scalars(select(Job)).all() == []
        (skip,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "route_skip")).all()
        assert skip.detail["rule"] == "any"
        assert skip.resource_id == series_id
