"""Webhook intake benchmark: the service against a bare Starlette endpoint, same run, same machine.

    python bench/webhook.py                       # SQLite and PostgreSQL, 10 s each, 32 connections
    python bench/webhook.py --duration 8          # the README's run
    python bench/webhook.py --duration 8 --scale 10   # ten times the bodies: 80 s of load
    python bench/webhook.py --engines sqlite --duration 5 --profile /tmp/prof

For each engine: a fresh database, the service under uvicorn (one worker, 127.0.0.1) with
GRAPH_API_URL pointed at the Graph stand-in (``bench/graph_standin.py``, which knows the bench
page's token), a page registered through the API (its token verified with the stand-in's ``/me``,
and a claim of another page with it checked to be refused), then wrk (``bench/webhook.lua``)
POSTs pre-signed bodies with distinct message ids for ``--duration`` seconds at ``--connections``
connections. The ack rate and latency come from wrk; the end-to-end rate is inbox rows applied /
(time from the first request, the first inbox row's ``received_at``, until no inbox row is
pending). Then a normal load (300 webhooks at 100/s) reports the apply lag. The bare endpoint
(``bench/bare_app.py``: verify + decode + 200) runs the same wrk load in the same run.
SPEC targets: ack >= 0.8x bare with p99 < 50 ms; end-to-end >= 0.5x; lag under 1 s.

After each engine's load, a scale line: the time per webhook (acknowledged: 1 / ack rate; end to
end: the drain time per applied event), the service process's RSS (after start-up, peak (VmHWM)
and at the end), and the inbox (``webhook_events``), event and conversation tables' rows and bytes
(bytes per row; SQLite: dbstat, PostgreSQL: pg_total_relation_size). ``--scale N`` multiplies
``--duration`` (and so the default body count) by N; the bodies spread over 1000 contacts, so the
conversation table stays at 1000 rows while the inbox and the events grow. A series sampled from
/metrics shows acks and applied rows per second over the run. While a burst saturates the intake,
the applier steps aside for at most 30 s (settings.applier_max_yield_seconds), then applies
alongside it: an 80 s burst (``--scale 10``) is acked partly with the applier running, an 8 s one
without it. The drain rate (rows applied per second once the load stopped) is the applier's speed
alone.

``--profile DIR`` records the service with py-spy during the load (``pip install py-spy``)
and prints the hottest functions. Needs ``wrk`` (``apt-get install -y wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sync import SIZED_TABLES, DatabaseSize, database_size, load, mib, peak_rss_kib  # noqa: E402
from routes.limits import SERVER_FLAGS  # noqa: E402
from storage import open_storage  # noqa: E402
from webhook.signature import sign  # noqa: E402

SECRET = "bench-app-secret"
API_KEY = "bench-key-0123456789"
PAGE = "104325188712345"
PAGE_TOKEN = "EAAB-bench-page-token"  # the only token the stand-in accepts (--tokens)
OTHER_PAGE = "104325188799999"
CONTACTS = 1000  # distinct PSIDs the events spread over
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1/test")
LUA = Path(__file__).resolve().parent / "webhook.lua"


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors
    wrapped: int  # a thread ran out of distinct bodies and started over
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_bodies(path: Path, count: int, tag: str) -> None:
    """`count` signed one-message bodies with distinct mids, one per line: sig TAB body."""
    encode = msgspec.json.encode
    secret = SECRET.encode()
    base_ts = 1_750_000_000_000
    with path.open("wb") as out:
        for i in range(count):
            sender = str(7_700_000_000_000_000 + i % CONTACTS)
            ts = base_ts + i
            body = encode(
                {
                    "object": "page",
                    "entry": [
                        {
                            "id": PAGE,
                            "time": ts,
                            "messaging": [
                                {
                                    "sender": {"id": sender},
                                    "recipient": {"id": PAGE},
                                    "timestamp": ts,
                                    "message": {"mid": f"m_{tag}_{i:09d}", "text": f"benchmark message {i}"},
                                }
                            ],
                        }
                    ],
                }
            )
            out.write(sign(secret, body).encode() + b"\t" + body + b"\n")


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Wait (at most 30 s) until `proc` accepts connections on `port`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


@contextlib.contextmanager
def graph_standin() -> Iterator[str]:
    """The Graph stand-in, serving the bench page and accepting only PAGE_TOKEN: its GRAPH_API_URL."""
    port = free_port()
    command = [
        sys.executable, str(ROOT / "bench" / "graph_standin.py"), "--port", str(port),
        "--page-id", PAGE, "--tokens", PAGE_TOKEN, "--conversations", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_listening(proc, port, "the Graph stand-in")
        yield f"http://127.0.0.1:{port}/v25.0"
    finally:
        stop(proc)


def register_page(port: int) -> None:
    """Register the bench page through the API: the service verifies PAGE_TOKEN with the stand-in."""
    url, headers = f"http://127.0.0.1:{port}/api/pages", {"Authorization": f"Bearer {API_KEY}"}
    created = httpx.post(url, json={"facebookPageId": PAGE, "accessToken": PAGE_TOKEN}, headers=headers)
    created.raise_for_status()
    # Proof that the registration went through /me, not around it: the token cannot claim another page.
    claim = httpx.post(url, json={"facebookPageId": OTHER_PAGE, "accessToken": PAGE_TOKEN}, headers=headers)
    if claim.status_code != 403:
        raise RuntimeError(f"a claim of another page answered {claim.status_code}, not 403: {claim.text}")


# The HTTP implementation's flags (--http): the production command line's by default.
UVICORN_FLAGS: list[str] = list(SERVER_FLAGS)


def start_uvicorn(target: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
            "--no-access-log",
            *UVICORN_FLAGS,
        ],
        cwd=ROOT,
        env={**os.environ, **env},
    )
    wait_listening(proc, port, target)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(port: int, bodies: Path, duration: int, connections: int, threads: int) -> WrkResult:
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{port}/api/webhook",
        ],
        env={**os.environ, "WEBHOOK_BODIES": str(bodies), "WEBHOOK_THREADS": str(threads)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return WrkResult(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        requests=int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
        errors=errors,
        wrapped=int(re.search(r"WRAPPED (\d+)", out).group(1)),  # type: ignore[union-attr]
        output=out,
    )


async def wait_drained(database_url: str, bound_seconds: float = 300.0) -> dict[str, int]:
    """Poll until no inbox row is pending; returns the status counts."""
    storage = await open_storage(database_url)
    try:
        deadline = time.monotonic() + bound_seconds
        while await storage.pending_webhook_count():
            if time.monotonic() > deadline:
                raise RuntimeError("inbox did not drain")
            await asyncio.sleep(0.02)
        return await storage.webhook_status_counts()
    finally:
        await storage.close()


async def count_pending(database_url: str) -> int:
    storage = await open_storage(database_url)
    try:
        return await storage.pending_webhook_count()
    finally:
        await storage.close()


async def first_received(database_url: str) -> float | None:
    """When the inbox's first row was received (epoch seconds, the database's clock)."""
    storage = await open_storage(database_url)
    try:
        async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
            row = await conn.fetchrow("SELECT min(received_at) AS t FROM webhook_events")
        return None if row is None or row["t"] is None else int(row["t"]) / 1000
    finally:
        await storage.close()


async def count_events(database_url: str) -> int:
    storage = await open_storage(database_url)
    try:
        async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
            row = await conn.fetchrow("SELECT count(*) AS n FROM contact_interaction_events")
        return int(row["n"])
    finally:
        await storage.close()


async def pg_schema(action: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"{action} SCHEMA {schema}" + (" CASCADE" if action == "DROP" else ""))
    finally:
        await conn.close()


def metric_summary(port: int) -> str:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) ([\d.e+-]+)$", text, re.M)}
    batches = values.get("webhook_commit_batch_size_count", 0)
    mean_batch = values.get("webhook_commit_batch_size_sum", 0) / batches if batches else 0
    lag_n = values.get("webhook_apply_lag_seconds_count", 0)
    within = values.get('webhook_apply_lag_seconds_bucket{le="1.0"}', 0)
    lag_mean = values.get("webhook_apply_lag_seconds_sum", 0) / lag_n if lag_n else 0
    return (
        f"group commits: {batches:.0f} (mean {mean_batch:.1f} bodies); "
        f"apply lag: mean {lag_mean * 1000:.0f} ms, {100 * within / lag_n if lag_n else 0:.1f}% within 1 s"
    )


def profile_summary(raw: Path, top: int = 25) -> str:
    """The hottest functions of a py-spy raw (collapsed stacks) profile: self and total %."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [re.sub(r" \((/[^)]*/)?([^/)]+)\)", r" (\2)", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples; self%  total%  function"]
    for frame, n in own.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}")
    return "\n".join(lines)


@contextlib.contextmanager
def service(engine: str, work: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    """The service under uvicorn on a fresh database, its Graph the stand-in, with the bench page
    registered: (process, port, DATABASE_URL); the database is dropped afterwards."""
    schema = None
    if engine == "sqlite":
        database_url = f"sqlite:///{work}/bench-{uuid.uuid4().hex[:6]}.db"
    else:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(pg_schema("CREATE", schema))
        database_url = f"{PG_URL}?search_path={schema}"
    port = free_port()
    try:
        with graph_standin() as graph_url:
            env = {
                "DATABASE_URL": database_url,
                "GRAPH_API_URL": graph_url,
                "FB_APP_SECRET": SECRET,
                "FB_VERIFY_TOKEN": "bench",
                "API_KEYS": f"bench:{API_KEY}",
            }
            proc = start_uvicorn("app:app", port, env)
            try:
                register_page(port)
                yield proc, port, database_url
            finally:
                stop(proc)
    finally:
        if schema is not None:
            asyncio.run(pg_schema("DROP", schema))


class Sampler:
    """Polls the service's /metrics every `interval` seconds (a thread): acks and applied rows per
    interval, so a rate that falls as the tables grow shows in the series."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, acked, applied)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def _sample(self, http: httpx.Client) -> None:
        text = http.get(self.url).text
        acked = sum(
            float(n) for n in re.findall(r'^webhook_received_total\{outcome="accepted"\} (\S+)$', text, re.M)
        )
        applied = sum(float(n) for n in re.findall(r"^webhook_inbox_rows_total\{[^}]*\} (\S+)$", text, re.M))
        self.samples.append((time.monotonic(), acked, applied))

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    self._sample(http)
                if self._stop.wait(self.interval):
                    with contextlib.suppress(httpx.HTTPError):
                        self._sample(http)
                    return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self) -> str:
        """`acks/s 1203 1150 ... | applied/s 700 ...`, one number per interval."""
        pairs = list(zip(self.samples, self.samples[1:], strict=False))
        acks = " ".join(f"{(b[1] - a[1]) / (b[0] - a[0]):.0f}" for a, b in pairs)
        applied = " ".join(f"{(b[2] - a[2]) / (b[0] - a[0]):.0f}" for a, b in pairs)
        return f"every {self.interval:g} s: acks/s {acks} | applied/s {applied}"


def rss_kib(pid: int) -> int:
    """A running process's resident set now (VmRSS), in KiB; 0 if unknown."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Scale:
    """What grows with the load: the service's memory and the tables."""

    seconds: float  # from the first request until nothing is pending
    wrk_startup: float  # from wrk's start until the first request was received (not counted)
    pending_after_load: int  # inbox rows still pending when the load stopped
    drain_seconds: float  # from then until nothing was pending
    rss_start_kib: int  # after start-up and the page's registration
    rss_peak_kib: int
    rss_end_kib: int
    size: DatabaseSize
    series: str  # the sampler's rates

    @property
    def drain_rate(self) -> float:
        """Rows applied per second once the load stopped (the applier alone, without intake)."""
        return self.pending_after_load / self.drain_seconds if self.drain_seconds > 0 else 0.0

    def describe(self, result: WrkResult, applied: int) -> str:
        per_event = f"{1000 * self.seconds / applied:.3f} ms" if applied else "-"
        return (
            f"per webhook: ack {1000 / result.rps:.3f} ms (1 / ack rate), end-to-end {per_event} "
            f"(wrk's start-up of {self.wrk_startup:.1f} s not counted); "
            f"{self.pending_after_load} pending when the load stopped, drained in {self.drain_seconds:.1f} s "
            f"({self.drain_rate:.0f} rows/s); service RSS {self.rss_start_kib / 1024:.1f} MiB after start, "
            f"peak {self.rss_peak_kib / 1024:.1f} MiB, end {self.rss_end_kib / 1024:.1f} MiB; load {load()}\n"
            f"    {self.series}\n"
            f"    tables: {self.size.describe()}"
        )


def bench_service(
    engine: str, args: argparse.Namespace, work: Path, bodies: Path
) -> tuple[WrkResult, float, int, dict[str, int], str, Scale]:
    with service(engine, work) as (proc, port, database_url):
        rss_start = rss_kib(proc.pid)
        profiler = None
        if args.profile:
            raw = Path(args.profile) / f"service-{engine}.txt"
            profiler = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(proc.pid),
                    "-d",
                    str(args.duration),
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        started = time.time()
        with Sampler(port, max(1.0, args.duration / 10)) as sampler:
            result = run_wrk(port, bodies, args.duration, args.connections, args.threads)
            load_stopped = time.time()
            pending = asyncio.run(count_pending(database_url))
            counts = asyncio.run(wait_drained(database_url))
            drained_at = time.time()
        # From the first request the inbox received, not from wrk's start: wrk reads every body
        # before its first request (about 2 s for 120,000, 24 s for 1.2 million).
        first = asyncio.run(first_received(database_url)) or started
        elapsed = drained_at - first
        summary = metric_summary(port)
        if profiler is not None:
            profiler.wait()
            summary += "\n" + profile_summary(Path(args.profile) / f"service-{engine}.txt")
        events = asyncio.run(count_events(database_url))
        size = asyncio.run(database_size(database_url))
        rss_peak, rss_end = peak_rss_kib(proc.pid), rss_kib(proc.pid)
        scale = Scale(
            elapsed, first - started, pending, drained_at - load_stopped, rss_start, rss_peak, rss_end, size,
            sampler.describe(),
        )  # fmt: skip
    applied = counts.get("applied", 0)
    if events != applied:
        summary += f"\nWARNING: {applied} rows applied but {events} events stored"
    return result, applied / elapsed, applied, counts, summary, scale


def paced_lag(engine: str, work: Path, count: int = 300, rate: float = 100.0) -> str:
    """Normal load: `count` webhooks at `rate` per second; the apply lag from /metrics."""
    with service(engine, work) as (_, port, _url), httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        started = time.monotonic()
        for i in range(count):
            item = {
                "sender": {"id": str(7_700_000_000_000_000 + i % 50)},
                "recipient": {"id": PAGE},
                "timestamp": 1_732_900_000_000 + i,
                "message": {"mid": f"m_paced_{i}", "text": "hi"},
            }
            body = msgspec.json.encode(
                {"object": "page", "entry": [{"id": PAGE, "time": 1, "messaging": [item]}]}
            )
            headers = {"X-Hub-Signature-256": sign(SECRET.encode(), body)}
            http.post("/api/webhook", content=body, headers=headers).raise_for_status()
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
        time.sleep(1.0)
        text = http.get("/metrics").text

    def metric(name: str) -> float:
        found = re.search(rf"^webhook_apply_lag_seconds_{re.escape(name)} (\S+)$", text, re.M)
        assert found is not None, f"no webhook_apply_lag_seconds_{name} in /metrics"
        return float(found.group(1))

    applied, within = metric("count"), metric('bucket{le="1.0"}')
    return (
        f"normal load ({count} at {rate:.0f}/s): {applied:.0f} applied, mean lag "
        f"{metric('sum') / applied * 1000:.1f} ms, {within / applied:.0%} within 1 s"
    )


def bench_bare(args: argparse.Namespace, bodies: Path) -> WrkResult:
    port = free_port()
    proc = start_uvicorn("bench.bare_app:app", port, {"FB_APP_SECRET": SECRET})
    try:
        return run_wrk(port, bodies, args.duration, args.connections, args.threads)
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (the machine has few cores)")
    parser.add_argument("--bodies", type=int, default=0, help="distinct bodies (default: 15000/s of load)")
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply --duration (and --bodies) by this (10: ten times)"
    )
    parser.add_argument("--profile", default=None, help="folder for py-spy profiles of the service")
    parser.add_argument(
        "--http",
        choices=["h11", "httptools"],
        default="h11",
        help="uvicorn's HTTP parser, for the service and the bare endpoint alike: h11 with the production "
        "flags (routes/limits.py SERVER_FLAGS: headers bounded at 64 KiB), or httptools (uvicorn's "
        "default when installed; unbounded headers)",
    )
    args = parser.parse_args()
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    args.duration *= args.scale
    args.bodies *= args.scale
    UVICORN_FLAGS[:] = SERVER_FLAGS if args.http == "h11" else ["--http", "httptools"]
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    stack = f"uvicorn + {loop} + {args.http} ({' '.join(UVICORN_FLAGS)})"
    print(
        f"server: {stack}, 1 worker; wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
        f"(scale {args.scale}x); load {load()}"
    )

    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        work = Path(tmp)
        count = args.bodies or 15_000 * args.duration
        bodies = work / "bodies.txt"
        make_bodies(bodies, count, uuid.uuid4().hex[:8])
        print(f"{count} distinct signed bodies ({bodies.stat().st_size // 1024} KiB)")
        bare = bench_bare(args, bodies)
        print(f"\nbare endpoint: {bare.rps:.0f} req/s, p50 {bare.p50_ms:.2f} ms, p99 {bare.p99_ms:.2f} ms")
        ok = True
        scales: list[tuple[str, WrkResult, int, Scale]] = []
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            result, e2e, applied, counts, summary, scale = bench_service(engine, args, work, bodies)
            scales.append((engine, result, applied, scale))
            ack_ratio, e2e_ratio = result.rps / bare.rps, e2e / bare.rps
            passed = ack_ratio >= 0.8 and e2e_ratio >= 0.5 and result.p99_ms < 50 and result.errors == 0
            ok = ok and passed
            print(
                f"\n[{engine}] ack {result.rps:.0f} req/s (ratio {ack_ratio:.2f}), "
                f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}, "
                f"wraps {result.wrapped}\n"
                f"[{engine}] end-to-end {e2e:.0f} events/s (ratio {e2e_ratio:.2f}): {applied} applied, "
                f"inbox {counts}\n"
                f"[{engine}] {summary}\n"
                f"[{engine}] {'PASS' if passed else 'FAIL'} (targets: ack >= 0.8, e2e >= 0.5, p99 < 50 ms)\n"
                f"[{engine}] {scale.describe(result, applied)}\n"
                f"[{engine}] {paced_lag(engine, work)}"
            )
        print(f"\nscale summary ({args.duration} s of load, {count} bodies available)")
        print(
            "  engine     applied   ms/ack  ms/event  drain rows/s  RSS start  peak   end MiB   "
            "inbox B/row  events B/row"
        )
        for engine, result, applied, scale in scales:
            size = scale.size
            inbox, events = (size.bytes[t] / max(size.rows[t], 1) for t in SIZED_TABLES[:2])
            print(
                f"  {engine:<9} {applied:>8,}   {1000 / result.rps:6.3f}  "
                f"{1000 * scale.seconds / max(applied, 1):8.3f}  {scale.drain_rate:12.0f}  "
                f"{scale.rss_start_kib / 1024:9.1f} {scale.rss_peak_kib / 1024:5.1f} "
                f"{scale.rss_end_kib / 1024:5.1f}       {inbox:11,.0f}  {events:12,.0f}   "
                f"(database {mib(size.total_bytes)})"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
