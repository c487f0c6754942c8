"""The service under a real uvicorn, for the tests of what only a real server shows (limits,
streams, shutdown): in this event loop, in a thread of its own, or as the command line runs it.

All three serve with the production options (routes.limits.SERVER_OPTIONS / SERVER_FLAGS: h11 with
the 64 KiB header bound, the graceful shutdown deadline), on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from app import create_app
from core.settings import Settings
from routes.limits import SERVER_FLAGS, SERVER_OPTIONS
from tests.helpers import APP_SECRET, KEYS, ROOT, graph_router, graph_transport


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(
    settings: Settings, graph: httpx.AsyncBaseTransport | None, port: int, **options: Any
) -> uvicorn.Server:
    app = create_app(settings, graph_transport=graph or graph_transport(graph_router()))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", **{**SERVER_OPTIONS, **options}
    )
    return uvicorn.Server(config)


ServeInLoop = Callable[..., contextlib.AbstractAsyncContextManager[tuple[str, uvicorn.Server]]]
ServeInThread = Callable[..., contextlib.AbstractContextManager[str]]


@pytest.fixture
def serve() -> ServeInLoop:
    """`async with serve(settings, graph=None, **uvicorn_options) as (base_url, server)`: the app
    under uvicorn in this event loop (set `server.should_exit` to shut it down as a signal does)."""

    @contextlib.asynccontextmanager
    async def serving(
        settings: Settings, graph: httpx.AsyncBaseTransport | None = None, **options: Any
    ) -> AsyncIterator[tuple[str, uvicorn.Server]]:
        port = free_port()
        server = _server(settings, graph, port, **options)
        task = asyncio.create_task(server.serve())
        while not server.started:  # uvicorn offers no event for this  # noqa: ASYNC110
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}", server
        finally:
            server.should_exit = True
            await task

    return serving


@pytest.fixture
def serve_in_thread() -> ServeInThread:
    """`with serve_in_thread(settings, graph=None) as base_url`: the app under uvicorn in a thread
    with its own event loop, for tests that call it with a blocking client."""

    @contextlib.contextmanager
    def serving(settings: Settings, graph: httpx.AsyncBaseTransport | None = None) -> Iterator[str]:
        port = free_port()
        server = _server(settings, graph, port)
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    return serving


class ServiceProcess:
    """`python -m uvicorn app:app` with the production flags, as the README and Dockerfile run it."""

    def __init__(self, database_url: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        environment = {
            **os.environ,
            "DATABASE_URL": database_url,
            "API_KEYS": ",".join(f"{user}:{key}" for user, key in KEYS.items()),
            "FB_APP_SECRET": APP_SECRET,
            # Nothing in these tests calls Graph; a closed port makes sure nothing leaves the machine.
            "GRAPH_API_URL": f"http://127.0.0.1:{free_port()}/v25.0",
            "SYNC_INTERVAL_SECONDS": "0",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [*command, *SERVER_FLAGS],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Drained by a thread (a full pipe would stall the server), kept for failure messages.
        self.log = bytearray()
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}: {self._stderr()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def rss_kib(self) -> int:
        """The server's resident memory now (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log += line

    def _stderr(self) -> str:
        self._drain.join(timeout=5)
        return self.log.decode(errors="replace")[-2000:]

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM (a graceful shutdown, as `docker stop` does); returns everything it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=timeout)
        self._drain.join(timeout=5)
        return self.log.decode(errors="replace")

    def kill(self) -> None:
        """Stop it at once (teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._drain.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def service_process() -> Iterator[Callable[..., ServiceProcess]]:
    """`service_process(database_url, env=None)`: the service as its command line runs it; killed
    at the end of the test if it is still running."""
    started: list[ServiceProcess] = []

    def start(database_url: str, env: dict[str, str] | None = None) -> ServiceProcess:
        process = ServiceProcess(database_url, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
