"""The HTTP layer's limits (SPEC "Limits"), in one pure ASGI middleware, and the server options
that go with them.

- **Headers: 64 KiB in all.** What bounds memory is the server: uvicorn's h11 parser, run with
  `--http h11 --h11-max-incomplete-event-size 65536` (SERVER_OPTIONS), stops buffering a header
  block past 64 KiB and closes the connection (after a plain-text 400); httptools, uvicorn's
  default when installed, buffers headers without any bound. A block over the limit that still
  arrives whole within one socket read gets here, and is answered 431 `headers_too_large`.
- **Body: within 30 s** (`Settings.body_timeout_seconds`) of the request's start, or 408
  `request_timeout` and the connection closed. The deadline covers the body only: once it has
  arrived (at once, for a request without one) `receive` is passed through untouched, so a long
  sync or an open event stream is not cut by it.
- **U+0000 in the path or the query string**: 400 `bad_request`, before any route. No id or
  parameter of ours holds one, and PostgreSQL text cannot: refusing it here covers every route,
  present and future, in one place (bodies are checked where they are decoded). The webhook's
  query is the exception: it never reaches the database, and a signed body is never refused for
  anything but its signature and its size.
- **Shutdown.** uvicorn waits `--timeout-graceful-shutdown` seconds for running requests, then
  cancels them. A request cancelled that way gets an answer instead of uvicorn's plain-text 500:
  503 `shutting_down` (JSON) when nothing was sent yet, else the end of its streamed body (an event
  stream ends cleanly, and its client reconnects with Last-Event-ID).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import BadRequest, HeadersTooLarge, RequestTimeout, ServiceError, ShuttingDown

MAX_HEADER_BYTES = 64 * 1024
WEBHOOK_PATH = "/api/webhook"
# Long enough for a webhook batch or a page of a sync to finish, short enough for `docker stop`
# (10 s before SIGKILL) to leave time for the lifespan's shutdown (leases released, storage closed).
GRACEFUL_SHUTDOWN_SECONDS = 5

# How the service is served, wherever it is: `python app.py serve` passes these to uvicorn.run,
# the README's and the Dockerfile's command lines spell them as SERVER_FLAGS, and the tests run
# uvicorn with them.
SERVER_OPTIONS: dict[str, Any] = {
    "http": "h11",
    "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
}
SERVER_FLAGS: list[str] = [
    "--http",
    "h11",
    "--h11-max-incomplete-event-size",
    str(MAX_HEADER_BYTES),
    "--timeout-graceful-shutdown",
    str(GRACEFUL_SHUTDOWN_SECONDS),
]

_encode = msgspec.json.Encoder().encode
_CLOSE = (b"connection", b"close")


def header_bytes(scope: Scope) -> int:
    """The size of the request's header block as sent: `name: value` and CRLF per header."""
    return sum(len(name) + len(value) + 4 for name, value in scope["headers"])


async def send_error(send: Send, error: ServiceError, close: bool = False) -> None:
    """Answer `error` as JSON in the SPEC's shape, from outside the app's exception handlers."""
    body = _encode(error.to_json())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HTTPLimits:
    """Pure ASGI middleware: the header limit, the body deadline, and answers at shutdown."""

    def __init__(
        self, app: ASGIApp, body_timeout_seconds: float, max_header_bytes: int = MAX_HEADER_BYTES
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout_seconds
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if header_bytes(scope) > self.max_header_bytes:
            error = HeadersTooLarge(f"Request headers exceed {self.max_header_bytes} bytes in all")
            await send_error(send, error, close=True)
            return
        path = scope["path"]
        if "\x00" in path or (b"%00" in scope["query_string"] and path != WEBHOOK_PATH):
            await send_error(send, BadRequest("The path and query must not contain U+0000"))
            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        body_done = timed_out = started = complete = False

        async def receive_in_time() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                if started:  # too late for a 408: treat the client as gone
                    return {"type": "http.disconnect"}
                raise RequestTimeout(
                    f"The request body did not arrive within {self.body_timeout:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
                if timed_out:  # the rest of the body may still be on its way: do not wait for it
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_tracked)
        except asyncio.CancelledError:
            # The server gave up on the request (its graceful shutdown timed out): answer what can
            # still be answered. Once the response is complete the request is over, so the
            # cancellation has done its work: end quietly rather than have uvicorn log a traceback
            # for every stream that was open at shutdown.
            if complete or not await _finish(send, started):
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()


async def _finish(send: Send, started: bool) -> bool:
    """Complete a response cut short: 503 shutting_down, or the end of a streamed body."""
    try:
        if not started:
            await send_error(send, ShuttingDown("The service is shutting down; retry"), close=True)
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # the connection is gone too: nothing left to answer
        return False
    return True
