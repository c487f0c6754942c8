"""/metrics across the workers of one server: `python app.py serve --workers 2` gives its workers one
PROMETHEUS_MULTIPROC_DIR, and every worker's /metrics answers the sum over both.

Each worker's RequestContext has its own random request-id prefix, so the test knows that both
workers served requests before it compares the counts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import KEYS, ROOT, free_port

HEALTHZ = re.compile(r'^http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', re.M)


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "API_KEYS": ",".join(f"{u}:{k}" for u, k in KEYS.items()),
        "GRAPH_API_URL": f"http://127.0.0.1:{free_port()}/v25.0",  # nothing here calls Graph
        "SYNC_INTERVAL_SECONDS": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),  # emptied (created) by `serve`
    }
    proc = subprocess.Popen(
        [sys.executable, "app.py", "serve", "--workers", "2", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the workers go with it at the end
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def healthz_count(base: str) -> float:
    # A new connection each time: either worker may answer.
    text = httpx.get(f"{base}/metrics", timeout=10, headers={"Connection": "close"}).text
    found = HEALTHZ.search(text)
    return float(found.group(1)) if found else 0.0


def test_metrics_add_up_across_workers(server: str) -> None:
    before = healthz_count(server)
    workers: set[str] = set()
    sent = 0
    while (len(workers) < 2 or sent < 20) and sent < 2000:
        response = httpx.get(f"{server}/healthz", timeout=10, headers={"Connection": "close"})
        assert response.status_code == 200
        workers.add(response.headers["x-request-id"].split("-")[0])
        sent += 1
    assert len(workers) == 2, "one worker answered every request"
    # Whichever worker answers /metrics, it counts both workers' requests.
    readings = {healthz_count(server) - before for _ in range(6)}
    assert readings == {float(sent)}
