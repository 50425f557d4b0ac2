"""Tenants and API keys.

A key reads ``vg_<id>_<secret>``: ``id`` is 16 hex characters (the ``api_keys`` primary key, safe
to log and to record in the audit log), ``secret`` comes from :func:`secrets.token_urlsafe` (256
bits) and is shown once, when the key is created. Only the sha256 of the secret is stored; a
presented secret is hashed and compared in constant time. Error messages never repeat the
presented key or any part of its secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import Conflict, InputRejected, NotFound, Unauthorized
from service.store.tables import ApiKey, Tenant, now

KEY_PREFIX = "vg_"
SECRET_BYTES = 32
_KEY_RE = re.compile(r"vg_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{16,128})")
_NAME_MAX = 128
# Compared against when the key id is unknown, so that unknown and wrong keys cost the same.
_DUMMY_SHA256 = hashlib.sha256(b"voxelgate-no-such-key").hexdigest()


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def find_tenant(session: Session, name: str) -> Tenant | None:
    """Return the tenant called ``name``, or None."""
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


def create_tenant(session: Session, name: str) -> Tenant:
    """Create the tenant ``name``.

    Args:
        session: Open session; the caller commits.
        name: Unique tenant name, 1-128 characters, no surrounding whitespace.

    Returns:
        The new tenant (flushed, so its ``id`` is set).

    Raises:
        InputRejected: The name is empty, too long or padded with whitespace.
        Conflict: A tenant of that name exists.
    """
    if not name or len(name) > _NAME_MAX or name != name.strip():
        raise InputRejected(f"tenant name must be 1-{_NAME_MAX} characters without padding")
    if find_tenant(session, name) is not None:
        raise Conflict(f"tenant {name!r} exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as exc:  # created concurrently since the check above
        raise Conflict(f"tenant {name!r} exists") from exc
    return tenant


def ensure_tenant(session: Session, name: str) -> Tenant:
    """Return the tenant called ``name``, creating it when missing (for the CLI)."""
    return find_tenant(session, name) or create_tenant(session, name)


def create_api_key(session: Session, tenant_id: str, label: str = "") -> str:
    """Create an API key of a tenant.

    Args:
        session: Open session; the caller commits.
        tenant_id: Owner of the key.
        label: Free text for operators (at most 128 characters), e.g. who holds the key.

    Returns:
        The plaintext key ``vg_<id>_<secret>``; it cannot be recovered later.

    Raises:
        NotFound: No such tenant.
        InputRejected: The label is too long.
    """
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"no tenant {tenant_id}")
    if len(label) > _NAME_MAX:
        raise InputRejected(f"key label must be at most {_NAME_MAX} characters")
    key_id = secrets.token_hex(8)
    while session.get(ApiKey, key_id) is not None:  # 64-bit ids: practically never loops
        key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    session.add(ApiKey(id=key_id, tenant_id=tenant_id, secret_sha256=_sha256(secret), label=label))
    session.flush()
    return f"{KEY_PREFIX}{key_id}_{secret}"


def key_id_of(key: str) -> str | None:
    """Return the id part of a well-formed key, or None (never raises, never logs)."""
    match = _KEY_RE.fullmatch(key)
    return match["id"] if match else None


def resolve_api_key(session: Session, key: str) -> tuple[str, str]:
    """Authenticate a presented key.

    Args:
        session: Open session (read only).
        key: The key as presented by the client (``Authorization: Bearer`` or ``X-API-Key``).

    Returns:
        ``(tenant_id, key_id)``.

    Raises:
        Unauthorized: The key is malformed, unknown, wrong or revoked. The message never
            contains the presented key.
    """
    match = _KEY_RE.fullmatch(key.strip()) if isinstance(key, str) else None
    if match is None:
        raise Unauthorized("malformed API key")
    row = session.get(ApiKey, match["id"])
    expected = row.secret_sha256 if row is not None else _DUMMY_SHA256
    if not hmac.compare_digest(expected, _sha256(match["secret"])) or row is None:
        raise Unauthorized("unknown API key")
    if row.revoked_at is not None:
        raise Unauthorized(f"API key {row.id} is revoked")
    return row.tenant_id, row.id


def revoke_api_key(session: Session, key_id: str, *, tenant_id: str | None = None) -> None:
    """Revoke a key; later :func:`resolve_api_key` calls refuse it. Revoking twice is a no-op.

    Args:
        session: Open session; the caller commits.
        key_id: The key's id (the 16 hex characters after ``vg_``).
        tenant_id: When given, only a key of this tenant may be revoked (others: NotFound).

    Raises:
        NotFound: No such key (for this tenant).
    """
    row = session.get(ApiKey, key_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = now()
        session.flush()


def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """Return a tenant's keys (revoked ones included), oldest first; secrets are not stored."""
    stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
    return list(session.scalars(stmt))
