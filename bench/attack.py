"""Resource attacks on a real uvicorn process, with its memory measured (issue 7, item 8).

    python bench/attack.py                        # the production command line (SERVER_FLAGS)
    python bench/attack.py --flags "--http httptools"  # uvicorn's default parser, for comparison
    python bench/attack.py --root /tmp/old --flags ""  # another checkout (e.g. `git archive HEAD`)

Starts `python -m uvicorn app:app --host 127.0.0.1 --port P <flags>` from `--root` on a fresh
SQLite file, then, one after the other:

1. **Huge headers**: `--clients` unauthenticated connections at once, each streaming one header of
   `--header-mb` MB (the attack that took the service from 44 MB to 498 MB). Reports how much each
   client could send before the server cut it off, what it answered, and the server's RSS (peak
   while it lasted, and after).
2. **Stalled bodies**: `--stalled` connections each sending a webhook's headers and a tenth of its
   declared body, then nothing. Watches them for `--watch` seconds (the SPEC's body deadline is
   30 s) and reports how many the server answered (and with what), closed, or still holds, and
   its RSS.

Bounded: every socket has a timeout, and the whole run lasts about `--watch` seconds plus start-up.
Linux only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import collections
import os
import selectors
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routes.limits import SERVER_FLAGS  # noqa: E402

BLOCK = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Peak:
    """Samples a process's RSS every 20 ms in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_mib(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, RuntimeError):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def start(root: Path, flags: list[str], database: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{database}",
        "FB_APP_SECRET": "attack-secret",
        "API_KEYS": "attacker:not-a-key-anyone-sends",
        "SYNC_INTERVAL_SECONDS": "0",
    }
    proc = subprocess.Popen(
        [*command, "--log-level", "error", "--no-access-log", *flags],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("uvicorn did not start")


def status_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed without an answer"


def huge_header(port: int, size: int, results: list[tuple[int, str]]) -> None:
    """One client streaming a `size`-byte header, then reading whatever comes back."""
    sent, answer = 0, b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                block = b"a" * BLOCK
                while sent < size:
                    s.sendall(block)
                    sent += BLOCK
                s.sendall(b"\r\n\r\n")
            except OSError:
                pass  # cut off while sending
            try:
                answer = s.recv(4096)
            except OSError:
                pass
    except OSError as exc:
        answer = f"error: {exc}".encode()
    results.append((sent, status_line(answer)))


def attack_headers(pid: int, port: int, clients: int, size: int) -> str:
    before = rss_mib(pid)
    peak = Peak(pid)
    results: list[tuple[int, str]] = []
    threads = [threading.Thread(target=huge_header, args=(port, size, results)) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - started
    top = peak.stop()
    time.sleep(1.0)
    after = rss_mib(pid)
    answers = collections.Counter(answer for _, answer in results)
    sent = sorted(s / 2**20 for s, _ in results)
    return (
        f"huge headers: {clients} clients x {size / 2**20:.0f} MB, done in {elapsed:.1f} s\n"
        f"  sent before the server stopped reading (MB): min {sent[0]:.2f}, max {sent[-1]:.2f}\n"
        f"  answers: {dict(answers)}\n"
        f"  RSS: before {before:.0f} MiB, peak {top:.0f} MiB, 1 s after {after:.0f} MiB"
    )


def attack_stalled(pid: int, port: int, count: int, watch: float) -> str:
    before = rss_mib(pid)
    peak = Peak(pid)
    selector = selectors.DefaultSelector()
    head = (
        b"POST /api/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Hub-Signature-256: sha256=" + b"0" * 64 + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    opened = 0
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(head + b"{" + b" " * 99)  # a tenth of the body, then nothing
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ, [b""])
            opened += 1
        except OSError:
            break
    started = time.monotonic()
    answered: collections.Counter[str] = collections.Counter()
    closed_at: list[float] = []
    marks = {10.0: -1, 20.0: -1, watch: -1}
    while selector.get_map() and time.monotonic() - started < watch:
        for key, _ in selector.select(timeout=0.2):
            sock, buffer = key.fileobj, key.data
            try:
                chunk = sock.recv(65536)  # type: ignore[union-attr]
            except OSError:
                chunk = b""
            if chunk:
                if not buffer[0]:
                    answered[status_line(chunk)] += 1
                buffer[0] += chunk
                continue
            if not buffer[0]:
                answered["closed without an answer"] += 1
            closed_at.append(time.monotonic() - started)
            selector.unregister(sock)
            sock.close()  # type: ignore[union-attr]
        now = time.monotonic() - started
        for mark in marks:
            if marks[mark] < 0 and now >= mark:
                marks[mark] = len(selector.get_map())
    still_open = len(selector.get_map())
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    top = peak.stop()
    held = ", ".join(f"{n} after {t:.0f} s" for t, n in sorted(marks.items()) if n >= 0)
    first = f"{min(closed_at):.1f} s" if closed_at else "-"
    return (
        f"stalled bodies: {opened} connections, watched for {watch:.0f} s\n"
        f"  still held open: {held}; at the end {still_open}\n"
        f"  answers: {dict(answered)}; first closed at {first}\n"
        f"  RSS: before {before:.0f} MiB, peak {top:.0f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose app.py is served")
    parser.add_argument(
        "--flags", default=shlex.join(SERVER_FLAGS), help="uvicorn flags (default: the production ones)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--header-mb", type=int, default=64)
    parser.add_argument("--stalled", type=int, default=300)
    parser.add_argument("--watch", type=float, default=35.0, help="seconds to watch the stalled bodies")
    args = parser.parse_args()
    flags = shlex.split(args.flags)
    with tempfile.TemporaryDirectory(prefix="attack-") as tmp:
        proc, port = start(args.root, flags, Path(tmp) / "attack.db")
        try:
            print(f"uvicorn app:app {' '.join(flags) or '(no flags)'} from {args.root}; pid {proc.pid}")
            print(f"RSS at rest: {rss_mib(proc.pid):.0f} MiB")
            print(attack_headers(proc.pid, port, args.clients, args.header_mb * 2**20))
            print(attack_stalled(proc.pid, port, args.stalled, args.watch))
        finally:
            proc.kill()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
