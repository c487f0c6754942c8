"""The crash test's machinery (issue 11, item 1), shared by tests/proof/test_crash.py (short mode)
and bench/crash.py (long mode): the service as real processes, killed with SIGKILL at random
moments while it backfills a large page set from the Graph stand-in and signed webhooks arrive.

    report = await run_crash(CrashConfig(database_url, engine, workdir, seed, kills=3))
    report.violations          every invariant that did not hold (empty: all held), seed included

    python -m tests.helpers.crash standin --port P --pages N --conversations M ...
        the Graph stand-in (bench/standin_limits.py's pages, /me answering the page a token names)

A run: the stand-in in a process of its own; the service (`python app.py serve`, or in the
"split" topology `python app.py serve` with BACKGROUND_WORK=off plus `python app.py worker`);
the pages registered through POST /api/pages (each token verified with the stand-in's /me); the
scheduler backfills them by itself while a sender thread posts signed webhook bodies and keeps
every body that got a 200. Then, `kills` times: wait a random moment, `kill -9` the process group
of the service (or, split, of the API, the worker or both, in an order the seed shuffles), check
the invariants with the killed process dead, restart it on the same database, and watch its
locks being taken over. At the end the sender delivers what it still holds (a body that got no
200 is sent again, as Meta does), every page is backfilled, the inbox drains, everything is
checked once more and the service stops gracefully.

Invariants (each violation is one line in ``CrashReport.violations``):

  integrity    SQLite: ``PRAGMA integrity_check`` is ok (the file opened read-only, as the crash left it)
  acked        every body that got a 200 is in webhook_events, byte for byte (sha256 of the stored body)
  applied      every inbox row marked applied has all its events, each in the conversation of its page
               and contact, with its type; no row ends failed, invalid or ignored (every page is registered)
  duplicates   no mid twice in a page; no two events on one unique key (conversation, type, mid or time)
  orphans      no conversation without events, no event without its conversation
  progress     per page, the saved sync position never went backwards (``backwards`` says how it is judged)
  takeover     a lock the killed process held on an unfinished backfill gets a new holder with a larger
               fencing token, acquired (``locked_at``, the database's clock) no earlier than the lock's
               ``expires_at``; within lock TTL + ``takeover_bound_seconds``
  final        every page holds exactly the stand-in's conversations plus the webhooks' contacts, and
               exactly the stand-in's messages plus the acknowledged webhook messages as events; every
               body was acknowledged; nothing pending; after the graceful stop no lock is still held

Kill moments, contacts and message kinds come from ``random.Random(seed)``: a failing run prints its
seed (``CRASH_SEED`` / ``--seed`` replays the same schedule; the processes' own timing still varies).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import httpx
import msgspec

from bench.graph_standin import decode_cursor
from bench.standin_limits import STATS_PATH, PagesStandin, StandinLimits, bench_page_ids
from tests.helpers import APP_SECRET, ROOT, VERIFY_TOKEN, free_port
from tests.helpers.webhook import item_body, signed

USER, KEY = "crash", "key-crash-0123456789"
TOKEN_PREFIX = "EAAB-crash-"
# The stand-in's contacts (bench/graph_standin.py synthesize_conversation) and its mids.
STANDIN_PSID_BASE, STANDIN_PSID_STEP = 5_000_000_000_000_000, 7_919
WEBHOOK_PSID_BASE = 6_100_000_000_000_000  # contacts only webhooks know
WEBHOOK_CONTACTS = 40  # per page
END = sys.maxsize  # the position of a complete session
_ENV_DROPPED = ("DATABASE_DIRECT_URL", "PROMETHEUS_MULTIPROC_DIR", "ADMIN_KEYS", "BACKGROUND_WORK")


def standin_counts(pages: int, conversations: int) -> dict[str, int]:
    """{facebook page id: conversations the stand-in serves}: a different count for every page."""
    return {fb: conversations + 7 * i for i, fb in enumerate(bench_page_ids(pages))}


def standin_psid(index: int) -> str:
    return str(STANDIN_PSID_BASE + index * STANDIN_PSID_STEP)


def standin_mids(count: int, messages: int) -> set[str]:
    """The mids of a stand-in page's messages (Graph details at most 20 per conversation)."""
    per = min(max(1, messages), 20)
    return {f"m_standin{i:09d}x{n:03d}" for i in range(count) for n in range(per)}


# ---- the Graph stand-in (a process of its own) ---------------------------------------------------


class CrashStandin:
    """bench/standin_limits.py's pages (limits far above the service's own pool), and a /me that
    answers the page a ``EAAB-crash-<page id>`` token names, so pages register through the API."""

    def __init__(self, counts: dict[str, int], messages: int, latency_ms: float) -> None:
        self.counts = counts
        self.limits = StandinLimits(
            PagesStandin(counts, messages=messages, latency_ms=latency_ms),
            page_calls_per_second=100_000,
            app_calls_per_second=1_000_000,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").split("/")[-1] == "me":
            token = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    token = value.decode("latin-1").partition(" ")[2]
            page = token.removeprefix(TOKEN_PREFIX)
            body: dict[str, Any]
            if token.startswith(TOKEN_PREFIX) and page in self.counts:
                status, body = 200, {"id": page, "name": f"Crash page {page}"}
            else:
                error = {"message": "Invalid OAuth access token", "type": "OAuthException", "code": 190}
                status, body = 400, {"error": error}
            payload = msgspec.json.encode(body)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.limits(scope, receive, send)


def _standin_main(argv: Sequence[str]) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m tests.helpers.crash standin")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pages", type=int, required=True)
    parser.add_argument("--conversations", type=int, required=True)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args(argv)
    app = CrashStandin(standin_counts(args.pages, args.conversations), args.messages, args.latency_ms)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# ---- configuration and figures -------------------------------------------------------------------


@dataclass(frozen=True)
class CrashConfig:
    """One crash run. The defaults are the short mode's (CI)."""

    database_url: str
    engine: str  # a label for the report: sqlite / postgres
    workdir: Path  # the processes' logs
    seed: int
    kills: int = 3
    topology: str = "single"  # "single": serve runs everything; "split": serve (API only) + worker
    pages: int = 6
    conversations: int = 200  # the first page's; each next page has 7 more
    messages: int = 3
    page_size: int = 10
    page_calls_per_second: float = 3.0  # the service's pool: what makes a backfill last
    latency_ms: float = 20.0
    lock_ttl_seconds: float = 2.0
    interval_seconds: float = 3600.0
    budget_seconds: float = 20.0
    webhook_rate: float = 40.0  # bodies per second
    kill_after: tuple[float, float] = (1.0, 2.0)  # seconds after the (re)start is ready
    takeover_bound_seconds: float = 30.0
    finish_bound_seconds: float = 180.0
    out: Callable[[str], None] = print

    @property
    def counts(self) -> dict[str, int]:
        return standin_counts(self.pages, self.conversations)

    @property
    def walk_calls(self) -> int:
        """Graph calls one walk of every page takes (more: pages fetched again after a kill)."""
        return sum(-(-count // self.page_size) for count in self.counts.values())


@dataclass
class KillFigures:
    """What one kill found."""

    number: int
    target: str
    ran_seconds: float  # since the (re)start was ready
    acked: int  # bodies acknowledged so far
    inbox: dict[str, int]  # rows by status
    conversations: int
    events: int
    pages_complete: int
    locks_held: int  # by the killed process, on unfinished backfills
    takeovers: int
    takeover_wait_seconds: float  # kill to the last takeover seen
    after_expiry_ms: int  # the latest takeover, database clock: locked_at - expires_at
    integrity: str

    def line(self) -> str:
        pending = self.inbox.get("pending", 0)
        return (
            f"kill {self.number:>2} ({self.target:<6} after {self.ran_seconds:4.1f} s): "
            f"integrity {self.integrity}, "
            f"acked {self.acked} / inbox {sum(self.inbox.values())} ({pending} pending), "
            f"conversations {self.conversations}, events {self.events}, "
            f"pages complete {self.pages_complete}, locks held {self.locks_held}, "
            f"taken over {self.takeovers} (after {self.takeover_wait_seconds:.1f} s, "
            f"{self.after_expiry_ms} ms past expiry)"
        )


@dataclass
class CrashReport:
    """A run's figures and what did not hold."""

    config: CrashConfig
    kills: list[KillFigures] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    sent: int = 0  # distinct bodies generated
    attempts: int = 0  # POSTs, retries included
    refused: dict[str, int] = field(default_factory=dict)  # answers other than 200 / errors, by kind
    acked: int = 0
    acked_found: int = 0  # acknowledged bodies found in the inbox at the end
    webhook_events: int = 0  # their events, found in their tables at the end
    events: int = 0
    conversations: int = 0
    takeovers: int = 0
    kills_mid_backfill: int = 0
    graph: dict[str, Any] = field(default_factory=dict)
    ack_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)  # p50, p99, max of the 200s
    seconds: float = 0.0

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every process's log, for a failure message (pytest's tmp dirs rotate)."""
        tails = []
        for path in sorted(self.config.workdir.glob("*.log")):
            text = [t for t in path.read_text(errors="replace").splitlines() if "uvicorn.access" not in t]
            text = text[-lines:]
            tails.append(f"---- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(tails)

    def fail(self, message: str) -> None:
        self.violations.append(
            f"[seed {self.config.seed}, {self.config.engine}/{self.config.topology}] {message}"
        )

    def summary(self) -> str:
        c = self.config
        return (
            f"{c.engine}/{c.topology}: {len(self.kills)} kills survived "
            f"({self.kills_mid_backfill} mid-backfill), {self.takeovers} lock takeovers; "
            f"webhooks: {self.sent} bodies, {self.attempts} posts, {self.acked} acked, "
            f"{self.acked_found} found in the inbox, {self.webhook_events} of their events in the tables "
            f"(ack p50 {self.ack_ms[0]:.0f} ms, p99 {self.ack_ms[1]:.0f} ms, max {self.ack_ms[2]:.0f} ms); "
            f"{self.conversations} conversations, {self.events} events; "
            f"Graph calls {self.graph.get('calls')} (one walk of every page: {c.walk_calls}); "
            f"refused/failed posts {self.refused or 0}; {self.seconds:.1f} s; "
            f"{'all invariants held' if not self.violations else f'{len(self.violations)} VIOLATIONS'}"
        )


# ---- the service's processes ---------------------------------------------------------------------


class Proc:
    """One process of the service in a process group of its own (so that kill -9 takes it all)."""

    def __init__(self, role: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.role = role
        self.log_path = log_path
        self._log: TextIO = open(log_path, "a")  # noqa: SIM115 - closed by wait()
        self._log.write(f"---- start {' '.join(command[1:])}\n")
        self._log.flush()
        self._log_start = log_path.stat().st_size
        self.popen = subprocess.Popen(
            command,
            cwd=log_path.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this run of the process wrote."""
        with open(self.log_path, errors="replace") as f:
            f.seek(self._log_start)
            return f.read()

    def wrote(self, text: str) -> bool:
        """Whether this run of the process wrote `text`."""
        return text in self.output()

    def signal_kill(self) -> None:
        """kill -9 its process group (only while it is not reaped: its group id is still ours)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def kill(self) -> None:
        """kill -9 its process group, and reap it."""
        self.signal_kill()
        self.wait(10)

    def stop(self, timeout: float = 20) -> bool:
        """SIGTERM (a graceful shutdown); False if it had to be killed."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return False
        self.wait(10)
        return True

    def wait(self, timeout: float) -> None:
        self.popen.wait(timeout)
        if not self._log.closed:
            self._log.close()


def wait_ready(proc: Proc, ready: Callable[[], bool], within: float = 60) -> None:
    """Wait until `ready()`; RuntimeError with the process's output if it exits or takes too long."""
    deadline = time.monotonic() + within
    while not ready():
        if not proc.alive():
            raise RuntimeError(f"the {proc.role} exited at start:\n{proc.output()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {proc.role} was not ready within {within} s:\n{proc.output()[-3000:]}")
        time.sleep(0.05)


class Service:
    """The service's processes for a topology: start, kill and restart them on one database."""

    def __init__(self, config: CrashConfig, graph_url: str) -> None:
        self.config = config
        self.graph_url = graph_url
        self.api: Proc | None = None
        self.worker: Proc | None = None
        self.api_url: str | None = None  # None while the API is down (the sender waits)
        self.probe = httpx.Client(timeout=1)  # one client: a client per probe builds an SSL context

    def answers(self, url: str) -> bool:
        try:
            return self.probe.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def _env(self, background: bool) -> dict[str, str]:
        c = self.config
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
        env.update(
            DATABASE_URL=c.database_url,
            GRAPH_API_URL=self.graph_url,
            FB_APP_SECRET=APP_SECRET,
            FB_VERIFY_TOKEN=VERIFY_TOKEN,
            API_KEYS=f"{USER}:{KEY}",
            SYNC_LOCK_TTL_SECONDS=str(c.lock_ttl_seconds),
            SYNC_INTERVAL_SECONDS=str(c.interval_seconds),
            SYNC_TIME_BUDGET_SECONDS=str(c.budget_seconds),
            SYNC_PAGE_SIZE=str(c.page_size),
            SYNC_CONCURRENCY=str(max(16, c.pages)),
            GRAPH_PAGE_CALLS_PER_SECOND=str(c.page_calls_per_second),
            BACKGROUND_WORK="on" if background else "off",
            LOG_FORMAT="text",
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def roles(self) -> list[str]:
        return ["api", "worker"] if self.config.topology == "split" else ["api"]

    def procs(self) -> list[Proc]:
        return [p for p in (self.api, self.worker) if p is not None]

    def start(self, *roles: str) -> None:
        """Start the roles at once and wait until each is ready (the API answers /readyz, the worker
        says it runs)."""
        split = self.config.topology == "split"
        app = str(ROOT / "app.py")
        waits: list[tuple[Proc, Callable[[], bool]]] = []
        port = 0
        for role in roles:
            log_path = self.config.workdir / f"{role}.log"
            if role == "api":
                port = free_port()
                command = [sys.executable, app, "serve", "--port", str(port)]
                api = self.api = Proc(role, command, self._env(background=not split), log_path)
                waits.append((api, functools.partial(self.answers, f"http://127.0.0.1:{port}/readyz")))
            else:
                worker = self.worker = Proc(role, [sys.executable, app, "worker"], self._env(True), log_path)
                waits.append((worker, functools.partial(worker.wrote, "worker running")))
        for proc, ready in waits:
            wait_ready(proc, ready)
        if "api" in roles:
            self.api_url = f"http://127.0.0.1:{port}"

    def kill(self, target: str) -> list[Proc]:
        """kill -9 the target ("api", "worker" or "both"); the killed processes, reaped."""
        roles = ["api", "worker"] if target == "both" else [target]
        killed = [
            p for p in (self.api if "api" in roles else None, self.worker if "worker" in roles else None) if p
        ]
        if "api" in roles:
            self.api_url = None
        for proc in killed:  # both at once, as close together as two system calls
            proc.signal_kill()
        for proc in killed:
            proc.kill()
        return killed

    def stop_all(self) -> list[str]:
        """A graceful stop of every process (the API first: the worker applies what it took in)."""
        self.api_url = None
        problems = []
        for proc in self.procs():
            if proc.alive() and not proc.stop():
                problems.append(f"the {proc.role} did not stop within 20 s of SIGTERM")
            elif proc.popen.returncode not in (0, -signal.SIGTERM):
                problems.append(f"the {proc.role} exited with {proc.popen.returncode} at SIGTERM")
        return problems

    def close(self) -> None:
        """kill -9 whatever still runs (a failed run); close the probe."""
        self.api_url = None
        for proc in self.procs():
            proc.kill()
        self.probe.close()


# ---- the webhook sender --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One message of a body: its mid, its contact and the event it must become."""

    mid: str
    contact: str
    event_type: str


@dataclass(frozen=True)
class Body:
    """One signed body the sender posts (again, until it gets a 200)."""

    raw: bytes
    sha256: str
    page: str  # facebook page id
    items: tuple[Item, ...]


class WebhookSender:
    """Posts signed bodies with unique mids to POST /api/webhook, `rate` a second from `concurrency`
    threads (so that the intake commits several at once), and keeps every body that got a 200. A
    body that got anything else (a connection error during a kill, a 503) is posted again later,
    byte for byte, as Meta retries."""

    def __init__(
        self, service: Service, counts: dict[str, int], seed: int, rate: float, concurrency: int = 4
    ) -> None:
        self.service = service
        self.counts = counts
        self.rng = random.Random(f"{seed}:webhooks")
        self.seed = seed
        self.interval = 1 / rate
        self.acked: list[Body] = []
        self.sent = 0
        self.attempts = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []  # seconds, of the posts that got a 200
        self.failures: list[str] = []
        self._retry: collections.deque[Body] = collections.deque()
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._producing = threading.Event()
        self._producing.set()
        self._halt = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"crash-webhooks-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def start(self) -> None:
        self._next_at = time.monotonic()
        for thread in self._threads:
            thread.start()

    def _new(self) -> Body:
        rng = self.rng
        pages = list(self.counts)
        page_index = rng.randrange(len(pages))
        page = pages[page_index]
        items: list[Item] = []
        raw_items: list[dict[str, Any]] = []
        now = int(time.time() * 1000)
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
            if rng.random() < 0.5:  # a contact the sync also brings: both land on one row
                contact = standin_psid(rng.randrange(self.counts[page]))
            else:
                contact = str(WEBHOOK_PSID_BASE + page_index * 1000 + rng.randrange(WEBHOOK_CONTACTS))
            echo = rng.random() < 0.25
            mid = f"m_crash{self.seed}x{self.sent:07d}x{len(items)}"
            message: dict[str, Any] = {"mid": mid, "text": f"crash message {self.sent}"}
            if echo:
                message["is_echo"] = True
            parties = ({"sender": {"id": page}, "recipient": {"id": contact}} if echo else
                       {"sender": {"id": contact}, "recipient": {"id": page}})  # fmt: skip
            raw_items.append({**parties, "timestamp": now + len(items), "message": message})
            items.append(Item(mid, contact, "message_sent" if echo else "message_received"))
        raw = item_body(*raw_items, page=page, time=now)
        self.sent += 1
        return Body(raw, hashlib.sha256(raw).hexdigest(), page, tuple(items))

    def _take(self) -> Body | None:
        """The next body to post (one not acknowledged yet first), at its moment; None when done."""
        with self._lock:
            if self._retry:
                body = self._retry.popleft()
            elif self._producing.is_set():
                body = self._new()
            else:
                return None
            self._next_at = max(self._next_at + self.interval, time.monotonic())
            at = self._next_at
        time.sleep(max(0.0, at - time.monotonic()))
        return body

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0)) as client:
                while not self._halt.is_set() and (body := self._take()) is not None:
                    self._post(client, body)
        except BaseException as exc:  # reported by the run, never raised in a thread
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def _post(self, client: httpx.Client, body: Body) -> None:
        url = self.service.api_url
        outcome = "api down"
        if url is not None:
            posted = time.perf_counter()
            try:
                response = client.post(f"{url}/api/webhook", content=body.raw, headers=signed(body.raw))
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            with self._lock:
                self.attempts += 1
                if outcome == "200":
                    self.acked.append(body)
                    self.latencies.append(time.perf_counter() - posted)
                    return
                self.refused[outcome] += 1
        with self._lock:
            self._retry.append(body)
        time.sleep(0.05)

    def snapshot(self) -> list[Body]:
        """The bodies acknowledged so far."""
        with self._lock:
            return list(self.acked)

    def finish(self, within: float) -> bool:
        """Stop making new bodies and deliver the ones not acknowledged yet; whether all were."""
        self._producing.clear()
        deadline = time.monotonic() + within
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.abort()
        return not self._retry and not self.failures

    def abort(self) -> None:
        self._producing.clear()
        self._halt.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(15)


# ---- reading the database from outside -----------------------------------------------------------


class Reader:
    """Read-only queries on the service's database ($n placeholders on both engines)."""

    def __init__(self, sqlite: sqlite3.Connection | None, pg: asyncpg.Connection | None) -> None:
        self._sqlite, self._pg = sqlite, pg

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if self._pg is not None:
            return [dict(r) for r in await self._pg.fetch(sql, *args)]
        assert self._sqlite is not None
        cursor = self._sqlite.execute(re.sub(r"\$(\d+)", r"?\1", sql), args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def integrity(self) -> str:
        """SQLite's integrity_check and foreign_key_check ("ok" when both are clean); PostgreSQL: "n/a"."""
        if self._sqlite is None:
            return "n/a"
        found = [str(r[0]) for r in self._sqlite.execute("PRAGMA integrity_check").fetchall()]
        foreign = self._sqlite.execute("PRAGMA foreign_key_check").fetchall()
        if found == ["ok"] and not foreign:
            return "ok"
        return "; ".join(found[:5] + [f"foreign key violation {tuple(r)}" for r in foreign[:5]])


@contextlib.asynccontextmanager
async def reading(url: str) -> AsyncIterator[Reader]:
    """A Reader on the database at url; SQLite opened read-only, as the last crash left the file."""
    if url.startswith("sqlite"):
        path = url[len("sqlite:///") :]
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        try:
            yield Reader(db, None)
        finally:
            db.close()
        return
    conn = await asyncpg.connect(url, statement_cache_size=0)  # a transaction pooler allows no cache
    try:
        yield Reader(None, conn)
    finally:
        await conn.close()


# ---- the invariants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """A page's saved sync position (sync_state)."""

    session: str
    offset: int  # where the saved cursor points in the walk: 0 at the top, END once complete
    total_synced: int
    complete: bool
    completed_syncs: int
    watermark: int | None


def backwards(before: Position, now: Position) -> str | None:
    """How `now` went backwards from `before`, or None.

    The rule: ``completed_syncs`` and the incremental ``watermark`` never decrease. Within one
    session (same ``sync_session_id``) the saved cursor's position in the walk (the stand-in's
    cursor is an offset; a complete session is past the end) and ``total_synced`` never
    decrease, and a complete session stays complete. A new session may replace a session only
    once that one completed (then the new one starts at the top: an incremental run after a
    complete backfill is not a step back); an unfinished session replaced by another, before
    any sync completed, would mean the walk restarted from the top.
    """
    if now.completed_syncs < before.completed_syncs:
        return f"completed_syncs went from {before.completed_syncs} to {now.completed_syncs}"
    if before.watermark is not None and (now.watermark is None or now.watermark < before.watermark):
        return f"the watermark went from {before.watermark} to {now.watermark}"
    if now.session == before.session:
        if before.complete and not now.complete:
            return f"session {now.session} was complete and is not any more"
        if now.offset < before.offset:
            return f"session {now.session}'s cursor went from offset {before.offset} back to {now.offset}"
        if now.total_synced < before.total_synced:
            return (
                f"session {now.session}'s total_synced went from {before.total_synced} to {now.total_synced}"
            )
        return None
    if not before.complete and now.completed_syncs == before.completed_syncs:
        return (
            f"unfinished session {before.session} (at offset {before.offset}) was replaced by session "
            f"{now.session} without completing"
        )
    return None


@dataclass
class HeldLock:
    """A lock the killed process held."""

    page_id: str
    fencing_token: int
    expires_at: int
    unfinished: bool  # its page's session was not complete: someone must take it over


@dataclass
class Observation:
    """What one full check saw."""

    inbox: dict[str, int]
    conversations: int
    events: int
    complete_pages: int
    positions: dict[str, Position]
    locks: dict[str, dict[str, Any]]
    per_page_conversations: dict[str, set[str]]
    per_page_mids: dict[str, set[str]]
    in_inbox: int  # acknowledged bodies found in the inbox
    found_bodies: int  # acknowledged bodies applied, with all their events found


class Checker:
    """Runs the invariants against the database; remembers each page's last position."""

    def __init__(self, config: CrashConfig, report: CrashReport) -> None:
        self.config = config
        self.report = report
        self.positions: dict[str, Position] = {}
        self.page_ids: dict[str, str] = {}  # page id -> facebook page id

    async def observe(self, db: Reader, acked: Sequence[Body], where: str) -> Observation:
        """Check everything that must hold at any moment (the kill's aftermath, or the end)."""
        fail = self.report.fail
        pages = await db.fetch("SELECT id, facebook_page_id FROM facebook_pages")
        self.page_ids = {r["id"]: r["facebook_page_id"] for r in pages}
        # The inbox before the events: a row seen applied has its events committed before this read.
        rows = await db.fetch("SELECT id, status, body, body_sha256 FROM webhook_events")
        inbox: collections.Counter[str] = collections.Counter()
        status_of: dict[str, str] = {}
        for r in rows:
            inbox[r["status"]] += 1
            stored = bytes(r["body"])
            if hashlib.sha256(stored).hexdigest() != r["body_sha256"]:
                fail(f"{where}: inbox row {r['id']}'s body does not match its sha256")
            status_of[r["body_sha256"]] = r["status"]
            if r["status"] in ("failed", "invalid", "ignored"):
                fail(f"{where}: inbox row {r['id']} is {r['status']}")
        missing = [b for b in acked if b.sha256 not in status_of]
        if missing:
            mids = ", ".join(i.mid for b in missing[:5] for i in b.items)
            fail(f"{where}: {len(missing)} acknowledged bodies are not in the inbox (e.g. {mids})")
        events = await db.fetch(
            "SELECT e.message_id, e.event_type, e.page_id, c.page_id AS conversation_page, c.sender_id "
            "FROM contact_interaction_events e JOIN messenger_conversations c ON c.id = e.conversation_id "
            "WHERE e.message_id IS NOT NULL"
        )
        by_mid: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        per_page_mids: dict[str, set[str]] = collections.defaultdict(set)
        for e in events:
            fb = self.page_ids.get(e["page_id"], "?")
            by_mid[(fb, e["message_id"])].append(e)
            per_page_mids[fb].add(e["message_id"])
            if e["page_id"] != e["conversation_page"]:
                fail(f"{where}: event {e['message_id']} is in a conversation of another page")
        twice = [key for key, found in by_mid.items() if len(found) > 1]
        if twice:
            fail(f"{where}: {len(twice)} mids stored more than once in a page, e.g. {twice[:3]}")
        found_bodies = 0
        for body in acked:
            if status_of.get(body.sha256) != "applied":
                continue
            found_bodies += 1
            for item in body.items:
                found = by_mid.get((body.page, item.mid), [])
                if not found:
                    fail(f"{where}: {item.mid} of an applied inbox row is not in contact_interaction_events")
                elif (found[0]["sender_id"], found[0]["event_type"]) != (item.contact, item.event_type):
                    fail(
                        f"{where}: {item.mid} is stored as {found[0]['event_type']} of "
                        f"{found[0]['sender_id']}, sent as {item.event_type} of {item.contact}"
                    )
        await self._structure(db, where)
        positions, complete = await self._progress(db, where)
        conversations = await db.fetch("SELECT page_id, sender_id FROM messenger_conversations")
        per_page_conversations: dict[str, set[str]] = collections.defaultdict(set)
        for c in conversations:
            per_page_conversations[self.page_ids.get(c["page_id"], "?")].add(c["sender_id"])
        (count,) = await db.fetch("SELECT count(*) AS n FROM contact_interaction_events")
        locks = await self.locks(db)
        return Observation(
            inbox=dict(inbox),
            conversations=len(conversations),
            events=int(count["n"]),
            complete_pages=complete,
            positions=positions,
            locks=locks,
            per_page_conversations=per_page_conversations,
            per_page_mids=per_page_mids,
            in_inbox=len(acked) - len(missing),
            found_bodies=found_bodies,
        )

    async def _structure(self, db: Reader, where: str) -> None:
        fail = self.report.fail
        for name, sql in (
            (
                "events sharing (conversation, type, mid)",
                "SELECT count(*) AS n FROM (SELECT conversation_id FROM contact_interaction_events "
                "WHERE message_id IS NOT NULL GROUP BY conversation_id, event_type, message_id "
                "HAVING count(*) > 1) d",
            ),
            (
                "events sharing (conversation, type, timestamp) without a mid",
                "SELECT count(*) AS n FROM (SELECT conversation_id FROM contact_interaction_events "
                "WHERE message_id IS NULL GROUP BY conversation_id, event_type, event_timestamp "
                "HAVING count(*) > 1) d",
            ),
            (
                "conversations without events",
                "SELECT count(*) AS n FROM messenger_conversations c WHERE NOT EXISTS "
                "(SELECT 1 FROM contact_interaction_events e WHERE e.conversation_id = c.id)",
            ),
            (
                "events without their conversation",
                "SELECT count(*) AS n FROM contact_interaction_events e WHERE NOT EXISTS "
                "(SELECT 1 FROM messenger_conversations c WHERE c.id = e.conversation_id)",
            ),
        ):
            (row,) = await db.fetch(sql)
            if row["n"]:
                fail(f"{where}: {row['n']} {name}")

    async def _progress(self, db: Reader, where: str) -> tuple[dict[str, Position], int]:
        rows = await db.fetch(
            "SELECT page_id, sync_session_id, last_cursor, total_synced, is_complete, completed_syncs, "
            "watermark FROM sync_state"
        )
        positions: dict[str, Position] = {}
        for r in rows:
            complete = bool(r["is_complete"])
            offset: int | None = END if complete else 0
            if not complete and r["last_cursor"] is not None:
                offset = decode_cursor(r["last_cursor"])
            if offset is None:
                self.report.fail(
                    f"{where}: page {r['page_id']}'s saved cursor {r['last_cursor']!r} is not the stand-in's"
                )
                continue
            now = Position(
                r["sync_session_id"],
                offset,
                r["total_synced"],
                complete,
                r["completed_syncs"],
                r["watermark"],
            )
            before = self.positions.get(r["page_id"])
            problem = None if before is None else backwards(before, now)
            if problem is not None:
                self.report.fail(f"{where}: page {r['page_id']}'s sync went backwards: {problem}")
            positions[r["page_id"]] = self.positions[r["page_id"]] = now
        return positions, sum(1 for p in positions.values() if p.completed_syncs >= 1)

    async def locks(self, db: Reader) -> dict[str, dict[str, Any]]:
        rows = await db.fetch(
            "SELECT page_id, locked_by, locked_at, expires_at, fencing_token FROM sync_locks"
        )
        return {r["page_id"]: r for r in rows}


def held_by(observation: Observation, pids: Sequence[int]) -> list[HeldLock]:
    """The locks the killed processes held (locked_by is host:pid:nonce)."""
    held = []
    for page_id, lock in observation.locks.items():
        holder = lock["locked_by"]
        if holder is None or int(holder.split(":")[-2]) not in pids:
            continue
        position = observation.positions.get(page_id)
        unfinished = position is not None and not position.complete
        held.append(HeldLock(page_id, int(lock["fencing_token"]), int(lock["expires_at"]), unfinished))
    return held


# ---- the run ---------------------------------------------------------------------------------------


def start_standin(config: CrashConfig) -> tuple[Proc, str]:
    """The stand-in in a process of its own (not waited for); it and its GRAPH_API_URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "tests.helpers.crash", "standin", "--port", str(port),
        "--pages", str(config.pages), "--conversations", str(config.conversations),
        "--messages", str(config.messages), "--latency-ms", str(config.latency_ms),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return Proc("standin", command, env, config.workdir / "standin.log"), f"http://127.0.0.1:{port}/v25.0"


def kill_targets(config: CrashConfig, rng: random.Random) -> list[str]:
    """What each kill hits: the service; split, every one of api / worker / both once per three
    kills, in an order the seed shuffles."""
    if config.topology != "split":
        return ["api"] * config.kills
    targets: list[str] = []
    while len(targets) < config.kills:
        targets += rng.sample(["api", "worker", "both"], 3)
    return targets[: config.kills]


async def register(service: Service, counts: dict[str, int]) -> None:
    assert service.api_url is not None
    async with httpx.AsyncClient(base_url=service.api_url, timeout=30) as http:
        for i, fb in enumerate(counts):
            response = await http.post(
                "/api/pages",
                json={"facebookPageId": fb, "accessToken": f"{TOKEN_PREFIX}{fb}", "name": f"Crash {i}"},
                headers={"Authorization": f"Bearer {KEY}"},
            )
            if response.status_code != 201:
                raise RuntimeError(f"registering page {fb}: {response.status_code} {response.text}")


async def run_crash(config: CrashConfig) -> CrashReport:
    """One crash run (see the module docstring); the report says what held."""
    report = CrashReport(config)
    rng = random.Random(f"{config.seed}:kills")
    config.workdir.mkdir(parents=True, exist_ok=True)
    out = config.out
    out(
        f"crash run {config.engine}/{config.topology}: CRASH_SEED={config.seed}, {config.kills} kills, "
        f"{config.pages} pages x {config.conversations}+ conversations, logs in {config.workdir}"
    )
    started = time.monotonic()
    standin, graph_url = start_standin(config)
    service = Service(config, graph_url)
    sender = WebhookSender(service, config.counts, config.seed, config.webhook_rate)
    try:
        service.start(*service.roles)  # while the stand-in starts
        stats_url = graph_url.rsplit("/", 1)[0] + STATS_PATH
        wait_ready(standin, functools.partial(service.answers, stats_url))
        await register(service, config.counts)
        sender.start()
        checker = Checker(config, report)
        await _kill_loop(config, report, checker, service, sender, rng)
        await _finish(config, report, checker, service, sender)
        report.graph = service.probe.get(stats_url).json()
    finally:
        try:
            sender.abort()
        finally:
            service.close()
            standin.stop()
    report.seconds = time.monotonic() - started
    for failure in sender.failures:
        report.fail(f"the webhook sender failed: {failure}")
    out(report.summary())
    for line in report.violations:
        out(f"VIOLATION {line}")
    return report


async def _kill_loop(
    config: CrashConfig,
    report: CrashReport,
    checker: Checker,
    service: Service,
    sender: WebhookSender,
    rng: random.Random,
) -> None:
    ready_at = time.monotonic()
    for number, target in enumerate(kill_targets(config, rng), start=1):
        delay = rng.uniform(*config.kill_after)
        await asyncio.sleep(max(0.0, ready_at + delay - time.monotonic()))
        for proc in service.procs():
            if not proc.alive():
                raise RuntimeError(f"the {proc.role} died by itself:\n{proc.output()[-3000:]}")
        ran = time.monotonic() - ready_at
        killed = service.kill(target)
        killed_at = time.monotonic()
        acked = sender.snapshot()  # after the kill: everything acknowledged by a dead process is in here
        where = f"after kill {number}"
        async with reading(config.database_url) as db:
            integrity = db.integrity()
            if integrity != "ok" and integrity != "n/a":
                report.fail(f"{where}: integrity_check: {integrity}")
            seen = await checker.observe(db, acked, where)
        held = held_by(seen, [p.pid for p in killed])
        if seen.complete_pages < config.pages:
            report.kills_mid_backfill += 1
        service.start(*[p.role for p in killed])
        ready_at = time.monotonic()
        taken, waited, past_expiry = await takeovers(config, report, held, killed_at, where)
        report.takeovers += taken
        figures = KillFigures(
            number=number,
            target=target if config.topology == "split" else "serve",
            ran_seconds=ran,
            acked=len(acked),
            inbox=seen.inbox,
            conversations=seen.conversations,
            events=seen.events,
            pages_complete=seen.complete_pages,
            locks_held=sum(1 for h in held if h.unfinished),
            takeovers=taken,
            takeover_wait_seconds=waited,
            after_expiry_ms=past_expiry,
            integrity=integrity,
        )
        report.kills.append(figures)
        config.out(figures.line())


async def takeovers(
    config: CrashConfig, report: CrashReport, held: list[HeldLock], killed_at: float, where: str
) -> tuple[int, float, int]:
    """Wait until every lock the killed process held on an unfinished backfill has a new holder;
    (takeovers seen, seconds from the kill to the last, locked_at - expires_at of the latest in ms)."""
    waiting = {h.page_id: h for h in held}
    must = {h.page_id for h in held if h.unfinished}
    deadline = time.monotonic() + config.lock_ttl_seconds + config.takeover_bound_seconds
    seen, waited, past_expiry = 0, 0.0, 0
    while waiting:
        async with reading(config.database_url) as db:
            locks = {r["page_id"]: r for r in await db.fetch("SELECT * FROM sync_locks")}
        for page_id, old in list(waiting.items()):
            now = locks.get(page_id)
            if now is None or int(now["fencing_token"]) <= old.fencing_token:
                continue
            del waiting[page_id]
            seen += 1
            waited = time.monotonic() - killed_at
            past_expiry = int(now["locked_at"]) - old.expires_at
            if past_expiry < 0:
                report.fail(
                    f"{where}: page {page_id}'s lock (token {old.fencing_token}, expiring at "
                    f"{old.expires_at}) was taken over {-past_expiry} ms before it expired "
                    f"(token {now['fencing_token']})"
                )
        if not must & set(waiting):
            break  # the rest were finished syncs: nobody needs to take them over
        if time.monotonic() > deadline:
            report.fail(
                f"{where}: locks of unfinished backfills not taken over: {sorted(must & set(waiting))}"
            )
            break
        await asyncio.sleep(0.1)
    return seen, waited, past_expiry


async def _finish(
    config: CrashConfig, report: CrashReport, checker: Checker, service: Service, sender: WebhookSender
) -> None:
    """Let every page complete (webhooks still arriving), deliver the last bodies, let the inbox
    drain; check it all; stop gracefully and check again."""
    deadline = time.monotonic() + config.finish_bound_seconds
    complete = "SELECT count(*) AS n FROM sync_state WHERE completed_syncs >= 1"
    if not await _until(config, complete, lambda n: n == config.pages, deadline):
        report.fail(f"not every page completed a sync within {config.finish_bound_seconds} s")
    if not sender.finish(60):
        report.fail(f"the sender could not deliver every body within 60 s (refused: {dict(sender.refused)})")
    pending = "SELECT count(*) AS n FROM webhook_events WHERE status = 'pending'"
    if not await _until(config, pending, lambda n: n == 0, deadline):
        report.fail(f"the inbox did not drain within {config.finish_bound_seconds} s")
    acked = sender.snapshot()
    report.sent, report.attempts, report.refused = sender.sent, sender.attempts, dict(sender.refused)
    if sender.latencies:
        ms = sorted(1000 * t for t in sender.latencies)
        report.ack_ms = (ms[len(ms) // 2], ms[min(len(ms) - 1, len(ms) * 99 // 100)], ms[-1])
    report.acked = len(acked)
    if len(acked) != sender.sent:
        report.fail(f"{sender.sent} bodies sent, {len(acked)} acknowledged")
    async with reading(config.database_url) as db:
        seen = await checker.observe(db, acked, "at the end")
    report.acked_found = seen.in_inbox
    report.conversations, report.events = seen.conversations, seen.events
    _final(config, report, seen, acked)
    for problem in service.stop_all():
        report.fail(problem)
    async with reading(config.database_url) as db:
        integrity = db.integrity()
        if integrity not in ("ok", "n/a"):
            report.fail(f"after the graceful stop: integrity_check: {integrity}")
        held = [r for r in (await checker.locks(db)).values() if r["locked_by"] is not None]
        if held:
            report.fail(f"after the graceful stop {len(held)} locks are still held: {held[:3]}")


async def _until(config: CrashConfig, count_sql: str, done: Callable[[int], bool], deadline: float) -> bool:
    """Poll a count until `done(count)`; False once `deadline` passed."""
    while True:
        async with reading(config.database_url) as db:
            (row,) = await db.fetch(count_sql)
        if done(int(row["n"])):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)


def _final(config: CrashConfig, report: CrashReport, seen: Observation, acked: Sequence[Body]) -> None:
    """Exactly what the stand-in serves plus what the webhooks brought, page by page."""
    contacts: dict[str, set[str]] = collections.defaultdict(set)
    mids: dict[str, set[str]] = collections.defaultdict(set)
    for body in acked:
        for item in body.items:
            contacts[body.page].add(item.contact)
            mids[body.page].add(item.mid)
    report.webhook_events = sum(len(mids[fb] & seen.per_page_mids.get(fb, set())) for fb in mids)
    for fb, count in config.counts.items():
        expected = {standin_psid(i) for i in range(count)} | contacts[fb]
        stored = seen.per_page_conversations.get(fb, set())
        if stored != expected:
            report.fail(
                f"at the end: page {fb} has {len(stored)} conversations, expected {len(expected)} "
                f"({len(expected - stored)} missing, {len(stored - expected)} unexpected)"
            )
        expected_mids = standin_mids(count, config.messages) | mids[fb]
        stored_mids = seen.per_page_mids.get(fb, set())
        if stored_mids != expected_mids:
            report.fail(
                f"at the end: page {fb} has {len(stored_mids)} events with a mid, expected "
                f"{len(expected_mids)} ({len(expected_mids - stored_mids)} missing, "
                f"{len(stored_mids - expected_mids)} unexpected)"
            )
    if seen.found_bodies != len(acked):
        report.fail(f"at the end: {len(acked) - seen.found_bodies} acknowledged bodies are not applied")
    if set(seen.inbox) - {"applied"}:
        report.fail(f"at the end: inbox rows {seen.inbox}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["standin"]:
        _standin_main(sys.argv[2:])
