"""Crash test, long mode (issue 11, item 1): kill -9 the service at random moments, many times.

    python bench/crash.py --kills 20 --engines sqlite,postgres --seed 7
    python bench/crash.py --kills 20 --topologies single,split        # both deployments on each engine
    python bench/crash.py --kills 5 --pages 4 --conversations 300     # a quick look

The machinery is tests/helpers/crash.py (the short mode, tests/proof/test_crash.py, runs the same
code with 3 kills): the Graph stand-in and the service as real processes, the scheduler backfilling
a page set by itself while signed webhooks arrive, `kill -9` at moments drawn from the seed, a
restart on the same database, and after every kill the invariants (SQLite integrity, every
acknowledged webhook in the inbox and, once applied, in its tables, no duplicate events, no
conversation without events, no sync position going backwards, locks taken over only after their
lease expired). Prints a line per kill and a summary per run; exits 1 if any invariant was
violated (each violation printed, with the seed that replays the run).

Topologies: `single` is `python app.py serve` doing everything; `split` is `python app.py serve`
with BACKGROUND_WORK=off plus `python app.py worker`, each kill hitting the API, the worker or
both. `auto` (the default) runs SQLite single and PostgreSQL split, as the short mode does.
PostgreSQL runs in a fresh schema of --pg-url, dropped afterwards; SQLite in a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# tests.helpers imports starlette's TestClient, which nudges toward httpx2 (pytest ignores it too).
warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")

from bench.sync import fresh_database  # noqa: E402
from tests.helpers.crash import CrashConfig, CrashReport, run_crash  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/crash.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=20, help="kills per run (default 20)")
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--topologies", default="auto", help="single, split, both as single,split, or auto")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=800, help="of the first page (+7 each next)")
    parser.add_argument("--page-size", type=int, default=10, help="SYNC_PAGE_SIZE")
    parser.add_argument("--calls-per-second", type=float, default=3.0, help="GRAPH_PAGE_CALLS_PER_SECOND")
    parser.add_argument(
        "--interval", type=float, default=5.0, help="SYNC_INTERVAL_SECONDS (incremental runs)"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="webhook bodies per second")
    parser.add_argument("--kill-after", default="1.0,3.0", help="seconds after a restart, min,max")
    parser.add_argument(
        "--pg-url", default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    return parser.parse_args(argv)


def runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.topologies == "auto":
        return [(e, "single" if e == "sqlite" else "split") for e in engines]
    topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    return [(e, t) for e in engines for t in topologies]


async def one(args: argparse.Namespace, seed: int, engine: str, topology: str, logs: Path) -> CrashReport:
    low, high = (float(x) for x in args.kill_after.split(","))
    async with fresh_database(engine, args.pg_url) as url:
        config = CrashConfig(
            database_url=url,
            engine=engine,
            workdir=logs / f"{engine}-{topology}",
            seed=seed,
            kills=args.kills,
            topology=topology,
            pages=args.pages,
            conversations=args.conversations,
            page_size=args.page_size,
            page_calls_per_second=args.calls_per_second,
            interval_seconds=args.interval,
            webhook_rate=args.rate,
            kill_after=(low, high),
            finish_bound_seconds=600,
        )
        return await run_crash(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; CRASH_SEED={seed} (--seed {seed} replays)"
    )
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp:
        logs = args.logs or Path(tmp)
        for engine, topology in runs(args):
            reports.append(asyncio.run(one(args, seed, engine, topology, logs)))
    print(f"\nsummary (seed {seed}):")
    for report in reports:
        print("  " + report.summary())
    violations = [v for r in reports for v in r.violations]
    for line in violations:
        print(f"VIOLATION {line}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
