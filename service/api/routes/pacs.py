"""``/dicom/nodes``: the configured DICOM peers; echo, query, retrieve, PACS-query cohorts.

Answers carry UIDs, dates, modalities, descriptions and counts of what the caller asked for,
never patient names or IDs. A peer that does not answer is 504 (``peer_unreachable``), one that
refuses 502 (``peer_failed``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import Principal, get_app_settings, get_principal
from service.dicom import dicomweb, scu
from service.dicom.config import Node, load_dicom_config
from service.dicom.pacs_cohort import create_pacs_cohort
from service.dicom.query import StudyQuery
from service.dicom.retrieve import retrieve_study
from service.dicom.search import search_node
from service.jobs.cohorts import cohort_rollup
from service.settings import Settings
from service.store.db import session_scope
from service.store.studies import get_study, study_summary

router = APIRouter(prefix="/dicom", tags=["dicom"])
Via = Literal["move", "get", "dicomweb"]


class FindRequest(StudyQuery):
    """A study-level query; ``series`` adds each study's series (one more query per study)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [{"modality": "CT", "study_date": "20240101-20241231"}]},
    )
    series: bool = False
    via: Literal["dimse", "dicomweb"] | None = Field(
        None, description="C-FIND or QIDO-RS (default: C-FIND when the node has DIMSE)"
    )

    def query(self) -> StudyQuery:
        """The plain query part."""
        return StudyQuery.model_validate(self.model_dump(exclude={"series", "via"}))


class RetrieveRequest(BaseModel):
    """Pull one study into the store."""

    model_config = ConfigDict(extra="forbid")
    study_uid: str = Field(..., max_length=64, description="StudyInstanceUID on the node")
    via: Via | None = Field(None, description="default: the node's retrieve_via")


class PacsCohortRequest(BaseModel):
    """Find studies on the node, retrieve them, run a pipeline on each fitting series."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": {"modality": "CT", "study_date": "20240101-20240131"},
                    "pipeline": "zeroshot-denoise",
                    "params": {},
                    "priority": 4,
                    "destinations": ["pacs"],
                }
            ]
        },
    )
    query: StudyQuery
    pipeline: str = Field(..., max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=9)
    destinations: list[str] = Field(default_factory=list, max_length=16)
    via: Via | None = None


def _node_view(node: Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port,
        "dicomweb_url": node.dicomweb_url,
        "send_via": node.send_via,
        "retrieve_via": node.retrieve_via,
        "may_send": node.may_send,
    }


@router.get("/nodes", summary="Configured DICOM nodes")
def list_nodes(
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """The peers of the DICOM configuration and our listener's AE title."""
    del principal
    config = load_dicom_config(settings)
    return {
        "listener": {"ae_title": config.listener.ae_title, "port": config.listener.port},
        "nodes": [_node_view(n) for n in sorted(config.nodes.values(), key=lambda n: n.name)],
    }


@router.post("/nodes/{name}/echo", summary="Check that a node answers")
def echo_node(
    name: str,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """C-ECHO (or, for a DICOMweb-only node, a one-result QIDO-RS query)."""
    del principal
    node = load_dicom_config(settings).node(name)
    started = time.monotonic()
    if node.has_dimse:
        status, via = scu.echo(node, settings), "dimse"
    else:
        dicomweb.qido_studies(node, StudyQuery(limit=1), timeout_s=settings.dimse_timeout_s)
        status, via = 0, "dicomweb"
    return {
        "node": node.name,
        "via": via,
        "status": f"0x{status:04X}",
        "ms": round((time.monotonic() - started) * 1000, 1),
    }


@router.post("/nodes/{name}/find", summary="Query a node for studies")
def find(
    name: str,
    body: FindRequest,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Study-level C-FIND (or QIDO-RS); with ``series``, each study's series too."""
    del principal
    node = load_dicom_config(settings).node(name)
    via, studies = search_node(
        settings,
        node,
        body.query(),
        dicomweb_first=body.via == "dicomweb",
        with_series=body.series,
    )
    return {"node": node.name, "via": via, "studies": studies}


@router.post("/nodes/{name}/retrieve", status_code=201, summary="Retrieve a study")
def retrieve(
    name: str,
    body: RetrieveRequest,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Pull a study into the store (C-MOVE, C-GET or WADO-RS); waits until it is stored."""
    report = retrieve_study(
        settings, principal.tenant_id, name, body.study_uid, body.via, key_id=principal.key_id
    )
    with session_scope(settings.resolved_database_url) as session:
        studies = [
            study_summary(session, get_study(session, principal.tenant_id, sid))
            for sid in report.study_ids
        ]
    return {
        "studies": studies,
        "instances_stored": report.instances_stored,
        "instances_duplicate": report.instances_duplicate,
        "bytes_stored": report.bytes_stored,
    }


@router.post("/nodes/{name}/cohorts", status_code=201, summary="Cohort from a PACS query")
def create_cohort(
    name: str,
    body: PacsCohortRequest,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Queue the fetch of the query's studies; follow it with ``GET /cohorts/{id}``."""
    cohort_id = create_pacs_cohort(
        settings,
        principal.tenant_id,
        name,
        body.query,
        body.pipeline,
        body.params,
        priority=body.priority,
        destinations=body.destinations,
        via=body.via,
    )
    with session_scope(settings.resolved_database_url) as session:
        principal.audit(
            session,
            "cohort",
            "cohort",
            cohort_id,
            {"pipeline": body.pipeline, "node": name},
        )
        return cohort_rollup(session, principal.tenant_id, cohort_id)
