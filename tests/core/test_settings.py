"""Settings: the SPEC's defaults, bad values refused with one line, empty secrets unset."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from app import create_app
from core.settings import ConfigError, Settings, redact_url
from tests.helpers import ROOT, make_settings


def test_defaults_are_the_specs() -> None:
    settings = Settings.from_env({}, env_file=None)
    assert settings.database_url == "sqlite:///./data/messenger.db"
    assert settings.graph_api_url == "https://graph.facebook.com/v25.0"
    assert (settings.sync_lock_ttl_seconds, settings.sync_time_budget_seconds) == (300, 50)
    assert (settings.sync_interval_seconds, settings.sync_concurrency) == (900, 16)
    assert settings.background_work and settings.scheduler_enabled and settings.applier_enabled
    assert settings.webhook_retention_days == 30 and settings.graph_page_calls_per_second == 2
    assert settings.database_statement_cache is False and settings.database_direct_url is None
    assert settings.log_format == "text" and settings.admin_keys == frozenset()
    assert settings.fb_app_secret is None and settings.fb_verify_token is None


def test_values_are_read_and_typed() -> None:
    settings = Settings.from_env(
        {
            "SYNC_INTERVAL_SECONDS": "0",
            "SYNC_CONCURRENCY": "4",
            "BACKGROUND_WORK": "off",
            "WEBHOOK_RETENTION_DAYS": "0",
            "GRAPH_PAGE_CALLS_PER_SECOND": "50",
            "DATABASE_STATEMENT_CACHE": "on",
            "LOG_FORMAT": "JSON",
            "ADMIN_KEYS": "k1, k2",
            "DATABASE_DIRECT_URL": "postgresql://u@h/db",
        },
        env_file=None,
    )
    assert settings.sync_interval_seconds == 0 and not settings.scheduler_enabled
    assert settings.sync_concurrency == 4 and settings.graph_page_calls_per_second == 50
    assert not settings.background_work and not settings.applier_enabled
    assert settings.database_statement_cache and settings.log_format == "json"
    assert settings.admin_keys == {"k1", "k2"} and settings.database_direct_url == "postgresql://u@h/db"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNC_LOCK_TTL_SECONDS", "-5"),
        ("SYNC_LOCK_TTL_SECONDS", "0"),
        ("SYNC_LOCK_TTL_SECONDS", "soon"),
        ("SYNC_LOCK_TTL_SECONDS", "inf"),
        ("SYNC_TIME_BUDGET_SECONDS", "-1"),
        ("SYNC_TIME_BUDGET_SECONDS", "nan"),
        ("SYNC_PAGE_SIZE", "500"),
        ("SYNC_CONCURRENCY", "0"),
        ("SYNC_INTERVAL_SECONDS", "-1"),
        ("WEBHOOK_RETENTION_DAYS", "-2"),
        ("GRAPH_PAGE_CALLS_PER_SECOND", "0"),
        ("BACKGROUND_WORK", "maybe"),
        ("SQLITE_SYNCHRONOUS", "sometimes"),
        ("LOG_FORMAT", "xml"),
        ("DATABASE_URL", "mysql://root@localhost/db"),
        ("DATABASE_DIRECT_URL", "sqlite:///x.db"),
        ("API_KEYS", "nocolon"),
    ],
)
def test_bad_values_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value}, env_file=None)
    message = str(caught.value)
    assert variable in message and "\n" not in message


def test_empty_secrets_count_as_unset() -> None:
    settings = Settings.from_env({"FB_APP_SECRET": "", "FB_VERIFY_TOKEN": ""}, env_file=None)
    assert settings.fb_app_secret is None and settings.fb_verify_token is None
    line = settings.describe()
    assert "webhook_secret=unset" in line and "verify_token=unset" in line


def test_the_start_up_line_redacts_the_password_and_names_no_secret() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://svc:hunter2@db.internal:5432/messenger",
            "FB_APP_SECRET": "app-secret-value",
            "FB_VERIFY_TOKEN": "verify-value",
            "API_KEYS": "alice:alice-key-value",
        },
        env_file=None,
    )
    line = settings.describe()
    assert "postgresql://svc:***@db.internal:5432/messenger" in line
    for secret in ("hunter2", "app-secret-value", "verify-value", "alice-key-value"):
        assert secret not in line
    assert "engine=postgresql" in line and "webhook_secret=set" in line and "api_keys=1" in line
    assert redact_url("sqlite:///./data/x.db") == "sqlite:///./data/x.db"


def test_empty_secret_refuses_webhooks_and_verification(db_url: str) -> None:
    """FB_APP_SECRET= must not accept bodies signed with an empty key; FB_VERIFY_TOKEN= no challenge."""
    from_env = Settings.from_env({"FB_APP_SECRET": "", "FB_VERIFY_TOKEN": ""}, env_file=None)
    settings = make_settings(
        db_url, fb_app_secret=from_env.fb_app_secret, fb_verify_token=from_env.fb_verify_token
    )
    body = b'{"object":"page","entry":[]}'
    forged = "sha256=" + hmac.new(b"", body, hashlib.sha256).hexdigest()
    with TestClient(create_app(settings)) as client:
        response = client.post("/api/webhook", content=body, headers={"X-Hub-Signature-256": forged})
        assert response.status_code == 503
        assert response.json()["success"] is False
        check = client.get(
            "/api/webhook", params={"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "42"}
        )
        assert check.status_code == 403


def _run(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/cfg.db", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "app.py", "migrate"],
        [sys.executable, "-m", "uvicorn", "app:app", "--port", "0"],
    ],
    ids=["app.py", "uvicorn"],
)
def test_bad_configuration_stops_start_up_with_one_line(command: list[str], tmp_path: Path) -> None:
    out = _run(command, {"SYNC_LOCK_TTL_SECONDS": "-5"}, tmp_path)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["configuration error: SYNC_LOCK_TTL_SECONDS must be a number greater than 0 (got '-5')"]
    assert "Traceback" not in out.stderr
