"""The PostgreSQL engine (asyncpg pool): production, several replicas on one database.

Shared SQL runs as written (`now_ms()` is a function the first migration creates); bulk
row sources are one JSON array of rows (`unnest()` over typed arrays where a column is
binary), so a statement's text does not change with its number of rows (and a prepared
statement cache, where one is allowed, keeps working).

Behind a transaction pooler (PgBouncer in transaction mode, Supabase's pooler) each transaction
may run on a different server connection, so nothing here relies on session state: no prepared
statement outlives its statement (asyncpg's cache is off unless `statement_cache`; its unnamed
statements are parsed and run in one exchange), the migration lock is a transaction-scoped
advisory lock, nothing is SET, and LISTEN runs only on the direct connection (`direct_url`,
DATABASE_DIRECT_URL) when there is one. Without it, other replicas' commits are found by polling.

A server that cannot be reached (refused, reset, restarting, failed over to a read-only standby,
out of connections or disk) raises DatabaseUnavailable from whichever connection hit it; the pool
replaces dead connections on the next acquire, so nothing needs restarting when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import msgspec

from core.errors import DatabaseUnavailable
from storage.engine import Availability, TxnFn
from storage.notify import CHANNELS, Notifier

log = logging.getLogger(__name__)

T = TypeVar("T")

# pg_advisory_xact_lock key that serializes migrations across processes.
MIGRATION_LOCK_KEY = 0x6D73796E63  # "msync"
# A connection attempt that hangs (a host gone without a word) is given up after this long, so a
# request answers 503 in seconds instead of waiting on the kernel's TCP timeout.
CONNECT_TIMEOUT_SECONDS = 5.0
# asyncpg's default cache size, used when DATABASE_STATEMENT_CACHE is on (a direct connection).
STATEMENT_CACHE_SIZE = 100
# The NOTIFY channel of each of `storage.notify`'s channels.
PG_CHANNELS = {channel: f"msync_{channel}" for channel in CHANNELS}
_CHANNEL_OF = {pg: channel for channel, pg in PG_CHANNELS.items()}
# The listener checks its connection this often (a server gone without a word is noticed), and
# after losing it tries again after this long.
LISTENER_CHECK_SECONDS = 30.0
LISTENER_RETRY_SECONDS = 2.0

# What a server that went away, is restarting, or cannot take work right now raises.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS, TLS, and timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,  # class 08: the connection failed or was lost mid-operation
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: terminated by a restart or pg_terminate_backend
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed, the server is resetting
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a write reached a standby after a failover
)


_json_encode = msgspec.json.Encoder().encode


@functools.lru_cache(maxsize=64)
def _json_source(types: tuple[str, ...], index: int) -> str:
    """`SELECT (r->>0)::bigint, ... FROM jsonb_array_elements($n)`: rows as JSON arrays."""
    columns = ", ".join(f"(r->>{i})::{t}" for i, t in enumerate(types))
    return f"SELECT {columns} FROM jsonb_array_elements(${index}::jsonb) AS r"


def _rowcount(status: str) -> int:
    """asyncpg's command tag ("UPDATE 3", "INSERT 0 1") -> 3, 1."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _is_closed(conn: Any) -> bool:
    """Whether a pooled connection has died (the pool detaches a connection that closes)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # detached from its proxy: the pool took it back, closed
        return True


class PostgresConn:
    """A pooled connection as the shared SQL sees it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.notes: set[tuple[str, str]] = set()

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self.conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return await self.conn.fetchrow(sql, *args)

    def rows(self, types: Sequence[str], rows: Sequence[Sequence[Any]], start: int) -> tuple[str, list[Any]]:
        # One JSON document, encoded in one C call: typed arrays cost asyncpg a Python-level
        # isinstance check per value, which dominated the write path's CPU. JSON cannot carry
        # bytes, so a binary column keeps the arrays.
        if "bytea" not in types:
            return _json_source(tuple(types), start), [_json_encode(rows).decode()]
        columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in types]
        arrays = ", ".join(f"${start + i}::{t}[]" for i, t in enumerate(types))
        return f"SELECT * FROM unnest({arrays})", columns

    def any_of(self, index: int, values: Sequence[Any], type_: str) -> tuple[str, list[Any]]:
        return f"= ANY(${index}::{type_}[])", [list(values)]

    async def run_script(self, script: str) -> None:
        await self.conn.execute(script)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def notify(self, channel: str, key: str = "") -> None:
        self.notes.add((channel, key))

    async def send_notes(self) -> None:
        """`pg_notify` what this transaction notifies (in it: delivered when it commits)."""
        if self.notes:
            notes = sorted(self.notes)
            await self.conn.execute(
                "SELECT pg_notify(c, k) FROM unnest($1::text[], $2::text[]) AS n (c, k)",
                [PG_CHANNELS[c] for c, _ in notes],
                [k for _, k in notes],
            )


class Listener:
    """LISTEN on a direct connection; each notification is published to this process' notifier.

    Reconnects on its own; while it is away (`notifier.shared` False) subscribers rely on polling,
    and when it is back every subscriber is woken once, for what it may have missed.
    """

    def __init__(self, dsn: str, notifier: Notifier) -> None:
        self.dsn = dsn
        self.notifier = notifier
        self.connected = asyncio.Event()
        self.server_pid: int | None = None  # of the listening session, while connected
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="postgres-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _received(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        name = _CHANNEL_OF.get(channel)
        if name is not None:
            self.notifier.publish(name, payload)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self._session(recovered=failing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("postgres listener lost (%s); polling until it is back", type(exc).__name__)
                failing = True
            await asyncio.sleep(LISTENER_RETRY_SECONDS)

    async def _session(self, recovered: bool) -> None:
        """One listening connection, from connect until it is lost (raises then)."""
        conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            for pg_channel in PG_CHANNELS.values():
                await conn.add_listener(pg_channel, self._received)
            if recovered:
                log.warning("postgres listener connected again")
            self.server_pid = conn.get_server_pid()
            self.notifier.shared = True
            self.connected.set()
            self.notifier.wake_everyone()  # what was committed while nobody listened
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), LISTENER_CHECK_SECONDS)
                if not lost.is_set():
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), CONNECT_TIMEOUT_SECONDS)
            raise ConnectionError("the listening connection closed")
        finally:
            self.notifier.shared = False
            self.server_pid = None
            self.connected.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CONNECT_TIMEOUT_SECONDS)


class PostgresEngine:
    """Owns the asyncpg pool, and the listener on the direct connection if there is one."""

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        min_size: int = 1,
        max_size: int = 10,
        *,
        direct_dsn: str | None = None,
        statement_cache: bool = False,
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.statement_cache = statement_cache
        self.notifier = Notifier()
        self.listener = Listener(direct_dsn, self.notifier) if direct_dsn else None
        # Other replicas hear this one's commits only where they listen, i.e. where the deployment
        # gives them a direct connection: without one, NOTIFY would cost every write for nothing
        # (a notifying transaction queues its notifications, and commits, even if nobody listens).
        self.notify_others = self.listener is not None
        self._pool: asyncpg.Pool | None = None
        self._availability = Availability(self.name)

    async def open(self) -> None:
        """Open the pool (fails fast if the server cannot be reached), then start the listener."""
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            command_timeout=60,
            timeout=CONNECT_TIMEOUT_SECONDS,
            # A prepared statement lives in one server session: behind a transaction pooler the
            # next transaction may run in another, where it "does not exist".
            statement_cache_size=STATEMENT_CACHE_SIZE if self.statement_cache else 0,
        )
        if self.listener is not None:
            self.listener.start()

    @asynccontextmanager
    async def _connection(self, transaction: bool) -> AsyncIterator[PostgresConn]:
        """A pooled connection (in a transaction if asked); outage failures -> DatabaseUnavailable."""
        pool = self._pool
        if pool is None:  # closed: only a request outliving shutdown gets here
            raise DatabaseUnavailable("The database connection is closed")
        lost = False
        try:
            async with pool.acquire() as conn:
                try:
                    if transaction:
                        async with conn.transaction():
                            yield PostgresConn(conn)
                    else:
                        yield PostgresConn(conn)
                except Exception:
                    # Whatever asyncpg called it (a terminated session can surface as an
                    # InternalClientError, or as "released back to the pool" once the pool has
                    # taken back the dead connection), a failure on a connection that is now
                    # closed is the server going away, not the statement.
                    lost = _is_closed(conn)
                    raise
        except Exception as exc:
            if not (lost or self.is_unavailable(exc)):
                raise
            # The other idle connections probably died with this one: have the pool replace them
            # all on their next acquire instead of failing one request per dead connection.
            await pool.expire_connections()
            raise self._availability.failed(exc) from exc
        self._availability.ok()

    async def transact(self, fn: TxnFn[T], *, single_statement: bool = False, migration: bool = False) -> T:
        # One statement outside a transaction block is its own transaction: one round trip.
        async with self._connection(transaction=not single_statement) as conn:
            if migration:
                # Transaction-scoped, so a pooler may hand the next transaction another session.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            result = await fn(conn)
            if self.notify_others:
                # In a block, the NOTIFY rides in the write's transaction and is delivered when it
                # commits. A single statement has committed by now, so its NOTIFY, sent just after
                # (one more round trip instead of a BEGIN/COMMIT block's three), also reaches the
                # listeners only once the write is visible; it is lost only if the process dies in
                # between, and the listeners' polling covers that.
                await conn.send_notes()
        self.notifier.publish_all(conn.notes)
        return result

    def is_transient(self, exc: Exception) -> bool:
        return isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError)

    def is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, _UNAVAILABLE):
            return True
        # asyncpg's own words for a connection that is already gone, or a pool shutting down.
        return isinstance(exc, asyncpg.InterfaceError) and (
            "connection is closed" in str(exc) or "pool is clos" in str(exc)
        )

    def reader(self) -> AbstractAsyncContextManager[PostgresConn]:
        return self._connection(transaction=False)

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
