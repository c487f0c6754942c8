"""A private PostgreSQL 15 cluster for the tests that stop the server itself (never the shared one).

    with private_cluster() as cluster:       # initdb in a temporary folder, started on a free port
        cluster.url                          # postgresql://postgres@127.0.0.1:<port>/postgres
        cluster.stop(mode="immediate")       # a crash: no checkpoint, crash recovery at the next start
        cluster.start()                      # same folder, same port
        cluster.restart()                    # stop (fast by default), then start
    # stopped (immediate) and its folder removed, however the block ended

The cluster keeps PostgreSQL's durability settings (fsync, synchronous_commit and full_page_writes
on): what it acknowledged must survive a crash. Only its size is trimmed (shared_buffers, connections)
and initdb does not sync its own template files (`--no-sync`: that only speeds up creating the
cluster; every commit after start is flushed as usual). initdb refuses to run as root: as root,
initdb and pg_ctl run as the `postgres` OS user (`runuser -u postgres --`), in a folder it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

BINDIR = Path(os.environ.get("TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
INITDB = BINDIR / "initdb"
PG_CTL = BINDIR / "pg_ctl"
OS_USER = "postgres"  # who runs the server when the tests run as root
COMMAND_TIMEOUT_SECONDS = 60.0

# Small and quick to start, durable all the same.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "shared_buffers": "'16MB'",
    "max_connections": "40",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_wal_size": "'64MB'",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


def initdb_available() -> bool:
    """Whether this machine has PostgreSQL 15's initdb and pg_ctl (the tests skip otherwise)."""
    return INITDB.is_file() and PG_CTL.is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One initialised cluster in `root` (data in root/data, its unix socket in root, log in root/log)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.data = root / "data"
        self.logfile = root / "server.log"
        self.port = port
        self.running = False
        self._as_user = os.geteuid() == 0

    @property
    def url(self) -> str:
        """A DATABASE_URL of the cluster's `postgres` database (TCP on the loopback, trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", OS_USER, "--"] if self._as_user else []
        return subprocess.run(
            [*prefix, *command],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def _check(self, what: str, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"server log:\n{self.log_tail()}"
            )

    def initdb(self) -> None:
        """Create the cluster (trust auth, superuser `postgres`) and write its settings."""
        result = self._run(
            str(INITDB), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale", "C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        self._check("initdb", result)
        lines = [f"{name} = {value}" for name, value in SETTINGS.items()]
        lines.append(f"unix_socket_directories = '{self.root}'")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/helpers/pgcluster.py\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections (after crash recovery, if any)."""
        result = self._run(
            str(PG_CTL), "-D", str(self.data), "-l", str(self.logfile), "-o", f"-p {self.port}",
            "-w", "-t", "60", "start",
        )  # fmt: skip
        self._check("pg_ctl start", result)
        self.running = True

    def first_start(self, attempts: int = 3) -> None:
        """Start on a free port; another port if someone took that one between choosing and binding."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == attempts - 1 or "could not bind" not in self.log_tail():
                    raise
                self.port = _free_port()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (a clean shutdown) or `immediate` (a crash: recovery at next start)."""
        if mode not in ("fast", "immediate", "smart"):
            raise ValueError(f"unknown stop mode {mode!r}")
        result = self._run(str(PG_CTL), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self._check(f"pg_ctl stop -m {mode}", result)
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop (in `mode`) and start again, on the same port."""
        self.stop(mode)
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


@contextlib.contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A new cluster, started on a free port; stopped and removed at the end, even on failure."""
    if not initdb_available():
        raise RuntimeError(f"PostgreSQL's initdb is not at {INITDB}")
    # Under /tmp, not pytest's tmp_path: a unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="pgcluster-"))
    try:
        if os.geteuid() == 0:
            account = pwd.getpwnam(OS_USER)
            os.chown(root, account.pw_uid, account.pw_gid)
        cluster = PgCluster(root, _free_port())
        try:
            cluster.initdb()
            cluster.first_start()
            yield cluster
        finally:
            if (cluster.data / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
