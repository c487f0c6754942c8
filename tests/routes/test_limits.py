"""The HTTP layer's limits (SPEC "Limits") and shutdown, against a real uvicorn on loopback.

Headers at most 64 KiB, a body within the deadline (408), 20 event streams per key (429), streams
that end when the server is stopped, and a sync cut by a forced shutdown that still answers JSON
and gives its lock back. The command-line tests run `python -m uvicorn app:app` with the flags the
README and the Dockerfile give (routes.limits.SERVER_FLAGS).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from uvicorn.main import main as uvicorn_main

import app as app_module
from core.records import ConversationRecord, EventRecord
from core.settings import Settings
from routes.limits import MAX_HEADER_BYTES, SERVER_FLAGS, SERVER_OPTIONS
from routes.stream import MAX_STREAMS_PER_KEY
from storage import Storage
from tests.helpers import APP_SECRET, KEYS, ROOT, auth_headers, graph_router, graph_transport, page_token
from tests.helpers.storage import write_conversations
from webhook.signature import sign

PAGE = "104325188712345"


def spec_error(body: bytes) -> dict[str, Any]:
    """A JSON error body in the SPEC's shape."""
    data = msgspec.json.decode(body)
    assert data["success"] is False and isinstance(data["error"], str) and isinstance(data["code"], str)
    return dict(data)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# --- the command line ----------------------------------------------------------------------------


def test_the_command_lines_serve_with_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The flags mean to uvicorn what SERVER_OPTIONS says (parsed by uvicorn's own command line).
    context = uvicorn_main.make_context("uvicorn", ["app:app", *SERVER_FLAGS])
    assert {name: context.params[name] for name in SERVER_OPTIONS} == SERVER_OPTIONS
    assert SERVER_OPTIONS["h11_max_incomplete_event_size"] == MAX_HEADER_BYTES == 65536
    # The Dockerfile runs uvicorn with them.
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # join continued lines
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    argv = json.loads(cmd[4:])
    assert argv[:2] == ["uvicorn", "app:app"]
    joined = shlex.join(argv)
    assert shlex.join(SERVER_FLAGS) in joined
    # `python app.py serve` passes the same options to uvicorn.run.
    seen: dict[str, Any] = {}
    monkeypatch.setattr("uvicorn.run", lambda target, **kwargs: seen.update(kwargs, target=target))
    monkeypatch.setenv("DATABASE_URL", "sqlite:///./data/unused.db")
    assert app_module.main(["serve", "--port", "8123"]) == 0
    assert seen["target"] == "app:app" and seen["port"] == 8123
    assert {name: seen[name] for name in SERVER_OPTIONS} == SERVER_OPTIONS
    # Forwarded headers are trusted only from FORWARDED_ALLOW_IPS (uvicorn reads it; 127.0.0.1
    # by default), never from everyone.
    assert seen["proxy_headers"] is True and "forwarded_allow_ips" not in seen
    assert "--forwarded-allow-ips" not in argv and "*" not in argv


# --- headers -------------------------------------------------------------------------------------


def _exchange(port: int, request: bytes) -> bytes:
    """Send a request, read until the server closes; b'' if it closed without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(request)
        except OSError:
            pass  # closed while we were still sending: what comes back (if anything) is the answer
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def _huge_header(port: int, size: int, sent: list[int]) -> None:
    """Stream one header of `size` bytes; record how much the server took before cutting us off."""
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            block = b"a" * (256 * 1024)
            while total < size:
                s.sendall(block)
                total += len(block)
        except OSError:
            pass
    sent.append(total)


def test_headers_over_64_kib_are_refused(tmp_path: Path, service_process: Callable[..., Any]) -> None:
    service = service_process(f"sqlite:///{tmp_path}/limits.db")
    port = service.port
    under = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(60))  # ~60 KiB
    status, _, _ = split_response(
        _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + under + b"\r\n")
    )
    assert status == 200

    # Over the limit, arriving at once: 431 in the SPEC's shape, or the connection closed.
    over = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(70))
    answer = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + over + b"\r\n")
    if answer:
        status, headers, body = split_response(answer)
        assert status == 431 and headers["connection"] == "close"
        assert spec_error(body)["code"] == "headers_too_large"

    # Eight clients streaming 64 MB headers: each is cut off early, and memory stays flat
    # (httptools, uvicorn's default, took the service from 44 MB to 498 MB this way).
    before = service.rss_kib()
    sent: list[int] = []
    clients = [threading.Thread(target=_huge_header, args=(port, 64 << 20, sent)) for _ in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=60)
    assert len(sent) == 8 and max(sent) < 16 << 20, sent  # socket buffers hold a few MB at most
    assert service.rss_kib() - before < 32 * 1024
    status, _, _ = split_response(
        _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert status == 200


# --- the body deadline ---------------------------------------------------------------------------


async def _raw(base_url: str, head: bytes, parts: list[bytes], pause: float = 0.0) -> bytes:
    """Send a request's head and body parts (pausing between them), then read until closed."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        for part in parts:
            await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()


async def test_a_body_must_arrive_in_time(settings: Settings, serve: Callable[..., Any]) -> None:
    quick = Settings(**{**settings.__dict__, "body_timeout_seconds": 0.5})
    body = msgspec.json.encode({"object": "page", "entry": []})
    async with serve(quick) as (base, _server):
        # A registration whose body stalls: 408 request_timeout, and the connection closed.
        head = (
            b"POST /api/pages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEYS["alice"].encode() + b"\r\nContent-Length: 100\r\n\r\n"
        )
        status, headers, answer = split_response(await _raw(base, head, [b'{"facebookPageId": "1']))
        assert status == 408 and headers["connection"] == "close"
        assert spec_error(answer)["code"] == "request_timeout"

        # The webhook too, before its signature is even checked.
        signed = f"X-Hub-Signature-256: {sign(APP_SECRET.encode(), body)}\r\n".encode()
        head = (
            b"POST /api/webhook HTTP/1.1\r\nHost: x\r\n" + signed + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        status, _, answer = split_response(await _raw(base, head, [body[:5]]))
        assert status == 408 and spec_error(answer)["code"] == "request_timeout"

        # A body that arrives in parts, in time, is read as usual.
        status, _, answer = split_response(
            await _raw(
                base, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), [body[:5], body[5:]], 0.05
            )
        )
        assert status == 200 and answer == b"EVENT_RECEIVED"


async def test_the_deadline_does_not_cut_an_open_stream(
    settings: Settings, storage: Storage, serve: Callable[..., Any]
) -> None:
    quick = Settings(**{**settings.__dict__, "body_timeout_seconds": 0.2})
    page, _ = await storage.register_page("alice", PAGE, page_token(PAGE), None)
    async with serve(quick) as (base, _server), httpx.AsyncClient(base_url=base, timeout=10) as http:
        url = f"/api/events/stream?pageId={page.id}"
        async with http.stream("GET", url, headers=auth_headers()) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert await lines.__anext__() == "retry: 2000"
            await asyncio.sleep(0.5)  # well past the body deadline
            record = ConversationRecord(
                sender_id="7712345678901234",
                events=[
                    EventRecord(
                        event_type="message_received",
                        message_id="m_late",
                        event_timestamp=1_732_900_000_000,
                        content="hi",
                    )
                ],
            )
            await write_conversations(storage, page.id, [record])
            line = ""
            while not line.startswith("data: "):
                line = await asyncio.wait_for(lines.__anext__(), 10)
    assert msgspec.json.decode(line[6:])["messageId"] == "m_late"


# --- the stream cap, and streams at shutdown ------------------------------------------------------


async def _open_stream(http: httpx.AsyncClient, page_id: str, user: str) -> tuple[int, httpx.Response]:
    request = http.build_request("GET", f"/api/events/stream?pageId={page_id}", headers=auth_headers(user))
    response = await http.send(request, stream=True)
    return response.status_code, response


async def test_twenty_streams_per_key_and_sigterm_ends_them(
    db_url: str, storage: Storage, service_process: Callable[..., Any]
) -> None:
    alice, _ = await storage.register_page("alice", PAGE, page_token(PAGE, "alice"), None)
    bob, _ = await storage.register_page("bob", PAGE, page_token(PAGE, "bob"), None)
    service = service_process(db_url)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10, limits=limits) as http:
        opened = [await _open_stream(http, alice.id, "alice") for _ in range(MAX_STREAMS_PER_KEY)]
        assert [status for status, _ in opened] == [200] * MAX_STREAMS_PER_KEY
        status, refused = await _open_stream(http, alice.id, "alice")
        assert status == 429
        error = spec_error(await refused.aread())
        assert error["code"] == "too_many_streams" and error["limit"] == MAX_STREAMS_PER_KEY
        await refused.aclose()
        # The cap is per key: bob still gets his.
        status, bobs = await _open_stream(http, bob.id, "bob")
        assert status == 200
        # A stream that ends gives its slot back (once the server has seen the client leave).
        await opened.pop()[1].aclose()
        for _ in range(200):
            status, again = await _open_stream(http, alice.id, "alice")
            if status == 200:
                break
            await again.aclose()
            await asyncio.sleep(0.05)
        assert status == 200
        opened.append((status, again))

        # SIGTERM (docker stop) with 21 streams open: every stream ends cleanly, the process exits.
        streams = [response for _, response in opened] + [bobs]
        readers = [response.aiter_bytes() for response in streams]
        for reader in readers:
            assert (await reader.__anext__()).startswith(b"retry:")
        service.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(service.proc.wait, 30)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells of it.
        assert code in (0, -signal.SIGTERM), service.log.decode(errors="replace")[-2000:]
        assert b"Application shutdown complete" in service.log
        for reader, response in zip(readers, streams, strict=True):
            async for _chunk in reader:  # ends, without a protocol error
                pass
            await response.aclose()


# --- a forced shutdown in the middle of a sync -------------------------------------------------


async def test_a_forced_shutdown_mid_sync_answers_json_and_releases_the_lock(
    settings: Settings, storage: Storage, serve: Callable[..., Any]
) -> None:
    router = graph_router()
    graph_called = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        graph_called.set()
        await asyncio.Event().wait()  # Graph never answers; only the shutdown ends this
        raise AssertionError("unreachable")

    router.get(path__regex=r"/\d+/conversations").mock(side_effect=hang)
    async with serve(settings, graph_transport(router), timeout_graceful_shutdown=1) as (base, server):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            created = await http.post(
                "/api/pages",
                json={"facebookPageId": PAGE, "accessToken": page_token(PAGE)},
                headers=auth_headers(),
            )
            assert created.status_code == 201, created.text
            page_id = created.json()["pageId"]
            body = {"pageId": page_id, "facebookPageId": PAGE}
            request = asyncio.create_task(
                http.post("/api/conversations/sync", json=body, headers=auth_headers())
            )
            await asyncio.wait_for(graph_called.wait(), 10)
            assert await storage.current_lock(page_id) is not None
            server.should_exit = True  # what SIGINT / SIGTERM do
            response = await request
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert spec_error(response.content)["code"] in ("shutting_down", "service_unavailable")
    assert await storage.current_lock(page_id) is None
