"""Audit log: who (tenant, API key id) did what (action) to which resource (by id).

Events hold identifiers only, never patient data: ``detail`` takes flat JSON scalars (or lists
of them) and refuses keys that name patient attributes. An event is written in the caller's
transaction, so it is committed exactly when the audited change is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.store.tables import AuditEvent

ACTIONS = frozenset(
    {
        "upload",
        "delete",
        "submit",
        "cancel",
        "retry",
        "download",
        "cohort",
        # DICOM networking: instances received (C-STORE / STOW-RS), retrieved from a node,
        # routing decisions, and deliveries of outputs to a node
        "receive",
        "retrieve",
        "route",
        "route_skip",
        "deliver",
    }
)
_FORBIDDEN_KEY_PARTS = ("patient", "name", "birth", "address", "phone")
_Scalar = str | int | float | bool | None


def _check_detail(detail: dict[str, Any]) -> dict[str, Any]:
    for key, value in detail.items():
        if not isinstance(key, str) or any(p in key.lower() for p in _FORBIDDEN_KEY_PARTS):
            raise ValueError(f"audit detail key {key!r} is not allowed (ids only)")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _Scalar) for v in values):
            raise ValueError(f"audit detail {key!r} must be a JSON scalar or a list of them")
    return dict(detail)


def record(
    session: Session,
    *,
    tenant_id: str,
    key_id: str,
    action: str,
    resource: str,
    resource_id: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the session (committed with the caller's transaction).

    Args:
        session: Open session.
        tenant_id: Tenant acting.
        key_id: Id of the API key used ("" for the CLI or the system).
        action: One of :data:`ACTIONS`.
        resource: Kind of resource, e.g. "study", "series", "job", "cohort", "output"
            (at most 16 characters).
        resource_id: Its id (at most 64 characters).
        detail: Extra ids or figures, e.g. ``{"pipeline": "zeroshot-denoise", "bytes": 123}``.

    Raises:
        ValueError: Unknown action, over-long field or a detail that is not ids-only data.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if not resource or len(resource) > 16 or len(resource_id) > 64 or len(key_id) > 16:
        raise ValueError("audit resource, resource_id or key_id out of bounds")
    session.add(
        AuditEvent(
            tenant_id=tenant_id,
            key_id=key_id,
            action=action,
            resource=resource,
            resource_id=resource_id,
            detail=_check_detail(detail or {}),
        )
    )


def list_events(
    session: Session, tenant_id: str, limit: int = 100, *, action: str | None = None
) -> list[AuditEvent]:
    """Return a tenant's newest audit events first.

    Args:
        session: Open session.
        tenant_id: Whose events.
        limit: Most events returned (1-10000).
        action: Only events of this action, when given.
    """
    limit = max(1, min(int(limit), 10_000))
    stmt = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
    if action is not None:
        stmt = stmt.where(AuditEvent.action == action)
    stmt = stmt.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    return list(session.scalars(stmt))
