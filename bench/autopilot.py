"""Autopilot benchmark: pages backfilled by the scheduler alone, within the stand-in's rate limits.

    python bench/autopilot.py                                  # quick: 20 pages x 200 conversations
    python bench/autopilot.py --scale 10                       # the quick run x10: 20 pages x 2,000
    python bench/autopilot.py --pages 200 --conversations 500 --processes 1,2 --concurrency 24
    python bench/autopilot.py --pages 200 --conversations 500 --scale 10 --processes 1,2   # 200 x 5,000
    python bench/autopilot.py --pages 2000 --conversations 500 --processes 1,2             # 2,000 x 500
    python bench/autopilot.py --pages 200 --conversations 500 --page-size 25    # 4x the calls, 1/4 the writes

The Graph stand-in (bench/standin_limits.py: 2 calls a second per page, 40 for the app, code 4 /
80006 beyond) runs in a uvicorn subprocess. Pages are registered in a fresh PostgreSQL schema
(or SQLite file), then N worker processes each run the background work of `python app.py worker`
(core.services.running_services with worker=True and no HTTP API: Scheduler + SyncEngine +
GraphClient over PooledTransport, one rate-limit pool in the database, housekeeping, and the
webhook applier, idle here) until every page has completed a sync. They run it in the bench's
own process rather than as `python app.py worker`, so that each can stop when every page is done
and print its counts; the settings are the service's defaults but SYNC_CONCURRENCY and
SYNC_PAGE_SIZE (the flags), GRAPH_PAGE_CALLS_PER_SECOND=2 and SYNC_INTERVAL_SECONDS=3600 (no
second sync within the run).

Printed per run: Graph calls per second over the binding limit (the app's 40; SPEC target >= 0.9,
whole run and sustained, i.e. the middle of the run without ramp-up and the last pages' tail), the
rate-limit errors provoked (target 0), the most calls one page got in any second, and the time to
complete every page against the ideal (total calls / 40 per second). Then the scale figures: time
per conversation and per Graph call, each worker's peak RSS (VmHWM), and the conversation and
event tables' rows and bytes. `--scale N` multiplies `--conversations` by N (the conversations of
every page); `--pages` grows the other way (more pages, each as deep).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.standin_limits import STATS_PATH, bench_page_ids  # noqa: E402
from bench.sync import (  # noqa: E402
    SIZED_TABLES,
    DatabaseSize,
    database_size,
    free_port,
    fresh_database,
    load,
    peak_rss_kib,
    serve_process,
)
from core.metrics import Metrics  # noqa: E402
from core.services import running_services  # noqa: E402
from core.settings import Settings  # noqa: E402
from storage import Storage, open_storage  # noqa: E402
from storage.sql import SQLStorage  # noqa: E402

APP_LIMIT = 40
PAGE_LIMIT = 2
USER = "bench"


async def open_store(url: str) -> Storage:
    storage = await open_storage(url)
    await storage.migrate()
    return storage


@contextmanager
def standin(conversations: int, messages: int) -> Iterator[str]:
    """The limited stand-in in a uvicorn subprocess; yields its GRAPH_API_URL."""
    port = free_port()
    cmd = [
        sys.executable, str(ROOT / "bench" / "standin_limits.py"), "--port", str(port),
        "--conversations", str(conversations), "--messages", str(messages),
        "--page-calls-per-second", str(PAGE_LIMIT),
        "--app-calls-per-second", str(APP_LIMIT),
    ]  # fmt: skip
    with serve_process(cmd, port, stdout=subprocess.DEVNULL) as url:
        yield url


def worker_settings(database_url: str, graph_url: str, concurrency: int, page_size: int) -> Settings:
    """What a worker runs with: the service's defaults, but no second sync within the run."""
    return Settings(
        database_url=database_url,
        graph_api_url=graph_url,
        sync_concurrency=concurrency,
        sync_page_size=page_size,
        sync_interval_seconds=3600,
        graph_page_calls_per_second=PAGE_LIMIT,
    )


async def completed(storage: Storage) -> int:
    async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
        row = await conn.fetchrow("SELECT count(*) AS n FROM sync_state WHERE completed_syncs >= 1")
    return int(row["n"]) if row is not None else 0


async def worker(args: argparse.Namespace) -> None:
    """One process of background work, until every page has completed; prints its counts as JSON."""
    logging.basicConfig(level=logging.WARNING)
    settings = worker_settings(args.database_url, args.graph_url, args.concurrency, args.page_size)
    store_calls = [0]
    update = SQLStorage.update_rate_pool

    async def counted(self: SQLStorage, keys: Any, decide: Any) -> Any:
        store_calls[0] += 1
        return await update(self, keys, decide)

    SQLStorage.update_rate_pool = counted  # type: ignore[method-assign,assignment]
    metrics = Metrics()
    # What `python app.py worker` runs (core.cli.run_worker), until every page is done.
    async with running_services(settings, metrics=metrics, http_api=False, worker=True) as services:
        # Other processes complete pages too: only the database knows when all are done.
        while await completed(services.storage) < args.pages:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    counts: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if family.name in ("autopilot_syncs", "graph_pool_calls") and sample.name.endswith("_total"):
                counts[sample.labels["outcome"]] = sample.value
            elif family.name == "graph_pool_wait_seconds" and sample.name.endswith(("_count", "_sum")):
                kind = "waits" if sample.name.endswith("_count") else "wait_s"
                counts[f"{sample.labels['reason']} {kind}"] = round(sample.value, 1)
    counts["pool transactions"] = store_calls[0]
    counts["peak RSS MiB"] = round(peak_rss_kib(os.getpid()) / 1024, 1)
    print(json.dumps(counts), flush=True)


async def run(args: argparse.Namespace, graph_url: str, processes: int) -> dict[str, Any]:
    async with fresh_database(args.engine, args.pg_url) as url:
        storage = await open_store(url)
        try:
            for fb in bench_page_ids(args.pages):
                await storage.register_page(USER, fb, f"EAAB-bench-{fb}", f"Bench {fb}")
        finally:
            await storage.close()
        cmd = [
            sys.executable, __file__, "--worker", "--database-url", url, "--graph-url", graph_url,
            "--concurrency", str(args.concurrency), "--pages", str(args.pages),
            "--page-size", str(args.page_size),
        ]  # fmt: skip
        started = time.perf_counter()
        procs = [
            await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
            for _ in range(processes)
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), args.timeout)
        wall = time.perf_counter() - started
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a worker failed: {[p.returncode for p in procs]}")
        async with httpx.AsyncClient() as http:
            after = (await http.get(graph_url.rsplit("/", 1)[0] + STATS_PATH)).json()
        size = await database_size(url)
    workers = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    return {"stats": after, "wall": wall, "workers": workers, "size": size, "load": load()}


def report(args: argparse.Namespace, processes: int, result: dict[str, Any]) -> None:
    after = result["stats"]  # a fresh stand-in per run: it saw this run only
    calls, refused, per_second = after["calls"], after["refused_total"], after["per_second"]
    span = after["last"] - after["first"]
    rate = calls / span if span > 0 else 0.0
    busy = [n for n in per_second if n > 0]
    middle = busy[len(busy) // 5 : len(busy) - len(busy) // 5] or busy
    sustained = statistics.mean(middle) if middle else 0.0
    median = statistics.median(busy) if busy else 0.0
    ideal = calls / APP_LIMIT
    print(
        f"  {processes} process(es) x SYNC_CONCURRENCY={args.concurrency}, SYNC_PAGE_SIZE={args.page_size}: "
        f"{calls} Graph calls in {span:.1f} s\n"
        f"    calls/s {rate:5.1f} = {rate / APP_LIMIT:.2f}x the app's {APP_LIMIT}/s (whole run); "
        f"sustained {sustained:5.1f} = {sustained / APP_LIMIT:.2f}x "
        f"[{'ok' if sustained / APP_LIMIT >= 0.9 else 'UNDER'} target 0.9x]; "
        f"median second {median:.0f} = {median / APP_LIMIT:.2f}x\n"
        f"    rate-limit errors provoked: {refused} [{'ok' if refused == 0 else 'OVER'} target 0]; "
        f"most calls of one page in any second: {after['max_page_calls_in_window']} (limit {PAGE_LIMIT}); "
        f"most requests of one page at once: {after['max_in_flight']}\n"
        f"    every page complete in {result['wall']:.1f} s (workers' start included) vs ideal {ideal:.1f} s "
        f"= {result['wall'] / ideal:.2f}x; Graph span {span / ideal:.2f}x\n"
        f"    per-second calls: {' '.join(str(n) for n in per_second)}"
    )
    for i, counts in enumerate(result["workers"]):
        shown = ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items()) if v)
        print(f"    worker {i + 1}: {shown}")
    size: DatabaseSize = result["size"]
    conversations = args.pages * args.conversations
    stored = size.rows["messenger_conversations"]
    peaks = ", ".join(f"{counts.get('peak RSS MiB', 0):.1f}" for counts in result["workers"])
    print(
        f"    scale: {conversations:,} conversations ({stored:,} stored) in {result['wall']:.1f} s = "
        f"{1000 * result['wall'] / conversations:.3f} ms/conversation, "
        f"{1000 * result['wall'] / max(calls, 1):.1f} ms/Graph call; worker peak RSS {peaks} MiB; "
        f"load {result['load']}\n"
        f"    tables: {size.describe(SIZED_TABLES[1:])}"
    )
    if stored != conversations:
        print(f"    WARNING: {conversations:,} conversations served but {stored:,} stored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--conversations", type=int, default=200, help="conversations of every page")
    parser.add_argument("--processes", default="1", help="comma-separated worker counts to run, e.g. 1,2")
    parser.add_argument("--concurrency", type=int, default=24, help="SYNC_CONCURRENCY of each worker")
    parser.add_argument("--page-size", type=int, default=100, help="SYNC_PAGE_SIZE (conversations per call)")
    parser.add_argument("--messages", type=int, default=3, help="messages per conversation (max 20)")
    parser.add_argument("--engine", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument(
        "--pg-url", default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply --conversations by this (10: ten times)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--graph-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(args))
        return
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    args.conversations *= args.scale
    counts = [int(n) for n in args.processes.split(",") if n.strip()]
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.pages} pages x {args.conversations} "
        f"conversations; stand-in limits {PAGE_LIMIT}/s per page, {APP_LIMIT}/s for the app; {args.engine}; "
        f"scale {args.scale}x; load {load()}"
    )
    for processes in counts:
        with standin(args.conversations, args.messages) as graph_url:
            result = asyncio.run(run(args, graph_url, processes))
        report(args, processes, result)


if __name__ == "__main__":
    main()
