"""Sync benchmark: the SPEC's two sync targets, against the Graph stand-in over loopback HTTP.

    python bench/sync.py                                  # both engines, the defaults below
    python bench/sync.py --conversations 20000 --repeat 3 --engines sqlite,postgres
    python bench/sync.py --rss-sizes 5000,50000 --rss-engine sqlite

(a) Speed: the time of a full sync (fresh database) over the time of just walking the same pages
    with GraphClient (no writes), measured alternately in the same run; target <= 1.3x.
(b) Memory: peak RSS (ru_maxrss) of a full sync at each size, each in its own subprocess;
    target: the largest within 10% of the smallest.

The stand-in (bench/graph_standin.py) runs in a uvicorn subprocess on 127.0.0.1, one per size.
PostgreSQL runs in a fresh schema of --pg-url, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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
            for _ in range(args.repeat):
                seconds, seen = await fetch_only(graph_url)
                fetches.append(seconds)
                async with fresh_database(engine, args.pg_url) as url:
                    seconds, synced = await full_sync(graph_url, url)
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
    return ratios


async def rss_child(args: argparse.Namespace) -> None:
    """In a subprocess: one full sync, then print the peak RSS in KiB."""
    async with fresh_database(args.rss_engine, args.pg_url) as url:
        _, synced = await full_sync(args.graph_url, url)
    assert synced == args.conversations, synced
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory(args: argparse.Namespace) -> float:
    sizes = args.rss_sizes
    print(f"\n(b) peak RSS of a full sync ({args.rss_engine}), each size in its own process")
    peaks = {}
    for size in sizes:
        with standin(size, args.messages, 0) as graph_url:
            cmd = [
                sys.executable, __file__, "--rss-child", "--conversations", str(size), "--messages",
                str(args.messages), "--graph-url", graph_url, "--rss-engine", args.rss_engine,
                "--pg-url", args.pg_url,
            ]  # fmt: skip
            started = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            peaks[size] = int(out.split()[-1]) / 1024
            took = time.perf_counter() - started
            print(f"  {size:>7,} conversations: peak RSS {peaks[size]:6.1f} MiB ({took:.1f} s)")
    small, large = peaks[min(sizes)], peaks[max(sizes)]
    growth = large / small - 1
    print(
        f"  {max(sizes):,} vs {min(sizes):,}: {large / small:.3f}x ({growth:+.1%}) "
        f"[{'ok' if growth <= 0.10 else 'OVER'} target +10%]"
    )
    return growth


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
    parser.add_argument("--rss-engine", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--graph-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    if args.rss_child:
        asyncio.run(rss_child(args))
        return
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; Graph stand-in over loopback HTTP (uvicorn)"
    )
    if not args.skip_speed:
        asyncio.run(speed(args))
    if len(args.rss_sizes) >= 2:
        memory(args)


if __name__ == "__main__":
    main()
