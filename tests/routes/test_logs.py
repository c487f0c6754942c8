"""What the service prints: with LOG_FORMAT=json, one JSON object a line for everything (our lines,
uvicorn's, access lines), with the request id on the lines a request logs, and no secret anywhere.

The service runs as `python -m uvicorn app:app` with the production flags (a real process: what
uvicorn prints before the app configures logging is part of what is checked).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

import httpx

from tests.helpers import APP_SECRET, KEYS, auth_headers
from tests.routes.conftest import ServiceProcess

VERIFY_TOKEN = "verify-token-do-not-log-3141"
PAGE_TOKEN = "EAAB-page-token-do-not-log-2718"


def test_json_logs_are_one_object_a_line_without_secrets(
    db_url: str, service_process: Callable[..., ServiceProcess]
) -> None:
    service = service_process(db_url, env={"LOG_FORMAT": "json", "FB_VERIFY_TOKEN": VERIFY_TOKEN})
    base = service.base_url
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/api/pages", headers=auth_headers()).status_code == 200
        assert http.get("/api/pages", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
        # Graph is a closed port here: the registration fails (502) and is logged, token redacted.
        refused = http.post(
            "/api/pages",
            json={"facebookPageId": "104325188712345", "accessToken": PAGE_TOKEN},
            headers=auth_headers(),
        )
        assert refused.status_code == 502
        body = b'{"object":"page","entry":[]}'
        signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
        webhook = http.post("/api/webhook", content=body, headers={"X-Hub-Signature-256": signature})
        assert webhook.status_code == 200
        check = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "c"}
        assert http.get("/api/webhook", params=check).status_code == 200
        request_id = refused.headers["x-request-id"]
    log = service.stop()

    lines = [line for line in log.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            # uvicorn may print a line or two before the app can format them; nothing after.
            assert number < 2, f"line {number + 1} is not JSON: {line!r}"
            continue
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "uvicorn.access", "messenger_sync", "routes.pages"} <= loggers, loggers
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert any("/api/pages" in r["message"] and "502" in r["message"] for r in access)
    refusal = next(r for r in records if r["logger"] == "routes.pages")
    assert refusal["level"] == "WARNING" and refusal["request_id"] == request_id
    starting = next(r for r in records if r["message"].startswith("starting:"))
    assert "webhook_secret=set" in starting["message"] and "api_keys=2" in starting["message"]
    for secret in (APP_SECRET, VERIFY_TOKEN, PAGE_TOKEN, *KEYS.values()):
        assert secret not in log
