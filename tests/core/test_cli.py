"""The command line as a user runs it (`python app.py ...` in a process of its own): API keys
created, listed and revoked, `status`, and usage errors."""

from __future__ import annotations

import os
import subprocess
import sys

from starlette.testclient import TestClient

from app import create_app
from tests.helpers import KEYS, ROOT, make_settings, services


def run(db_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": db_url, "API_KEYS": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def last_used(client: TestClient, key_id: int) -> int | None:
    async def read() -> int | None:
        (key,) = [k for k in await services(client).storage.list_api_keys() if k.id == key_id]
        return key.last_used_at

    return client.portal.call(read)  # type: ignore[union-attr]


def test_keys_are_created_listed_used_and_revoked_on_every_replica(db_url: str) -> None:
    created = run(db_url, "api-keys", "create", "carol")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert key.startswith("msk_") and created.stdout.strip() == key  # the key alone on the last line
    assert key not in created.stderr
    alias = run(db_url, "create-api-key", "dave")
    assert alias.returncode == 0 and alias.stdout.strip().startswith("msk_")

    settings = make_settings(db_url)  # alice and bob come from API_KEYS
    bearer = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        assert a.get("/api/pages", headers=bearer).status_code == 200
        (carol,) = [k for k in a.portal.call(services(a).storage.list_api_keys) if k.user_id == "carol"]  # type: ignore[union-attr]
        first = last_used(a, carol.id)
        assert first is not None and first >= carol.created_at
        # Used again, here and on the other replica, within the minute: not written again.
        assert a.get("/api/pages", headers=bearer).status_code == 200
        assert b.get("/api/pages", headers=bearer).status_code == 200
        assert last_used(b, carol.id) == first

        listed = run(
            db_url, "api-keys", "list", env={"API_KEYS": ",".join(f"{u}:{k}" for u, k in KEYS.items())}
        )
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()]
        assert rows[0][:3] == ["ID", "USER", "SOURCE"]
        mine = next(r for r in rows if r[1] == "carol")
        assert mine[0] == str(carol.id) and mine[2] == "database" and "-" != mine[-1]
        assert {(r[0], r[1], r[2]) for r in rows if r[2] == "API_KEYS"} == {
            ("-", "alice", "API_KEYS"),
            ("-", "bob", "API_KEYS"),
        }
        assert key not in listed.stdout and all(k not in listed.stdout for k in KEYS.values())

        # Keys from API_KEYS cannot be revoked here; unknown ids are an error.
        refused = run(db_url, "api-keys", "revoke", "alice", env={"API_KEYS": f"alice:{KEYS['alice']}"})
        assert refused.returncode == 2 and "API_KEYS" in refused.stderr
        assert run(db_url, "api-keys", "revoke", "999999").returncode == 1

        revoked = run(db_url, "api-keys", "revoke", str(carol.id))
        assert revoked.returncode == 0, revoked.stderr
        # At once, on both replicas: no cache outlives a revoke.
        assert a.get("/api/pages", headers=bearer).status_code == 401
        assert b.get("/api/pages", headers=bearer).status_code == 401
        assert a.get("/api/pages", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
    assert "carol" not in run(db_url, "api-keys", "list").stdout


def test_status_prints_every_page(db_url: str) -> None:
    settings = make_settings(db_url)
    with TestClient(create_app(settings)) as client:
        storage = services(client).storage
        client.portal.call(storage.register_page, "alice", "104325188712345", "EAAB-token", "Shop")  # type: ignore[union-attr]
    shown = run(db_url, "status", env={"SYNC_INTERVAL_SECONDS": "900"})
    assert shown.returncode == 0, shown.stderr
    header, row, *_ = shown.stdout.splitlines()
    assert header.split()[:4] == ["USER", "PAGE", "FACEBOOK", "PAGE"]
    assert row.split()[0] == "alice" and "104325188712345" in row and "backfilling" in row


def test_usage_and_configuration_errors_exit_2(db_url: str) -> None:
    assert run(db_url, "api-keys").returncode == 2
    bad = run(db_url, "status", env={"SYNC_INTERVAL_SECONDS": "soon"})
    assert bad.returncode == 2 and "SYNC_INTERVAL_SECONDS" in bad.stderr and "Traceback" not in bad.stderr
