"""The deployment files: compose.yaml parses and runs the commands and flags the service defines."""

from __future__ import annotations

import dataclasses
import re

import yaml

from core.settings import Settings
from routes.limits import SERVER_FLAGS
from tests.helpers import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_the_production_shape() -> None:
    assert set(SERVICES) == {"db", "migrate", "api", "worker", "proxy"}
    assert SERVICES["api"]["deploy"]["replicas"] == 2
    assert SERVICES["api"]["environment"]["BACKGROUND_WORK"] == "off"
    assert SERVICES["worker"]["command"] == ["python", "app.py", "worker"]
    assert SERVICES["migrate"]["command"] == ["python", "app.py", "migrate"]
    assert list(SERVICES["proxy"]["ports"]) == ["${PORT:-8000}:8000"]
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_api_replicas_run_the_service_flags_and_trust_only_the_proxy() -> None:
    command = SERVICES["api"]["command"]
    assert command[:2] == ["uvicorn", "app:app"]
    joined = " ".join(command)
    assert " ".join(SERVER_FLAGS) in joined
    assert "--forwarded-allow-ips" not in joined  # uvicorn reads FORWARDED_ALLOW_IPS
    proxy_ip = SERVICES["proxy"]["networks"]["default"]["ipv4_address"]
    assert SERVICES["api"]["environment"]["FORWARDED_ALLOW_IPS"] == proxy_ip
    assert "readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])


def test_shutdown_grace_outlasts_uvicorns() -> None:
    grace = int(
        SERVICES["api"]["command"][SERVICES["api"]["command"].index("--timeout-graceful-shutdown") + 1]
    )
    stop = COMPOSE["x-service"]["stop_grace_period"]
    assert int(re.fullmatch(r"(\d+)s", stop).group(1)) > grace  # type: ignore[union-attr]


def test_every_variable_compose_sets_is_one_the_service_reads() -> None:
    known = {f.name.upper() for f in dataclasses.fields(Settings)} | {"FORWARDED_ALLOW_IPS", "ADMIN_KEYS"}
    for name in ("api", "worker"):
        for variable in SERVICES[name]["environment"]:
            assert variable in known, variable


def test_nginx_bounds_headers_like_the_service() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "proxy_buffering off" in conf and "server api:8000" in conf
    count, size = re.search(r"large_client_header_buffers (\d+) (\d+)k", conf).groups()  # type: ignore[union-attr]
    assert int(count) * int(size) <= 64
