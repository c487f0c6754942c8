"""The PostgreSQL server crashes under load and comes back: the service rides it out on its own.

On a private cluster (tests/helpers/pgcluster.py: initdb in a temporary folder, its own port; never
the machine's shared server), the service runs as its command line runs it (`python app.py serve`),
its Graph the stand-in process (bench/graph_standin.py, answering slowly enough that the page's
backfill spans the outage). A page is registered and backfilling while senders post signed webhooks
without a pause, retrying anything but a 200 with the same body, as Meta does. Then the server is
stopped in immediate mode (a crash: no checkpoint, crash recovery at the next start) for a few
seconds, and started again. What must hold:

* during the outage, webhooks and an API read answer 503 `database_unavailable` in the SPEC's error
  shape (never a 500, never a hang: every request is answered within the client's bound, which is
  above the service's 5 s connect timeout), `/readyz` answers 503 and `/healthz` 200;
* once the server is back, the same process (no restart) acks webhooks again, `/readyz` is 200, and
  the backfill completes;
* every webhook that got a 200, before, during or after, is one inbox row, applied, and its message
  is one event in contact_interaction_events; nothing failed; the seed's checks hold (no duplicate,
  no conversation without events).

TEST_PG_RESTART_SEED replays a run (it picks which contacts the webhooks come from); the figures
(acks per phase, 503s, recovery time) are printed (`-s` shows them).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage import open_storage
from tests.helpers import ROOT, free_port
from tests.helpers.pgcluster import PgCluster, initdb_available, private_cluster
from tests.helpers.sync import assert_seed_checks, query
from tests.helpers.webhook import message_body, signed, wait_until_drained

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not initdb_available(), reason="PostgreSQL 15's initdb is not installed"),
]

SEED = int(os.environ.get("TEST_PG_RESTART_SEED", random.SystemRandom().randrange(1 << 32)))
PAGE = "104325188712345"  # the stand-in's page
API_KEY = "key-restart-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONVERSATIONS = 400  # the page's size at the stand-in: 20 Graph calls of 20, 4 per second
SENDERS = 3  # webhook senders posting at once
PACE_SECONDS = 0.02  # between one sender's bodies
RETRY_SECONDS = 0.05  # before a sender posts a refused body again
OUTAGE_SECONDS = 2.5
# Every request is answered within this or the test fails: above the service's 5 s connect timeout.
REQUEST_BOUND_SECONDS = 12.0
# The default lease: a sync cut off by the crash cannot release its lock while the database is down,
# and must do so once it is back (sync/lease.py), or the page stays locked for the whole TTL and the
# backfill does not complete within the test.
LOCK_TTL_SECONDS = 300.0


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Process:
    """A child process in a session of its own (the whole group is ended at teardown)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _spawn(command: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(proc, log)


def _wait_http(process: Process, url: str, what: str, headers: dict[str, str] | None = None) -> None:
    """Wait until `url` answers 200 (at most 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        assert process.alive(), f"{what} exited: {_log_tail(process.log)}"
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not start: {_log_tail(process.log)}"
        time.sleep(0.05)


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    with private_cluster() as running:
        yield running


@pytest.fixture
def graph_url(tmp_path: Path) -> Iterator[str]:
    """The Graph stand-in as a process: the page's conversations, each listing page 50 ms late."""
    port = free_port()
    command = [
        sys.executable, str(ROOT / "bench" / "graph_standin.py"), "--port", str(port),
        "--page-id", PAGE, "--conversations", str(CONVERSATIONS), "--latency-ms", "50",
    ]  # fmt: skip
    standin = _spawn(command, {}, tmp_path / "standin.log")
    try:
        _wait_http(standin, f"http://127.0.0.1:{port}/v25.0/me", "the Graph stand-in", AUTH)
        yield f"http://127.0.0.1:{port}/v25.0"
    finally:
        standin.end()


@pytest.fixture
def service(cluster: PgCluster, graph_url: str, tmp_path: Path) -> Iterator[tuple[Process, str]]:
    """`python app.py serve` on the private cluster, LISTEN included: (process, base URL)."""
    port = free_port()
    env = {
        "DATABASE_URL": cluster.url,
        "DATABASE_DIRECT_URL": cluster.url,
        "GRAPH_API_URL": graph_url,
        "FB_APP_SECRET": "test-app-secret",
        "FB_VERIFY_TOKEN": "test-verify-token",
        "API_KEYS": f"alice:{API_KEY}",
        "SYNC_PAGE_SIZE": "20",
        "GRAPH_PAGE_CALLS_PER_SECOND": "4",
        "SYNC_LOCK_TTL_SECONDS": str(LOCK_TTL_SECONDS),
    }
    command = [sys.executable, "app.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = _spawn(command, env, tmp_path / "service.log")
    try:
        _wait_http(process, f"http://127.0.0.1:{port}/readyz", "the service")
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.end()


@dataclass
class Answer:
    """One request and its answer (status None: no answer within the bound, or the connection failed)."""

    mid: str
    sent: float
    answered: float
    status: int | None
    body: Any = None
    error: str | None = None


@dataclass
class Senders:
    """Webhook senders that post distinct bodies without a pause and retry refusals, as Meta does."""

    http: httpx.AsyncClient
    rng: random.Random
    answers: list[Answer] = field(default_factory=list)
    acked: dict[str, float] = field(default_factory=dict)  # mid -> when its 200 arrived
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _count: int = 0

    def _contact(self) -> str:
        # Half the contacts are the stand-in's (their conversations are being synced), half new.
        if self.rng.random() < 0.5:
            return str(5_000_000_000_000_000 + self.rng.randrange(CONVERSATIONS) * 7_919)
        return str(7_700_000_000_000_000 + self.rng.randrange(200))

    async def _send(self, mid: str, body: bytes) -> None:
        """Post `body` until it is acknowledged (a failing connection ends the test)."""
        while True:
            sent = time.monotonic()
            try:
                response = await self.http.post("/api/webhook", content=body, headers=signed(body))
            except httpx.HTTPError as exc:
                self.answers.append(Answer(mid, sent, time.monotonic(), None, error=repr(exc)))
                raise
            answered = time.monotonic()
            try:
                content: Any = response.json() if response.status_code != 200 else response.text
            except ValueError:
                content = response.text
            self.answers.append(Answer(mid, sent, answered, response.status_code, content))
            if response.status_code == 200:
                self.acked[mid] = answered
                return
            await asyncio.sleep(RETRY_SECONDS)

    async def run(self, number: int) -> None:
        while not self.stopping.is_set():
            self._count += 1
            mid = f"m_restart_{SEED}_{number}_{self._count}"
            body = message_body(
                mid, f"message {self._count}", 1_764_000_000_000 + self._count, self._contact()
            )
            await self._send(mid, body)
            await asyncio.sleep(PACE_SECONDS)


@dataclass
class Probe:
    """/readyz, /healthz and an API read, every 0.2 s, while the server is down."""

    http: httpx.AsyncClient
    page_id: str
    seen: list[tuple[str, int, Any]] = field(default_factory=list)

    async def run(self, until: asyncio.Event) -> None:
        while not until.is_set():
            for path, headers in (
                ("/readyz", {}),
                ("/healthz", {}),
                (f"/api/pages/{self.page_id}", AUTH),
            ):
                response = await self.http.get(path, headers=headers)
                self.seen.append((path, response.status_code, response.json()))
            await asyncio.sleep(0.2)


async def _page(http: httpx.AsyncClient, page_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/pages/{page_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _until(what: str, seconds: float, check: Any, log: Path) -> None:
    """Poll the async `check` until it is true; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}\n{_log_tail(log)}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def http(service: tuple[Process, str]) -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(REQUEST_BOUND_SECONDS)
    async with httpx.AsyncClient(base_url=service[1], timeout=timeout) as client:
        yield client


def _is_unavailable(body: Any) -> bool:
    """The SPEC's error shape, with the code of a database that cannot be reached."""
    return (
        isinstance(body, dict)
        and set(body) == {"success", "error", "code"}
        and body["success"] is False
        and isinstance(body["error"], str)
        and body["code"] == "database_unavailable"
    )


async def test_server_crash_under_load(
    cluster: PgCluster, service: tuple[Process, str], http: httpx.AsyncClient
) -> None:
    process, _ = service
    log = process.log
    print(f"\nTEST_PG_RESTART_SEED={SEED}")
    registered = await http.post(
        "/api/pages", json={"facebookPageId": PAGE, "accessToken": "EAAB-restart"}, headers=AUTH
    )
    assert registered.status_code == 201, registered.text
    page_id = registered.json()["pageId"]

    senders = Senders(http, random.Random(SEED))
    tasks = [asyncio.create_task(senders.run(n)) for n in range(SENDERS)]
    try:
        # Before: the backfill has stored something but is far from done, webhooks are acked.
        async def backfilling() -> bool:
            sync = (await _page(http, page_id))["sync"]
            return len(senders.acked) >= 10 and sync["conversations"] >= 20

        await _until("the backfill started and webhooks were acked", 20, backfilling, log)
        before = await _page(http, page_id)
        assert before["sync"]["lastCompleteSync"] is None, before
        assert before["sync"]["conversations"] < CONVERSATIONS, before

        # The crash.
        crashed = time.monotonic()
        await asyncio.to_thread(cluster.stop, "immediate")
        down = time.monotonic()
        probe, probing = Probe(http, page_id), asyncio.Event()
        probe_task = asyncio.create_task(probe.run(probing))
        await asyncio.sleep(OUTAGE_SECONDS)
        restarting = time.monotonic()
        probing.set()
        await probe_task
        await asyncio.to_thread(cluster.start)
        up = time.monotonic()

        # After: acks again, on their own.
        async def acking() -> bool:
            return any(a.status == 200 and a.sent >= up for a in senders.answers)

        await _until("webhooks acked again after the restart", 20, acking, log)
        first_ack = min(a.answered for a in senders.answers if a.status == 200 and a.sent >= up)
        await asyncio.sleep(1.0)
        senders.stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        senders.stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert process.alive(), f"the service died: {_log_tail(log)}"
    unanswered = [a for a in senders.answers if a.status is None]
    assert unanswered == [], f"requests without an answer: {unanswered[:5]}"
    refusals = [a for a in senders.answers if a.status != 200]
    wrong = [a for a in refusals if a.status != 503 or not _is_unavailable(a.body)]
    assert wrong == [], f"refusals other than 503 database_unavailable: {wrong[:5]}"
    outage = [a for a in senders.answers if a.sent >= down and a.answered <= restarting]
    assert outage, "no webhook was posted while the server was down"
    assert all(a.status == 503 for a in outage), [a for a in outage if a.status != 503][:5]

    readyz = [(status, body) for path, status, body in probe.seen if path == "/readyz"]
    healthz = [status for path, status, _ in probe.seen if path == "/healthz"]
    reads = [(status, body) for path, status, body in probe.seen if path.startswith("/api/")]
    assert readyz and all(s == 503 and _is_unavailable(b) for s, b in readyz), readyz
    assert healthz and set(healthz) == {200}, healthz
    assert reads and all(s == 503 and _is_unavailable(b) for s, b in reads), reads
    assert (await http.get("/readyz")).status_code == 200

    # The backfill completes (the crash left its lease behind: it expires, and the page is due again).
    async def complete() -> bool:
        sync = (await _page(http, page_id))["sync"]
        return sync["lastCompleteSync"] is not None and sync["conversations"] >= CONVERSATIONS

    await _until("the backfill completed after the restart", 25, complete, log)
    finished = time.monotonic()

    storage = await open_storage(cluster.url)
    try:
        counts = await wait_until_drained(storage)
        assert counts == {"applied": len(senders.acked)}, (counts, len(senders.acked))
        mids = sorted(senders.acked)
        stored = await query(
            storage,
            "SELECT message_id, count(*) AS n FROM contact_interaction_events "
            "WHERE message_id = ANY($1::text[]) GROUP BY message_id",
            mids,
        )
        by_mid = {r["message_id"]: r["n"] for r in stored}
        missing = [m for m in mids if m not in by_mid]
        assert missing == [], f"{len(missing)} acknowledged webhooks not applied: {missing[:5]}"
        assert set(by_mid.values()) == {1}, "an acknowledged message stored twice"
        rows = await query(storage, "SELECT count(DISTINCT body) AS n, count(*) AS total FROM webhook_events")
        assert rows[0]["n"] == rows[0]["total"] == len(mids), dict(rows[0])
        synced = await query(
            storage,
            "SELECT count(*) AS n FROM messenger_conversations "
            "WHERE page_id = $1 AND facebook_conversation_id IS NOT NULL",
            page_id,
        )
        assert synced[0]["n"] == CONVERSATIONS, "the backfill did not store every conversation once"
        await assert_seed_checks(storage)
    finally:
        await storage.close()

    phases = {"before": 0, "during": 0, "after": 0}
    for answered in senders.acked.values():
        phases["before" if answered < crashed else "during" if answered < up else "after"] += 1
    print(
        f"acked before {phases['before']}, during {phases['during']}, after {phases['after']}; "
        f"503s seen {len(refusals)} (webhooks), readyz 503 x{len(readyz)}; server down "
        f"{restarting - down:.1f}s; first ack {first_ack - up:.2f}s after the server accepted "
        f"connections again ({first_ack - crashed:.1f}s after the crash); backfill complete "
        f"{finished - up:.1f}s after the restart"
    )
