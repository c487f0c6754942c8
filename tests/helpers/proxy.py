"""A TCP proxy in front of the test database, so a test can take "the database" away and bring it back.

    with TcpProxy.for_url(PG_URL) as proxy:
        url = proxy.url(db_url)        # the same database, through the proxy's port
        ...
        proxy.stop()                   # the database goes away: connections cut, new ones refused
        proxy.start()                  # it is back, on the same port

Stopping closes the listening socket and resets every connection it carried, which is what a
client sees when PostgreSQL restarts or its host goes away; the machine's shared server is never
touched. The proxy runs its own event loop in a thread, so it keeps forwarding whatever the test's
own loop (or a TestClient's thread) is doing, and its methods are plain calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 64 * 1024
_T = TypeVar("_T")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """Forwards host:port (a free loopback port) to the target while started."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = _free_port(host)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        """A proxy in front of the server a PostgreSQL URL names."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user, database and query kept)."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{self.host}:{self.port}" if auth else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> None:
        """Listen (again) on the proxy's port."""
        self._call(self._start())

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._call(self._stop())

    def close(self) -> None:
        """Stop, and end the proxy's thread."""
        if self._loop.is_closed():
            return
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, not a polite goodbye: what a dying server gives
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # stopped while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(sink)
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()
