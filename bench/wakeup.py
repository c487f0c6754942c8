"""Wake-up latency across replicas: a webhook received by replica A, seen by an SSE client on replica B.

    python bench/wakeup.py                            # 300 messages at 20/s, LISTEN on, then polling
    python bench/wakeup.py --messages 600 --rate 40 --modes listen,poll
    python bench/wakeup.py --repeat 3                 # listen, poll, listen, poll, ...: pooled figures

Two replicas of the service (`python app.py serve`, each with its scheduler and applier) share one
PostgreSQL database, created fresh for each mode on --pg-url's server and dropped afterwards (a
database of its own: NOTIFY is per database, so nothing else on the server wakes the replicas). An SSE
client is connected to each replica (`GET /api/events/stream`); signed one-message webhooks are POSTed
to replica A at --rate per second, each as its own request on schedule. For every message the bench
notes when it was sent, when A answered 200, and when its event (by `messageId`) arrived on each
stream, all on this process' monotonic clock. It prints p50/p95/p99/max of the arrival after A's 200
(and after the send):

* B (other replica): the cross-replica path. With LISTEN (`DATABASE_DIRECT_URL` set on both) A's inbox
  commit NOTIFYs, some replica's applier writes the event and NOTIFYs, and B's stream wakes at once;
  without it B finds the event by polling (the stream every 0.5 s, the applier every 0.25 s).
* A (same replica): the replica that took the webhook, for reference: its own applier is woken in
  process and its stream too when that applier wrote the event (with LISTEN, B's applier takes
  part of the rows, and A's stream then hears of them by NOTIFY; --api-only-b runs B without
  background work, as compose.yaml's API replicas run, so that only A applies).

The `poll` mode is the baseline measured in the same run; the ratio is poll / listen. With --repeat N
the modes alternate N times (fresh database and replicas each time) and the figures pool every run, so
the machine's drift hits both modes alike. Warm-up messages (--warmup) are sent first and not counted.
Each mode also reports the CPU the replicas' processes used per message (what the wake-ups cost). The
Graph stand-in (bench/graph_standin.py) answers the page's token check at registration (it serves no
conversations: nothing but webhooks writes events). Exits 1 if an event never reached a stream or a
webhook was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import msgspec  # noqa: E402

from bench.sync import free_port, serve_process  # noqa: E402
from webhook.signature import sign  # noqa: E402

SECRET = "bench-app-secret"
API_KEY = "bench-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PAGE = "104325188712345"
CONTACTS = 20  # distinct PSIDs the messages come from
MODES = {"listen": "LISTEN on (DATABASE_DIRECT_URL set)", "poll": "polling (no DATABASE_DIRECT_URL)"}


# ---- the database and the replicas ------------------------------------------------------------


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new, empty database on admin_url's server (its URL), dropped afterwards."""
    name = f"bench_wakeup_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    try:
        yield _with_database(admin_url, name)
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


@dataclass
class Replica:
    """One `python app.py serve` process, in a session of its own."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


def start_replica(name: str, env: dict[str, str], work: Path) -> Replica:
    port = free_port()
    log = work / f"replica-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Replica(name, port, proc, log)


def wait_ready(replica: Replica, seconds: float = 60) -> None:
    """Wait until the replica's /readyz answers 200."""
    deadline = time.monotonic() + seconds
    while True:
        if replica.proc.poll() is not None:
            raise RuntimeError(f"replica {replica.name} exited:\n{replica.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{replica.url}/readyz", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {replica.name} did not start:\n{replica.log_tail()}")
        time.sleep(0.05)


def stop_replica(replica: Replica) -> None:
    """SIGTERM (streams end within the graceful timeout), then SIGKILL if it lingers."""
    if replica.proc.poll() is None:
        os.killpg(replica.proc.pid, signal.SIGTERM)
        try:
            replica.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(replica.proc.pid, signal.SIGKILL)
            replica.proc.wait(timeout=10)


@contextlib.contextmanager
def replicas(
    database_url: str, graph_url: str, listen: bool, work: Path, b_background: bool = True
) -> Iterator[list[Replica]]:
    """Replicas A and B on one database (started together: migrations take an advisory lock)."""
    env = {
        "DATABASE_URL": database_url,
        "GRAPH_API_URL": graph_url,
        "FB_APP_SECRET": SECRET,
        "FB_VERIFY_TOKEN": "bench",
        "API_KEYS": f"bench:{API_KEY}",
    }
    if listen:
        env["DATABASE_DIRECT_URL"] = database_url
    started: list[Replica] = []
    try:
        started.append(start_replica("A", env, work))
        started.append(start_replica("B", {**env, "BACKGROUND_WORK": "on" if b_background else "off"}, work))
        for replica in started:
            wait_ready(replica)
        yield started
    finally:
        for replica in started:
            stop_replica(replica)


# ---- one measurement ---------------------------------------------------------------------------


@dataclass
class Run:
    """What one mode measured: per message, when it was sent and acked, and when each stream saw it."""

    sent: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, dict[str, float]] = field(default_factory=lambda: {"A": {}, "B": {}})
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every arrival


def webhook(mid: str, n: int) -> bytes:
    sender = str(7_700_000_000_000_000 + n % CONTACTS)
    ts = 1_764_000_000_000 + n
    item = {
        "sender": {"id": sender},
        "recipient": {"id": PAGE},
        "timestamp": ts,
        "message": {"mid": mid, "text": f"wake-up {n}"},
    }
    return msgspec.json.encode({"object": "page", "entry": [{"id": PAGE, "time": ts, "messaging": [item]}]})


async def read_stream(
    http: httpx.AsyncClient, page_id: str, run: Run, name: str, ready: asyncio.Event
) -> None:
    """Note when each event's messageId arrives on the replica's stream (until cancelled)."""
    params = {"pageId": page_id}
    async with http.stream("GET", "/api/events/stream", params=params, headers=AUTH) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("retry:"):  # the first message: the stream's start id is fixed
                ready.set()
            elif line.startswith("data: "):
                now = time.monotonic()
                mid = json.loads(line[6:]).get("messageId")
                if mid is not None:
                    run.arrived[name].setdefault(mid, now)
                    run.changed.set()


async def post(http: httpx.AsyncClient, mid: str, body: bytes, run: Run) -> None:
    headers = {"X-Hub-Signature-256": sign(SECRET.encode(), body), "Content-Type": "application/json"}
    run.sent[mid] = time.monotonic()
    try:
        response = await http.post("/api/webhook", content=body, headers=headers)
    except httpx.HTTPError as exc:
        run.errors.append(f"{mid}: {exc!r}")
        return
    if response.status_code == 200:
        run.acked[mid] = time.monotonic()
    else:
        run.errors.append(f"{mid}: {response.status_code} {response.text[:200]}")


async def measure(a: Replica, b: Replica, args: argparse.Namespace, tag: str) -> tuple[Run, set[str]]:
    """Stream from both replicas, post to A; returns the run and the mids that are counted."""
    timeout = httpx.Timeout(30.0, connect=5.0, read=None)
    run = Run()
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=timeout) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=timeout) as on_b,
        httpx.AsyncClient(base_url=a.url, timeout=timeout) as sender,
    ):
        created = await sender.post(
            "/api/pages", json={"facebookPageId": PAGE, "accessToken": "EAAB-b"}, headers=AUTH
        )
        created.raise_for_status()
        page_id = created.json()["pageId"]
        ready = {name: asyncio.Event() for name in ("A", "B")}
        readers = [
            asyncio.create_task(read_stream(client, page_id, run, name, ready[name]))
            for name, client in (("A", on_a), ("B", on_b))
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready.values())), 10)
            total = args.warmup + args.messages
            mids = [f"m_wake_{tag}_{n:06d}" for n in range(total)]
            posts = []
            start = time.monotonic() + 0.1
            for n, mid in enumerate(mids):
                await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
                posts.append(asyncio.create_task(post(sender, mid, webhook(mid, n), run)))
            await asyncio.gather(*posts)
            counted = set(mids[args.warmup :])
            deadline = time.monotonic() + args.settle
            while any(not counted <= arrived.keys() for arrived in run.arrived.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                run.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.changed.wait(), left)
        finally:
            for reader in readers:
                reader.cancel()
            for result in await asyncio.gather(*readers, return_exceptions=True):
                if isinstance(result, Exception):
                    run.errors.append(f"stream: {result!r}")
    return run, counted


# ---- figures -----------------------------------------------------------------------------------


@dataclass
class Summary:
    n: int
    p50: float
    p95: float
    p99: float
    max: float

    def line(self) -> str:
        return f"p50 {self.p50:7.1f}  p95 {self.p95:7.1f}  p99 {self.p99:7.1f}  max {self.max:7.1f} ms"


def summarize(latencies_s: list[float]) -> Summary | None:
    if len(latencies_s) < 2:
        return None
    ms = [x * 1000 for x in latencies_s]
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return Summary(len(ms), q[49], q[94], q[98], max(ms))


STREAMS = (("B", "B (other replica)"), ("A", "A (same replica) "))


@dataclass
class Tally:
    """One mode's measurements, over every repeat."""

    acks: list[float] = field(default_factory=list)
    after_ack: dict[str, list[float]] = field(default_factory=lambda: {"A": [], "B": []})
    after_send: dict[str, list[float]] = field(default_factory=lambda: {"A": [], "B": []})
    delivered: dict[str, int] = field(default_factory=lambda: {"A": 0, "B": 0})
    expected: int = 0
    cpu_ms: dict[str, float] = field(default_factory=lambda: {"A": 0.0, "B": 0.0})
    errors: list[str] = field(default_factory=list)

    def add(self, run: Run, counted: set[str], cpu_s: dict[str, float]) -> None:
        mids = sorted(counted)
        self.acks += [run.acked[m] - run.sent[m] for m in mids if m in run.acked]
        for stream, _ in STREAMS:
            arrived = run.arrived[stream]
            self.after_ack[stream] += [
                arrived[m] - run.acked[m] for m in mids if m in arrived and m in run.acked
            ]
            self.after_send[stream] += [arrived[m] - run.sent[m] for m in mids if m in arrived]
            self.delivered[stream] += len(counted & arrived.keys())
            self.cpu_ms[stream] += cpu_s[stream] * 1000
        self.expected += len(counted)
        self.errors += run.errors

    def report(self, mode: str) -> dict[str, Summary | None]:
        print(f"\n{MODES[mode]}")
        acks = summarize(self.acks)
        print(f"  webhook ack (send -> A's 200)      {acks.line() if acks else '-'}")
        found: dict[str, Summary | None] = {}
        for stream, label in STREAMS:
            after_ack, after_send = summarize(self.after_ack[stream]), summarize(self.after_send[stream])
            found[stream] = after_ack
            print(f"  {label}  after A's 200   {after_ack.line() if after_ack else '-'}")
            print(f"  {' ' * 17}  after the send  {after_send.line() if after_send else '-'}")
            print(
                f"  {' ' * 17}  delivered {self.delivered[stream]}/{self.expected}; replica CPU "
                f"{self.cpu_ms[stream] / max(1, self.expected):.1f} ms per message"
            )
        for error in self.errors[:5]:
            print(f"  error: {error}")
        if len(self.errors) > 5:
            print(f"  ... {len(self.errors) - 5} more errors")
        return found


def cpu_seconds(replica: Replica) -> float:
    """User + system CPU the replica's process has used (Linux /proc)."""
    with open(f"/proc/{replica.proc.pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_mode(mode: str, args: argparse.Namespace, graph_url: str, work: Path, tally: Tally) -> None:
    async with fresh_database(args.pg_url) as database_url:
        with replicas(database_url, graph_url, mode == "listen", work, not args.api_only_b) as (a, b):
            cpu = {"A": cpu_seconds(a), "B": cpu_seconds(b)}
            run, counted = await measure(a, b, args, f"{mode}_{uuid.uuid4().hex[:6]}")
            used = {"A": cpu_seconds(a) - cpu["A"], "B": cpu_seconds(b) - cpu["B"]}
    tally.add(run, counted, used)
    cross = summarize(
        [run.arrived["B"][m] - run.acked[m] for m in counted if m in run.arrived["B"] and m in run.acked]
    )
    print(f"  [{mode}] B after A's 200: {cross.line() if cross else '-'}", flush=True)


async def main_async(args: argparse.Namespace) -> int:
    tallies = {mode: Tally() for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="bench-wakeup-") as tmp:
        port = free_port()
        command = [
            sys.executable, str(ROOT / "bench" / "graph_standin.py"), "--port", str(port),
            "--page-id", PAGE, "--conversations", "0",
        ]  # fmt: skip
        with serve_process(command, port, stdout=subprocess.DEVNULL) as graph_url:
            for _ in range(args.repeat):  # modes alternate, so that the machine's drift hits both
                for mode in args.modes:
                    await bench_mode(mode, args, graph_url, Path(tmp), tallies[mode])
    results = {mode: tally.report(mode) for mode, tally in tallies.items()}
    listen, poll = results.get("listen"), results.get("poll")
    if listen and poll:
        print("\nratio polling / LISTEN (after A's 200)")
        for stream, label in STREAMS:
            on, off = listen[stream], poll[stream]
            if on and off:
                print(
                    f"  {label}  p50 {off.p50 / on.p50:6.1f}x   p95 {off.p95 / on.p95:6.1f}x   "
                    f"p99 {off.p99 / on.p99:6.1f}x   max {off.max / on.max:6.1f}x"
                )
    lost = any(t.delivered[s] < t.expected for t in tallies.values() for s, _ in STREAMS)
    return 1 if lost or any(t.errors for t in tallies.values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/wakeup.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--messages", type=int, default=300, help="messages counted per run of a mode (default: %(default)s)"
    )
    parser.add_argument(
        "--rate", type=float, default=20.0, help="webhooks per second to replica A (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="messages sent first, not counted (default: %(default)s)"
    )
    parser.add_argument(
        "--api-only-b",
        action="store_true",
        help="run B with BACKGROUND_WORK=off (an API-only replica: A's applier writes every event)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each mode, alternating (default: %(default)s)"
    )
    parser.add_argument(
        "--modes",
        default="listen,poll",
        help="comma-separated, in order: listen, poll (default: %(default)s)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait for the last events to arrive (default: %(default)s)",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server (any database on it) where the bench may create and drop databases "
        "(default: $BENCH_DATABASE_URL or %(default)s)",
    )
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown}; use listen and/or poll")
    if args.messages < 2 or args.rate <= 0 or args.repeat < 1:
        parser.error("--messages must be at least 2, --rate above 0 and --repeat at least 1")
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; two replicas on PostgreSQL "
        f"({urlsplit(args.pg_url).netloc}); {args.messages} messages at {args.rate:g}/s "
        f"(+{args.warmup} warm-up) per mode"
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
