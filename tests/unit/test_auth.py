"""Tenants and API keys against real SQLite and PostgreSQL stores."""

from __future__ import annotations

import hashlib
import re

import pytest
from sqlalchemy import select

from service.errors import Conflict, InputRejected, NotFound, Unauthorized
from service.store import auth
from service.store.db import session_scope
from service.store.tables import ApiKey, Tenant

KEY_RE = re.compile(r"vg_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


@pytest.fixture
def url(store_settings) -> str:  # type: ignore[no-untyped-def]
    return store_settings.resolved_database_url


def _tenant_with_key(url: str, name: str = "clinic-a") -> tuple[str, str]:
    with session_scope(url) as s:
        tenant = auth.create_tenant(s, name)
        key = auth.create_api_key(s, tenant.id, label="radiology")
        return tenant.id, key


def test_key_format_and_only_the_hash_is_stored(url: str) -> None:
    tenant_id, key = _tenant_with_key(url)
    assert KEY_RE.fullmatch(key)
    key_id, secret = key[3:19], key[20:]
    with session_scope(url) as s:
        row = s.get(ApiKey, key_id)
        assert row is not None
        assert row.tenant_id == tenant_id
        assert row.label == "radiology"
        assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
        stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
        assert not any(secret in v for v in stored)


def test_resolve_returns_tenant_and_key_id_in_a_new_session(url: str) -> None:
    tenant_id, key = _tenant_with_key(url)
    with session_scope(url) as s:
        assert auth.resolve_api_key(s, key) == (tenant_id, key[3:19])
        assert auth.resolve_api_key(s, f"  {key}\n") == (tenant_id, key[3:19])


def test_each_key_is_distinct_and_resolves_to_its_own_tenant(url: str) -> None:
    tenant_a, key_a = _tenant_with_key(url, "a")
    tenant_b, key_b = _tenant_with_key(url, "b")
    with session_scope(url) as s:
        more = [auth.create_api_key(s, tenant_a) for _ in range(20)]
    assert len({k[3:19] for k in [key_a, key_b, *more]}) == 22
    with session_scope(url) as s:
        assert auth.resolve_api_key(s, key_b)[0] == tenant_b
        assert {auth.resolve_api_key(s, k)[0] for k in more} == {tenant_a}


def test_wrong_secret_is_refused_without_echoing_it(url: str) -> None:
    _, key = _tenant_with_key(url)
    secret = key[20:]
    forged_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    forged = key[:20] + forged_secret
    with session_scope(url) as s, pytest.raises(Unauthorized) as info:
        auth.resolve_api_key(s, forged)
    assert forged_secret not in str(info.value)
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "vg_",
        "Bearer vg_0123456789abcdef_" + "x" * 43,
        "vg_0123456789ABCDEF_" + "x" * 43,  # upper-case id
        "vg_0123456789abcde_" + "x" * 43,  # 15-character id
        "vg_0123456789abcdef_",  # no secret
        "vg_0123456789abcdef_" + "x" * 43 + "!",  # character outside token_urlsafe
        "xx_0123456789abcdef_" + "x" * 43,
    ],
)
def test_malformed_keys_are_refused(url: str, key: str) -> None:
    with session_scope(url) as s, pytest.raises(Unauthorized) as info:
        auth.resolve_api_key(s, key)
    if len(key) > 20:
        assert key[20:] not in str(info.value)


def test_unknown_key_id_is_refused_and_costs_a_digest_compare(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id, key = _tenant_with_key(url)
    calls: list[tuple[str, str]] = []
    real = auth.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    unknown = "vg_" + ("0" * 16 if key[3:19] != "0" * 16 else "1" * 16) + key[19:]
    with session_scope(url) as s:
        with pytest.raises(Unauthorized):
            auth.resolve_api_key(s, unknown)
        assert auth.resolve_api_key(s, key)[0] == tenant_id
    assert len(calls) == 2  # the unknown id is compared against a dummy hash too


def test_revoked_key_is_refused_others_keep_working(url: str) -> None:
    tenant_id, key = _tenant_with_key(url)
    with session_scope(url) as s:
        other = auth.create_api_key(s, tenant_id)
    with session_scope(url) as s:
        auth.revoke_api_key(s, key[3:19])
    with session_scope(url) as s:
        with pytest.raises(Unauthorized, match="revoked") as info:
            auth.resolve_api_key(s, key)
        assert key[20:] not in str(info.value)
        assert auth.resolve_api_key(s, other)[0] == tenant_id
        first = s.get(ApiKey, key[3:19])
        assert first is not None
        assert first.revoked_at is not None
        revoked_at = first.revoked_at
    with session_scope(url) as s:  # revoking again keeps the first time
        auth.revoke_api_key(s, key[3:19])
        again = s.get(ApiKey, key[3:19])
        assert again is not None
        assert again.revoked_at == revoked_at
    with session_scope(url) as s:
        keys = auth.list_api_keys(s, tenant_id)
        assert [k.revoked_at is not None for k in keys] == [True, False]


def test_revoke_unknown_or_foreign_key_is_not_found(url: str) -> None:
    _, key_a = _tenant_with_key(url, "a")
    tenant_b, _ = _tenant_with_key(url, "b")
    with session_scope(url) as s:
        with pytest.raises(NotFound):
            auth.revoke_api_key(s, "f" * 16)
        with pytest.raises(NotFound):
            auth.revoke_api_key(s, key_a[3:19], tenant_id=tenant_b)
    with session_scope(url) as s:
        assert auth.resolve_api_key(s, key_a)  # still valid


def test_tenants_are_unique_and_validated(url: str) -> None:
    _tenant_with_key(url, "clinic-a")
    with session_scope(url) as s, pytest.raises(Conflict):
        auth.create_tenant(s, "clinic-a")
    for bad in ("", " padded", "x" * 129):
        with session_scope(url) as s, pytest.raises(InputRejected):
            auth.create_tenant(s, bad)
    with session_scope(url) as s:
        first = auth.ensure_tenant(s, "clinic-b")
    with session_scope(url) as s:
        assert auth.ensure_tenant(s, "clinic-b").id == first.id
        assert auth.find_tenant(s, "nobody") is None
        assert s.scalars(select(Tenant.name).order_by(Tenant.name)).all() == [
            "clinic-a",
            "clinic-b",
        ]


def test_key_for_unknown_tenant_or_with_long_label_is_refused(url: str) -> None:
    tenant_id, _ = _tenant_with_key(url)
    with session_scope(url) as s, pytest.raises(NotFound):
        auth.create_api_key(s, "0" * 32)
    with session_scope(url) as s, pytest.raises(InputRejected):
        auth.create_api_key(s, tenant_id, label="x" * 129)
