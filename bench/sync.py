"""Sync benchmark: the SPEC's two sync targets, against the Graph stand-in over loopback HTTP.

    python bench/sync.py                                  # both engines, the defaults below
    python bench/sync.py --latency-ms 20 --conversations 5000             # the README's run
    python bench/sync.py --latency-ms 20 --conversations 5000 --scale 10  # ten times that: 50k, RSS 50k/500k
    python bench/sync.py --conversations 20000 --repeat 3 --engines sqlite,postgres
    python bench/sync.py --rss-sizes 5000,50000 --rss-engine sqlite,postgres

(a) Speed: the time of a full sync (fresh database) over the time of just walking the same pages
    with GraphClient (no writes), measured alternately in the same run; target <= 1.3x. Also the
    time per conversation, and the size of the tables one sync wrote.
(b) Memory: peak RSS (VmHWM) of a full sync at each size, each in its own subprocess;
    target: the largest within 10% of the smallest. Also, per size: the sync's time per
    conversation (stand-in latency 0, so this is the cost of the writes) and the size of the
    conversation and event tables (bytes per row). On PostgreSQL the RSS is the syncing
    process's only, not the database server's.

`--scale N` multiplies `--conversations` and every `--rss-sizes` entry by N (the sizes printed are
the scaled ones). Table sizes: SQLite from the dbstat virtual table (table and its indexes; the
file size includes the WAL), PostgreSQL pg_total_relation_size (table, indexes and TOAST).

The stand-in (bench/graph_standin.py) runs in a uvicorn subprocess on 127.0.0.1, one per size.
PostgreSQL runs in a fresh schema of --pg-url, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from core.metrics import Metrics  # noqa: E402
from core.settings import Settings  # noqa: E402
from schema.api import SyncRequest  # noqa: E402
from storage import open_storage  # noqa: E402
from sync.engine import SyncEngine  # noqa: E402
from sync.graph_client import GraphClient  # noqa: E402
from sync.page_token import verify_page_token  # noqa: E402

PAGE = "104325188712345"
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


# ---- sizes: the tables that grow with use, and a process's peak memory (shared by the benches) ----

# The webhook inbox, the events and the conversations: what grows with traffic.
SIZED_TABLES = ("webhook_events", "contact_interaction_events", "messenger_conversations")
SHORT_NAMES = {
    "webhook_events": "inbox",
    "contact_interaction_events": "events",
    "messenger_conversations": "conversations",
}


@dataclass
class DatabaseSize:
    """Rows and bytes (table with its indexes) of SIZED_TABLES, and the whole database's bytes."""

    rows: dict[str, int]
    bytes: dict[str, int]
    total_bytes: int
    how: str  # how the bytes were measured
    dead: dict[str, int] = field(default_factory=dict)  # PostgreSQL: dead row versions not vacuumed yet

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "bytes": self.bytes, "total_bytes": self.total_bytes, "how": self.how,
            "dead": self.dead,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatabaseSize:
        return cls(data["rows"], data["bytes"], data["total_bytes"], data["how"], data.get("dead", {}))

    def describe(self, tables: tuple[str, ...] = SIZED_TABLES) -> str:
        """`events 15,000 rows 3.1 MiB (217 B/row), ...; database 6.0 MiB`."""
        parts = []
        for table in tables:
            rows, size = self.rows[table], self.bytes[table]
            per_row = f" ({size / rows:,.0f} B/row)" if rows else ""
            dead = f" + {self.dead[table]:,} dead row versions" if self.dead.get(table) else ""
            parts.append(f"{SHORT_NAMES[table]} {rows:,} rows{dead} {mib(size)}{per_row}")
        return f"{', '.join(parts)}; database {mib(self.total_bytes)} ({self.how})"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def sqlite_path(database_url: str) -> str:
    """The file of a sqlite:/// URL, as storage.open_storage reads it."""
    path = database_url[len("sqlite://") :]
    return path[1:] if path.startswith("/") else path


def _sqlite_size(path: str) -> DatabaseSize:
    db = sqlite3.connect(path)
    try:
        owner = dict(db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        rows = {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in SIZED_TABLES}
        sizes = dict.fromkeys(SIZED_TABLES, 0)
        try:
            for name, size in db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
                if owner.get(name) in sizes:
                    sizes[owner[name]] += int(size)
            how = "SQLite dbstat; file + WAL"
        except sqlite3.OperationalError:  # built without SQLITE_ENABLE_DBSTAT_VTAB: whole file only
            how = "SQLite page_count * page_size, no per-table bytes"
        page_count = int(db.execute("PRAGMA page_count").fetchone()[0])
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    finally:
        db.close()
    wal = Path(path + "-wal")
    total = max(page_count * page_size, Path(path).stat().st_size) + (
        wal.stat().st_size if wal.exists() else 0
    )
    return DatabaseSize(rows, sizes, total, how)


async def database_size(database_url: str) -> DatabaseSize:
    """Rows and bytes of the inbox, event and conversation tables of a bench database."""
    if database_url.startswith("sqlite:"):
        return await asyncio.to_thread(_sqlite_size, sqlite_path(database_url))
    import asyncpg

    conn = await asyncpg.connect(database_url)  # its search_path names the bench schema
    try:
        rows, sizes, dead = {}, {}, {}
        for table in SIZED_TABLES:
            rows[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            sizes[table] = int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table))
            # Updated rows leave dead versions until (auto)vacuum: the inbox row's status change,
            # a conversation's every new last message.
            found = await conn.fetchval(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = $1::regclass", table
            )
            dead[table] = int(found or 0)
        total = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(format('%I.%I', schemaname, tablename))), 0) "
            "FROM pg_tables WHERE schemaname = current_schema()"
        )
        autovacuum = await conn.fetchval("SELECT current_setting('autovacuum')")
    finally:
        await conn.close()
    how = f"pg_total_relation_size, every table of the schema; autovacuum {autovacuum}"
    return DatabaseSize(rows, sizes, int(total), how, dead)


def peak_rss_kib(pid: int) -> int:
    """A running process's peak resident set so far (VmHWM), in KiB; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def load() -> str:
    """The load averages (1, 5, 15 min): the machine is shared, so every run says how busy it was."""
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_process(cmd: list[str], port: int, **popen: Any) -> Iterator[str]:
    """Run a Graph stand-in command listening on `port`; yields its GRAPH_API_URL once it accepts."""
    proc = subprocess.Popen(cmd, cwd=ROOT, **popen)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("the Graph stand-in did not start")
        yield f"http://127.0.0.1:{port}/v25.0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def standin(conversations: int, messages: int, latency_ms: float) -> Iterator[str]:
    """Run the Graph stand-in in a subprocess; yields its GRAPH_API_URL."""
    port = free_port()
    cmd = [
        sys.executable, str(ROOT / "bench" / "graph_standin.py"), "--port", str(port),
        "--conversations", str(conversations), "--messages", str(messages), "--page-id", PAGE,
        "--latency-ms", str(latency_ms),
    ]  # fmt: skip
    with serve_process(cmd, port) as url:
        yield url


@asynccontextmanager
async def fresh_database(engine: str, pg_url: str) -> AsyncIterator[str]:
    """A DATABASE_URL of an empty database, removed afterwards."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    import asyncpg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    try:
        yield f"{pg_url}{'&' if '?' in pg_url else '?'}search_path={schema}"
    finally:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            await conn.close()


async def fetch_only(graph_url: str) -> tuple[float, int]:
    """Walk every page with GraphClient alone: (seconds, conversations)."""
    async with httpx.AsyncClient(base_url=graph_url, timeout=TIMEOUT) as http:
        graph = GraphClient(http)
        started = time.perf_counter()
        after: str | None = None
        seen = 0
        while True:
            page = await graph.fetch_conversations(
                PAGE, "bench-token", after=after, limit=100, deadline=time.monotonic() + 3600
            )
            seen += len(page.records)
            after = page.next_cursor
            if after is None:
                return time.perf_counter() - started, seen


async def full_sync(graph_url: str, database_url: str) -> tuple[float, int]:
    """A full sync into an empty database: (seconds, conversations synced). Setup is not timed.

    The page is registered as POST /api/pages does it: its token verified with the stand-in's /me first.
    """
    settings = Settings(database_url=database_url, graph_api_url=graph_url, sync_time_budget_seconds=3600)
    storage = await open_storage(database_url)
    try:
        await storage.migrate()
        async with httpx.AsyncClient(base_url=graph_url, timeout=TIMEOUT) as http:
            identity = await verify_page_token(http, PAGE, "bench-token")
            page, _ = await storage.register_page("bench", PAGE, "bench-token", identity.name)
            engine = SyncEngine(storage, GraphClient(http), settings, Metrics())
            request = SyncRequest(page_id=page.id, facebook_page_id=PAGE, mode="full")
            started = time.perf_counter()
            synced = 0
            while True:
                result = await engine.sync("bench", request)
                synced += result.synced
                if not result.has_more:
                    return time.perf_counter() - started, synced
    finally:
        await storage.close()


async def speed(args: argparse.Namespace) -> list[tuple[str, float]]:
    print(f"\n(a) sync time / fetch-only time, {args.conversations} conversations x {args.messages} messages")
    ratios = []
    with standin(args.conversations, args.messages, args.latency_ms) as graph_url:
        await fetch_only(graph_url)  # warm up both sides
        for engine in args.engines:
            fetches, syncs = [], []
            size: DatabaseSize | None = None
            for _ in range(args.repeat):
                seconds, seen = await fetch_only(graph_url)
                fetches.append(seconds)
                async with fresh_database(engine, args.pg_url) as url:
                    seconds, synced = await full_sync(graph_url, url)
                    size = await database_size(url)
                syncs.append(seconds)
                assert seen == synced == args.conversations, (seen, synced)
            fetch_s, sync_s = statistics.median(fetches), statistics.median(syncs)
            ratio = sync_s / fetch_s
            ratios.append((engine, ratio))
            print(
                f"  {engine:<9} fetch-only {fetch_s:6.2f} s   sync {sync_s:6.2f} s "
                f"({args.conversations / sync_s:,.0f} conv/s)   ratio {ratio:.2f}x "
                f"[{'ok' if ratio <= 1.3 else 'OVER'} target 1.3x]  (median of {args.repeat})"
            )
            assert size is not None
            print(
                f"  {'':<9} per conversation: sync {1000 * sync_s / args.conversations:.3f} ms, "
                f"fetch-only {1000 * fetch_s / args.conversations:.3f} ms; load {load()}\n"
                f"  {'':<9} tables: {size.describe(SIZED_TABLES[1:])}"
            )
    return ratios


async def rss_child(args: argparse.Namespace) -> None:
    """In a subprocess: one full sync, then print (last line, JSON) its peak RSS in KiB, time and sizes."""
    async with fresh_database(args.rss_engine, args.pg_url) as url:
        seconds, synced = await full_sync(args.graph_url, url)
        size = await database_size(url)
    assert synced == args.conversations, synced
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (Linux carries the
    # maxrss of the memory image exec replaces), so it would report the bench's own peak.
    rss = peak_rss_kib(os.getpid())
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rss_kib": rss,
                "maxrss_kib": maxrss,
                "seconds": seconds,
                "synced": synced,
                "size": size.to_json(),
            }
        )
    )


def memory(args: argparse.Namespace, engine: str) -> tuple[float, dict[int, dict[str, Any]]]:
    sizes = args.rss_sizes
    print(f"\n(b) peak RSS of a full sync ({engine}), each size in its own process")
    peaks, runs = {}, {}
    for size in sizes:
        with standin(size, args.messages, 0) as graph_url:
            cmd = [
                sys.executable, __file__, "--rss-child", "--conversations", str(size), "--messages",
                str(args.messages), "--graph-url", graph_url, "--rss-engine", engine,
                "--pg-url", args.pg_url,
            ]  # fmt: skip
            started = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[size] = run
            peaks[size] = run["rss_kib"] / 1024
            took = time.perf_counter() - started
            db = DatabaseSize.from_json(run["size"])
            print(
                f"  {size:>7,} conversations: peak RSS {peaks[size]:6.1f} MiB ({took:.1f} s)\n"
                f"  {'':>7}   sync {run['seconds']:.1f} s = "
                f"{1000 * run['seconds'] / size:.3f} ms/conversation; load {load()}\n"
                f"  {'':>7}   {db.describe(SIZED_TABLES[1:])}"
            )
    small, large = peaks[min(sizes)], peaks[max(sizes)]
    growth = large / small - 1
    print(
        f"  {max(sizes):,} vs {min(sizes):,}: {large / small:.3f}x ({growth:+.1%}) "
        f"[{'ok' if growth <= 0.10 else 'OVER'} target +10%]"
    )
    return growth, runs


def growth_table(engine: str, runs: dict[int, dict[str, Any]]) -> None:
    """How the figures grow with size, each against the smallest size's."""
    base_size = min(runs)
    base = runs[base_size]
    print(f"\n  growth with size ({engine}, against {base_size:,} conversations)")
    print("    conversations   ms/conv   x    peak RSS MiB   x    B/conversation   B/event   database MiB")
    for size in sorted(runs):
        run = runs[size]
        db = DatabaseSize.from_json(run["size"])
        conv, events = db.rows["messenger_conversations"], db.rows["contact_interaction_events"]
        per_conv = 1000 * run["seconds"] / size
        base_per_conv = 1000 * base["seconds"] / base_size
        print(
            f"    {size:>13,}   {per_conv:7.3f} {per_conv / base_per_conv:4.2f}   "
            f"{run['rss_kib'] / 1024:12.1f} {run['rss_kib'] / base['rss_kib']:4.2f}   "
            f"{db.bytes['messenger_conversations'] / max(conv, 1):14,.0f}   "
            f"{db.bytes['contact_interaction_events'] / max(events, 1):7,.0f}   "
            f"{db.total_bytes / 2**20:12,.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10_000, help="size of the speed run")
    parser.add_argument("--messages", type=int, default=3, help="messages per conversation (max 20)")
    parser.add_argument("--repeat", type=int, default=3, help="speed runs per engine (median)")
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument(
        "--pg-url", default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--latency-ms", type=float, default=0, help="stand-in latency per Graph request")
    parser.add_argument("--rss-sizes", default="5000,50000", help="sizes to compare; empty to skip")
    parser.add_argument(
        "--rss-engine",
        default="sqlite",
        help="engine(s) of the memory runs: sqlite, postgres or sqlite,postgres",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="multiply --conversations and --rss-sizes by this (10: ten times)",
    )
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--graph-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.rss_child:
        asyncio.run(rss_child(args))
        return
    rss_engines = [e.strip() for e in args.rss_engine.split(",") if e.strip()]
    if any(e not in ("sqlite", "postgres") for e in [*args.engines, *rss_engines]):
        parser.error("engines are sqlite and postgres")
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    args.conversations *= args.scale
    args.rss_sizes = [int(s) * args.scale for s in args.rss_sizes.split(",") if s.strip()]
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; Graph stand-in over loopback HTTP "
        f"(uvicorn); scale {args.scale}x; load {load()}"
    )
    if not args.skip_speed:
        asyncio.run(speed(args))
    if len(args.rss_sizes) >= 2:
        for engine in rss_engines:
            _, runs = memory(args, engine)
            growth_table(engine, runs)


if __name__ == "__main__":
    main()
