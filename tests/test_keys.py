"""API keys: listing, revoking (a revoked key fails on its very next request), last use, and the `keys` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.auth.service import KeyAlreadyRevoked, list_keys, revoke_key
from app.core.db import session_scope
from app.core.errors import Conflict, NotFound
from app.core.models import ApiKey
from app.core.security import PREFIX_LENGTH
from app.core.settings import Settings
from tests.conftest import Tenant


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {
        "error": {
            "type": "authentication_error",
            "message": "invalid API key",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `tuneforge` command on the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(TUNEFORGE_DATABASE_URL=settings.db_url, TUNEFORGE_DATA_DIR=str(settings.data_dir))
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True, timeout=60)


def last_used_at(settings: Settings, key: str) -> datetime | None:
    with session_scope(settings.db_url) as session:
        return session.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == key[:PREFIX_LENGTH]))


def test_a_revoked_key_gets_401_on_its_next_request(client: TestClient, settings: Settings, make_tenant: Any) -> None:
    tenant, other = make_tenant(), make_tenant()
    assert client.get("/v1/files", headers=tenant.headers).status_code == 200

    with session_scope(settings.db_url) as session:
        revoked = revoke_key(session, prefix=tenant.key[:PREFIX_LENGTH])
    assert (revoked.tenant, revoked.prefix) == (tenant.name, tenant.key[:PREFIX_LENGTH])
    assert revoked.revoked_at is not None

    assert_unauthorized(client.get("/v1/files", headers=tenant.headers))
    assert client.get("/v1/files", headers=other.headers).status_code == 200
    with session_scope(settings.db_url) as session, pytest.raises(KeyAlreadyRevoked):
        revoke_key(session, prefix=tenant.key[:PREFIX_LENGTH])


def test_new_keys_have_a_twelve_character_prefix_and_list_by_tenant(settings: Settings, make_tenant: Any) -> None:
    tenant, other = make_tenant(), make_tenant()
    with session_scope(settings.db_url) as session:
        keys = list_keys(session, tenant_name=tenant.name)
        everyone = list_keys(session)
        with pytest.raises(NotFound):
            list_keys(session, tenant_name=f"no-such-{uuid.uuid4().hex}")
    assert [(k.prefix, k.tenant, k.revoked_at) for k in keys] == [(tenant.key[:12], tenant.name, None)]
    assert {tenant.key[:12], other.key[:12]} <= {k.prefix for k in everyone}


def test_last_use_is_recorded_at_most_once_a_minute(client: TestClient, settings: Settings, tenant: Tenant) -> None:
    assert last_used_at(settings, tenant.key) is None
    before = datetime.now(UTC)
    assert client.get("/v1/files", headers=tenant.headers).status_code == 200
    first = last_used_at(settings, tenant.key)
    assert first is not None and first >= before - timedelta(seconds=1)

    assert client.get("/v1/files", headers=tenant.headers).status_code == 200
    assert last_used_at(settings, tenant.key) == first  # within the minute: not written again

    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    with session_scope(settings.db_url) as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == tenant.key[:12]).values(last_used_at=long_ago))
    assert client.get("/v1/files", headers=tenant.headers).status_code == 200
    latest = last_used_at(settings, tenant.key)
    assert latest is not None and latest > first


@pytest.mark.slow  # runs the CLI in processes of its own
def test_an_ambiguous_or_unknown_prefix_revokes_nothing(
    client: TestClient, settings: Settings, make_tenant: Any
) -> None:
    # Two keys whose prefixes share a start, as 8-character prefixes of older keys may.
    shared = f"tf_{uuid.uuid4().hex[:6]}"
    tenants = [make_tenant(), make_tenant()]
    with session_scope(settings.db_url) as session:
        for i, t in enumerate(tenants):
            session.execute(update(ApiKey).where(ApiKey.prefix == t.key[:12]).values(prefix=f"{shared}{i}"))

    with session_scope(settings.db_url) as session, pytest.raises(Conflict) as ambiguous:
        revoke_key(session, prefix=shared)
    assert ambiguous.value.code == "ambiguous_key_prefix"
    assert f"{shared}0" in ambiguous.value.message and f"{shared}1" in ambiguous.value.message

    result = cli(settings, "keys", "revoke", shared)
    assert result.returncode == 1, result
    assert f"{shared}0 (tenant {tenants[0].name})" in result.stderr
    assert f"{shared}1 (tenant {tenants[1].name})" in result.stderr

    result = cli(settings, "keys", "revoke", f"{shared}x")
    assert result.returncode == 1, result
    assert f"no API key has a prefix starting with '{shared}x'" in result.stderr
    for t in tenants:
        assert client.get("/v1/files", headers=t.headers).status_code == 200

    # The whole prefix is unambiguous.
    with session_scope(settings.db_url) as session:
        revoke_key(session, prefix=f"{shared}1")
    assert client.get("/v1/files", headers=tenants[0].headers).status_code == 200
    assert_unauthorized(client.get("/v1/files", headers=tenants[1].headers))


@pytest.mark.e2e  # the `tuneforge keys` command, in processes of its own
def test_keys_cli_creates_lists_and_revokes(client: TestClient, settings: Settings) -> None:
    name = f"tenant-{uuid.uuid4().hex[:8]}"
    created = cli(settings, "keys", "create", "--tenant", name)
    assert created.returncode == 0, created
    stdout = created.stdout.splitlines()
    assert len(stdout) == 1 and stdout[0].startswith("tf_"), created
    key = stdout[0]
    prefix = key[:PREFIX_LENGTH]
    assert prefix in created.stderr
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/files", headers=headers).status_code == 200

    def listed() -> dict[str, Any]:
        result = cli(settings, "keys", "list", "--json", "--tenant", name)
        assert result.returncode == 0, result
        (entry,) = json.loads(result.stdout)
        return entry  # type: ignore[no-any-return]

    entry = listed()
    assert (entry["prefix"], entry["tenant"], entry["revoked_at"]) == (prefix, name, None)
    assert datetime.fromisoformat(entry["last_used_at"]) >= datetime.fromisoformat(entry["created_at"])

    revoked = cli(settings, "keys", "revoke", prefix)
    assert revoked.returncode == 0, revoked
    assert f"revoked key {prefix} (tenant {name})" in revoked.stdout
    assert_unauthorized(client.get("/v1/files", headers=headers))
    assert datetime.fromisoformat(listed()["revoked_at"]) <= datetime.now(UTC)

    again = cli(settings, "keys", "revoke", prefix)
    assert again.returncode == 0, again
    assert "already revoked" in again.stderr
