"""Several replicas of the service on one PostgreSQL database, as real processes, and the audit that
judges them (tests/proof/test_replicas.py).

    async with cluster(db_url, tmp_path, conversations=150, env={...}) as c:
        pages = await c.register(3)                 # POST /api/pages on the first replica
        await c.replicas[1].sync(pages[0])          # POST /api/conversations/sync on another
        c.replicas[2].kill()                        # kill -9 (its process group)
        figures = check_lock_audit(await c.lock_audit(), c.names)

* The Graph stand-in runs in a process of its own (``python -m tests.helpers.replicas standin``):
  bench/standin_limits.py's PagesStandin (any page id, synthesized conversations, a latency) behind
  its StandinLimits (limits raised: the rate-limit pool is not the subject here), plus what these
  tests need: ``/me`` answers the Page a token names (``EAAB-<pageId>-...``, tests.helpers.page_token),
  so pages are registered through the API; a page's n-th listing call can be held back until released;
  ``GET /_replicas/stats`` counts each page's calls.
* Each replica is ``python app.py serve`` on a free port, in a session of its own (so that a kill,
  a pause or the teardown reaches its whole process group), with the same DATABASE_URL plus an
  ``application_name`` naming the replica, so that the database itself can say who wrote what.
* The audit: triggers installed in the test's schema record every committed change of ``sync_locks``
  and every write of ``sync_state`` with the database's clock (``now_ms()``), the writer's
  ``application_name`` and, for ``sync_state``, who held the page's lock at that moment. It sees every
  committed state, not samples of them; ``check_lock_audit`` and ``check_state_audit`` turn it into the
  SPEC's rules (one holder at a time, takeover only after expiry, fencing tokens that only grow, no write
  without the lease).

Seeds: ``seed()`` reads REPLICAS_SEED (else picks one); the tests print it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs

import asyncpg
import httpx
import msgspec
from starlette.types import Receive, Scope, Send

from bench.standin_limits import PagesStandin, StandinLimits, bench_page_ids
from storage import open_storage
from tests.helpers import APP_SECRET, KEYS, ROOT, VERIFY_TOKEN, auth_headers, free_port, page_token
from tests.helpers.autopilot import wait_until

MESSAGES = 3  # messages the stand-in details per conversation: one event each
START_SECONDS = 60  # a replica that has not answered /readyz by then failed to start

_encode = msgspec.json.Encoder().encode


def seed() -> int:
    """The run's seed: REPLICAS_SEED, or a fresh one (print it: a failing run is replayed with it)."""
    raw = os.environ.get("REPLICAS_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


# ---- the Graph stand-in ----------------------------------------------------------------------------

_PAGE_TOKEN = re.compile(r"EAAB-(\d+)-")


def _page_of(path: str) -> str | None:
    parts = path.strip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "conversations" else None


class ReplicaStandin:
    """Graph for the replica tests (see the module docstring): ASGI."""

    def __init__(self, conversations: int, messages: int = MESSAGES, latency_ms: float = 0) -> None:
        self.limits = StandinLimits(
            PagesStandin(conversations, messages, latency_ms),
            page_calls_per_second=1_000_000,
            app_calls_per_second=1_000_000,
        )
        self.calls: Counter[str] = Counter()
        self._holds: dict[tuple[str, int], asyncio.Event] = {}
        self.held: set[tuple[str, int]] = set()  # arrived and waiting for their release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.limits(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/_replicas/"):
            await self._control(scope, send)
            return
        if path.rstrip("/").endswith("/me"):
            await self._me(scope, send)
            return
        page = _page_of(path)
        if page is not None:
            self.calls[page] += 1
            key = (page, self.calls[page])
            hold = self._holds.get(key)
            if hold is not None:
                self.held.add(key)
                await hold.wait()
                self.held.discard(key)
        await self.limits(scope, receive, send)

    async def _control(self, scope: Scope, send: Send) -> None:
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        action = scope["path"].removeprefix("/_replicas/")
        if action in ("hold", "release"):
            key = (query["page"], int(query["call"]))
            if action == "hold":
                self._holds[key] = asyncio.Event()
            else:
                self._holds.pop(key, asyncio.Event()).set()
        body = {"calls": dict(self.calls), "held": sorted([page, call] for page, call in self.held)}
        await _json(send, 200, body)

    async def _me(self, scope: Scope, send: Send) -> None:
        token = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                token = value.decode("latin-1").partition(" ")[2]
        match = _PAGE_TOKEN.match(token)
        if match is None:
            error = {"message": "Invalid OAuth access token", "type": "OAuthException", "code": 190}
            await _json(send, 400, {"error": error})
            return
        await _json(send, 200, {"id": match.group(1), "name": f"Page {match.group(1)}"})


async def _json(send: Send, status: int, body: Any) -> None:
    payload = _encode(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# ---- processes ---------------------------------------------------------------------------------------


class Process:
    """A child process in a session of its own, its output in a log file."""

    def __init__(self, name: str, command: list[str], log_dir: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals go to its process group
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 (a paused process too), and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def tail(self, chars: int = 3000) -> str:
        """The end of what it wrote (for failure messages)."""
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def close(self) -> None:
        """Kill it if it still runs; close its log."""
        if self.alive:
            self.kill()
        self.proc.wait(timeout=30)
        self._log.close()


class Replica(Process):
    """`python app.py serve` on a free port, and an API client for it (alice's key)."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "app.py", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(name, command, log_dir, env)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=auth_headers(), timeout=60)

    async def ready(self) -> None:
        """Wait until /readyz answers 200 (migrations done, database reachable)."""

        async def up() -> bool:
            assert self.alive, f"{self.name} exited:\n{self.tail()}"
            try:
                return (await self.http.get("/readyz", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(up, START_SECONDS, lambda: _not_ready(self))

    async def sync(self, page: Page, **body: Any) -> httpx.Response:
        """POST /api/conversations/sync for a page (extra fields: maxDurationMs, mode, resumeSession)."""
        payload = {"pageId": page.page_id, "facebookPageId": page.facebook_page_id, **body}
        return await self.http.post("/api/conversations/sync", json=payload)

    async def metrics(self) -> dict[str, float]:
        """Its /metrics samples: {'name{labels}': value}."""
        text = (await self.http.get("/metrics")).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def aclose(self) -> None:
        await self.http.aclose()
        self.close()


async def _not_ready(process: Process) -> str:
    return f"{process.name} did not get ready:\n{process.tail()}"


class Standin(Process):
    """The stand-in (ReplicaStandin) served by uvicorn in a process of its own."""

    def __init__(self, conversations: int, latency_ms: float, log_dir: Path) -> None:
        self.port = free_port()
        self.graph_url = f"http://127.0.0.1:{self.port}/v25.0"
        command = [
            sys.executable, "-m", "tests.helpers.replicas", "standin", "--port", str(self.port),
            "--conversations", str(conversations), "--latency-ms", str(latency_ms),
        ]  # fmt: skip
        super().__init__("standin", command, log_dir, os.environ)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    async def ready(self) -> None:
        async def up() -> bool:
            assert self.alive, f"the stand-in exited:\n{self.tail()}"
            try:
                return (await self.http.get("/_replicas/stats")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(up, START_SECONDS, lambda: _not_ready(self))

    async def stats(self) -> dict[str, Any]:
        """{"calls": {page: listing requests so far}, "held": [[page, call], ...] (waiting now)}."""
        return dict((await self.http.get("/_replicas/stats")).json())

    async def hold(self, fb_page_id: str, call: int) -> None:
        """Hold back the answer to the page's `call`-th listing request (1-based) until `release`."""
        await self.http.post("/_replicas/hold", params={"page": fb_page_id, "call": call})

    async def release(self, fb_page_id: str, call: int) -> None:
        await self.http.post("/_replicas/release", params={"page": fb_page_id, "call": call})

    async def aclose(self) -> None:
        await self.http.aclose()
        self.close()


# ---- the cluster -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """A page as POST /api/pages answered it."""

    page_id: str
    facebook_page_id: str


def _with_query(url: str, **params: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


# What the service reads from its environment (core/settings.py), and prometheus-client's
# multiprocess directory: none is inherited from the test's environment.
_SERVICE_VARIABLES = (
    "DATABASE_", "GRAPH_", "FB_", "API_KEYS", "ADMIN_KEYS", "SYNC_", "BACKGROUND_WORK", "WEBHOOK_",
    "SQLITE_", "LOG_FORMAT", "PROMETHEUS_MULTIPROC_DIR",
)  # fmt: skip


def replica_env(database_url: str, direct_url: str | None, graph_url: str, name: str) -> dict[str, str]:
    """A replica's environment: the shared database (its connections named after it), the stand-in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_VARIABLES)}
    env.update(
        {
            "DATABASE_URL": _with_query(database_url, application_name=name),
            "GRAPH_API_URL": graph_url,
            "API_KEYS": ",".join(f"{user}:{key}" for user, key in KEYS.items()),
            "FB_APP_SECRET": APP_SECRET,
            "FB_VERIFY_TOKEN": VERIFY_TOKEN,
            "GRAPH_PAGE_CALLS_PER_SECOND": "1000",  # the pool is not the subject: never spaces calls
            "SYNC_PAGE_SIZE": "10",  # several Graph pages per Page: syncs take a while
        }
    )
    if direct_url is not None:  # LISTEN/NOTIFY wake-ups across the replicas
        env["DATABASE_DIRECT_URL"] = _with_query(direct_url, application_name=f"{name}-listen")
    return env


@dataclass
class Cluster:
    """The stand-in, the replicas, and a connection of the test's own to their database."""

    standin: Standin
    replicas: list[Replica]
    db: asyncpg.Connection
    standin_conversations: int  # what the stand-in serves for every page
    pages: list[Page] = field(default_factory=list)

    @property
    def names(self) -> dict[int, str]:
        """{pid: replica name}: what the locks' `locked_by` (host:pid:nonce) refers to."""
        return {r.pid: r.name for r in self.replicas}

    async def register(self, count: int) -> list[Page]:
        """Register `count` pages through the first replica's API (the stand-in verifies each token)."""
        for fb in bench_page_ids(count):
            body = {"facebookPageId": fb, "accessToken": page_token(fb), "name": f"Page {fb}"}
            response = await self.replicas[0].http.post("/api/pages", json=body)
            assert response.status_code == 201, response.text
            self.pages.append(Page(response.json()["pageId"], fb))
        return list(self.pages)

    async def lock_audit(self) -> list[asyncpg.Record]:
        return list(await self.db.fetch("SELECT * FROM test_lock_audit ORDER BY seq"))

    async def state_audit(self) -> list[asyncpg.Record]:
        return list(await self.db.fetch("SELECT * FROM test_state_audit ORDER BY seq"))

    async def db_now(self) -> int:
        """The database's clock (now_ms()), as the leases are judged by."""
        return int(await self.db.fetchval("SELECT now_ms()"))

    async def states(self) -> dict[str, asyncpg.Record]:
        """{page_id: sync_state row}."""
        return {r["page_id"]: r for r in await self.db.fetch("SELECT * FROM sync_state")}

    async def locks(self) -> dict[str, asyncpg.Record]:
        """{page_id: sync_locks row} of the live leases (held and not expired on the database's clock)."""
        rows = await self.db.fetch(
            "SELECT * FROM sync_locks WHERE locked_by IS NOT NULL AND expires_at > now_ms()"
        )
        return {r["page_id"]: r for r in rows}

    async def all_complete(self) -> bool:
        """Every registered page's session complete and its conversations all stored."""
        states = await self.states()
        counts = await conversation_counts(self.db)
        want = self.standin_conversations
        return all(
            p.page_id in states and states[p.page_id]["is_complete"] and counts.get(p.page_id) == want
            for p in self.pages
        )

    async def progress(self) -> str:
        """What the pages' sync state is now (for a failure message)."""
        states = await self.states()
        locks = await self.locks()
        counts = await conversation_counts(self.db)
        lines = []
        for p in self.pages:
            s = states.get(p.page_id)
            lines.append(
                f"{p.page_id}: conversations={counts.get(p.page_id, 0)} "
                f"synced={s and s['total_synced']} complete={s and s['is_complete']} "
                f"lock={locks[p.page_id]['locked_by'] if p.page_id in locks else None}"
            )
        return "\n".join(lines)


async def conversation_counts(db: asyncpg.Connection) -> dict[str, int]:
    """{page_id: conversations stored}."""
    rows = await db.fetch("SELECT page_id, count(*) AS n FROM messenger_conversations GROUP BY page_id")
    return {r["page_id"]: int(r["n"]) for r in rows}


@contextlib.asynccontextmanager
async def cluster(
    db_url: str,
    log_dir: Path,
    *,
    conversations: int,
    latency_ms: float = 0,
    replicas: int = 3,
    env: Mapping[str, str] | None = None,
    direct_url: str | None = None,
) -> AsyncIterator[Cluster]:
    """The stand-in and `replicas` replicas on `db_url` (migrated, audited); every process killed after."""
    store = await open_storage(db_url)
    try:
        await store.migrate()
    finally:
        await store.close()
    db = await asyncpg.connect(db_url)
    started: list[Process] = []
    try:
        await db.execute(AUDIT_SQL)
        standin = Standin(conversations, latency_ms, log_dir)
        started.append(standin)
        group = []
        for n in range(1, replicas + 1):
            name = f"replica-{n}"
            replica_environment = replica_env(db_url, direct_url, standin.graph_url, name)
            replica_environment.update(env or {})
            replica = Replica(name, replica_environment, log_dir)
            started.append(replica)
            group.append(replica)
        await standin.ready()
        await asyncio.gather(*(r.ready() for r in group))
        yield Cluster(standin, group, db, conversations)
    finally:
        for process in started:
            if isinstance(process, (Replica, Standin)):
                await process.aclose()
        await db.close()


# ---- the audit ---------------------------------------------------------------------------------------

AUDIT_SQL = """
CREATE TABLE test_lock_audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    page_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    app TEXT NOT NULL,
    old_locked_by TEXT,
    old_expires_at BIGINT,
    old_token BIGINT,
    new_locked_by TEXT,
    new_locked_at BIGINT,
    new_expires_at BIGINT,
    new_token BIGINT NOT NULL
);
CREATE FUNCTION test_audit_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO test_lock_audit (page_id, at_ms, app, new_locked_by, new_locked_at,
                                     new_expires_at, new_token)
        VALUES (NEW.page_id, now_ms(), current_setting('application_name'), NEW.locked_by,
                NEW.locked_at, NEW.expires_at, NEW.fencing_token);
    ELSE
        INSERT INTO test_lock_audit (page_id, at_ms, app, old_locked_by, old_expires_at, old_token,
                                     new_locked_by, new_locked_at, new_expires_at, new_token)
        VALUES (NEW.page_id, now_ms(), current_setting('application_name'), OLD.locked_by,
                OLD.expires_at, OLD.fencing_token, NEW.locked_by, NEW.locked_at, NEW.expires_at,
                NEW.fencing_token);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_lock_audit AFTER INSERT OR UPDATE ON sync_locks
    FOR EACH ROW EXECUTE FUNCTION test_audit_lock();

CREATE TABLE test_state_audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    page_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    app TEXT NOT NULL,
    session_id TEXT,
    total_synced BIGINT,
    is_complete BOOLEAN,
    completed_syncs BIGINT,
    holder TEXT,
    holder_token BIGINT
);
CREATE FUNCTION test_audit_state() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lock_row RECORD;
BEGIN
    SELECT locked_by, fencing_token INTO lock_row FROM sync_locks WHERE page_id = NEW.page_id;
    INSERT INTO test_state_audit (page_id, at_ms, app, session_id, total_synced, is_complete,
                                  completed_syncs, holder, holder_token)
    VALUES (NEW.page_id, now_ms(), current_setting('application_name'), NEW.sync_session_id,
            NEW.total_synced, NEW.is_complete, NEW.completed_syncs, lock_row.locked_by,
            lock_row.fencing_token);
    RETURN NULL;
END $$;
CREATE TRIGGER test_state_audit AFTER INSERT OR UPDATE ON sync_state
    FOR EACH ROW EXECUTE FUNCTION test_audit_state();
"""


def pid_of(locked_by: str) -> int:
    """The process id in a lock's `locked_by` (sync/lease.py: "host:pid:nonce")."""
    return int(locked_by.rsplit(":", 2)[1])


@dataclass(frozen=True)
class Takeover:
    """A live holder's lease taken by another sync once it had expired."""

    page_id: str
    token: int  # the new holder's fencing token
    previous: str  # replica names
    by: str
    expired_at: int  # the previous lease's expires_at (database clock, ms)
    at: int  # when the new holder got it (database clock, ms)


@dataclass
class LockFigures:
    """What the lock audit shows."""

    acquisitions: Counter[str] = field(default_factory=Counter)  # by replica
    takeovers: list[Takeover] = field(default_factory=list)
    releases: int = 0
    cleanups: int = 0  # expired leases cleared by housekeeping (another process than the holder)
    extensions: int = 0
    last_token: dict[str, int] = field(default_factory=dict)  # by page
    # Every expires_at each page's leases had: a 409's expiresAt must be one of them.
    expiries: dict[str, set[int]] = field(default_factory=dict)
    holds: list[tuple[str, int, str, int, int]] = field(
        default_factory=list
    )  # page, token, replica, from, to


def check_lock_audit(rows: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> LockFigures:
    """Assert the SPEC's lock rules over every committed change of `sync_locks`; what happened.

    Per page, in commit order: the first acquisition has token 1, each later one the previous token
    plus one; a lease is acquired only when the previous one was released or had expired on the
    database's clock (one holder at a time); only its holder extends or releases a lease, and anyone
    else clears it only after expiry; every acquirer is the replica its `locked_by` names.
    """
    figures = LockFigures()
    by_page: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_page.setdefault(row["page_id"], []).append(row)
    for page_id, changes in by_page.items():
        previous: Mapping[str, Any] | None = None
        held_since: tuple[int, str, int] | None = None  # (token, replica, from)
        expiries = figures.expiries.setdefault(page_id, set())
        for row in changes:
            where = f"page {page_id}, audit row {dict(row)}"
            if previous is None:
                assert row["old_token"] is None and row["new_token"] == 1, f"first lease not token 1: {where}"
            else:  # the audit saw every committed state: each change starts from the last one
                assert (row["old_locked_by"], row["old_expires_at"], row["old_token"]) == (
                    previous["new_locked_by"],
                    previous["new_expires_at"],
                    previous["new_token"],
                ), f"audit gap: {where}"
            old_token = row["old_token"] or 0
            holder, old_holder, at = row["new_locked_by"], row["old_locked_by"], row["at_ms"]
            assert row["new_token"] >= old_token, f"fencing token went down: {where}"
            if row["new_token"] != old_token:  # an acquisition
                assert row["new_token"] == old_token + 1, f"token skipped: {where}"
                assert holder is not None, f"acquired by nobody: {where}"
                assert names.get(pid_of(holder)) == row["app"], f"acquirer is not its locked_by: {where}"
                if old_holder is not None:
                    assert row["old_expires_at"] <= at, f"a live lease was taken over: {where}"
                    figures.takeovers.append(
                        Takeover(
                            page_id,
                            row["new_token"],
                            names[pid_of(old_holder)],
                            row["app"],
                            row["old_expires_at"],
                            at,
                        )
                    )
                if held_since is not None:
                    token, replica, start = held_since
                    figures.holds.append((page_id, token, replica, start, row["old_expires_at"] or at))
                figures.acquisitions[row["app"]] += 1
                held_since = (row["new_token"], row["app"], at)
            elif holder is None:  # released by its holder, or cleared after expiry
                assert old_holder is not None, f"released a lease nobody held: {where}"
                if names.get(pid_of(old_holder)) == row["app"]:
                    figures.releases += 1
                else:
                    assert row["old_expires_at"] <= at, f"a live lease was cleared by another: {where}"
                    figures.cleanups += 1
                if held_since is not None:
                    token, replica, start = held_since
                    figures.holds.append((page_id, token, replica, start, at))
                held_since = None
            else:  # extended, by its holder only
                assert holder == old_holder, f"the holder changed without a new token: {where}"
                assert names.get(pid_of(holder)) == row["app"], f"extended by another replica: {where}"
                figures.extensions += 1
            if row["new_expires_at"] is not None:
                expiries.add(row["new_expires_at"])
            previous = row
        figures.last_token[page_id] = previous["new_token"] if previous is not None else 0
    return figures


@dataclass
class StateFigures:
    """What the sync_state audit shows."""

    writes: Counter[str] = field(default_factory=Counter)  # by replica
    sessions: dict[str, list[str]] = field(default_factory=dict)  # by page, in order
    writers: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (page, session) -> replicas


def check_state_audit(rows: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> StateFigures:
    """Assert that every sync_state write was made by the replica holding the page's lock at that moment
    (fencing: a sync whose lease was taken over writes nothing), and that within a session the count of
    conversations synced never goes down; what happened."""
    figures = StateFigures()
    last: dict[str, tuple[str, int]] = {}
    for row in rows:
        page_id, session = row["page_id"], row["session_id"]
        where = f"page {page_id}, audit row {dict(row)}"
        assert row["holder"] is not None, f"sync_state written while nobody held the lock: {where}"
        holder = names.get(pid_of(row["holder"]))
        assert holder == row["app"], (
            f"sync_state written by {row['app']} while {holder} held the lock: {where}"
        )
        figures.writes[row["app"]] += 1
        sessions = figures.sessions.setdefault(page_id, [])
        if not sessions or sessions[-1] != session:
            sessions.append(session)
        elif page_id in last:
            assert row["total_synced"] >= last[page_id][1], f"a session's count went down: {where}"
        last[page_id] = (session, row["total_synced"])
        figures.writers.setdefault((page_id, session), set()).add(row["app"])
    return figures


async def sample_locks(db_url: str, stop: asyncio.Event, every: float = 0.01) -> set[tuple[Any, ...]]:
    """Read sync_locks every `every` seconds until `stop`: every (page, locked_by, token, expires_at) seen.

    A cross-check of the audit (each state seen here must be one it recorded), from a connection of
    its own."""
    seen: set[tuple[Any, ...]] = set()
    db = await asyncpg.connect(db_url)
    try:
        while not stop.is_set():
            rows = await db.fetch("SELECT page_id, locked_by, fencing_token, expires_at FROM sync_locks")
            seen.update(tuple(r) for r in rows)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
    finally:
        await db.close()
    return seen


def audited_states(rows: Sequence[Mapping[str, Any]]) -> set[tuple[Any, ...]]:
    """Every (page, locked_by, token, expires_at) the lock audit recorded."""
    return {(r["page_id"], r["new_locked_by"], r["new_token"], r["new_expires_at"]) for r in rows}


# ---- the stand-in's command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.helpers.replicas standin --port P --conversations N [--latency-ms L]``."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m tests.helpers.replicas")
    sub = parser.add_subparsers(dest="command", required=True)
    standin = sub.add_parser("standin", help="serve the replica tests' Graph stand-in")
    standin.add_argument("--port", type=int, required=True)
    standin.add_argument("--conversations", type=int, required=True, help="conversations of every page")
    standin.add_argument("--messages", type=int, default=MESSAGES)
    standin.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args(argv)
    app = ReplicaStandin(args.conversations, args.messages, args.latency_ms)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
