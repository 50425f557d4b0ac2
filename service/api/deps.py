"""Request dependencies: settings, blob store, database session and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.errors import Unauthorized
from service.settings import Settings
from service.store import audit
from service.store.auth import resolve_api_key
from service.store.blobs import BlobStore
from service.store.db import session_scope

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_blobs(request: Request) -> BlobStore:
    """The app's blob store."""
    blobs: BlobStore = request.app.state.blobs
    return blobs


def get_session(settings: Settings = Depends(get_app_settings)) -> Iterator[Session]:
    """A session committed after the route returns, rolled back if it raises."""
    with session_scope(settings.resolved_database_url) as session:
        yield session


@dataclass(frozen=True)
class Principal:
    """The caller: tenant and API key id (for the audit log)."""

    tenant_id: str
    key_id: str

    def audit(
        self,
        session: Session,
        action: str,
        resource: str,
        resource_id: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Add an audit event by this caller to ``session`` (committed with the change)."""
        audit.record(
            session,
            tenant_id=self.tenant_id,
            key_id=self.key_id,
            action=action,
            resource=resource,
            resource_id=resource_id,
            detail=detail,
        )


def get_principal(
    settings: Settings = Depends(get_app_settings),
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
    header_key: str | None = Depends(_header),
) -> Principal:
    """Resolve the API key of the request (bearer token or ``X-API-Key``)."""
    key = bearer.credentials if bearer is not None else header_key
    if not key:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    with session_scope(settings.resolved_database_url) as session:
        tenant_id, key_id = resolve_api_key(session, key)
    return Principal(tenant_id=tenant_id, key_id=key_id)
