"""The Messenger webhook: subscription check (GET) and event intake (POST).

POST checks the size (413) and the signature over the raw bytes (401), then hands the raw body
to the inbox writer (``webhook.intake``) and answers 200 ``EVENT_RECEIVED`` once it is committed,
whatever the body's shape: Meta retries anything but a 200 and disables a subscription that
keeps failing, so a signed body is never refused for what it says. Nothing is decoded here (it
is the hot path); the background applier (``webhook.applier``) reads the body later, and one it
cannot read ends ``invalid`` in the inbox with the reason, replayable after a fix. The only other
answers: 503 ``webhook_not_configured`` without FB_APP_SECRET, 503 ``database_unavailable`` when
the inbox cannot be written (Meta retries).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.errors import PayloadTooLarge, ServiceError, Unauthorized, WebhookNotConfigured
from routes.common import JSON, services
from schema.responses import ErrorBody
from storage.base import InboxBody
from webhook.signature import SIGNATURE_HEADER, verify

if TYPE_CHECKING:
    from core.services import Services

_RECEIVED = b"EVENT_RECEIVED"
_SIGNATURE_HEADER = SIGNATURE_HEADER.lower().encode()
_RECEIVED_HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"14")]


async def verify_subscription(request: Request) -> Response:
    """GET /api/webhook: echo hub.challenge when mode and verify token match; 403 otherwise."""
    params = request.query_params
    expected = services(request).settings.fb_verify_token
    token = params.get("hub.verify_token", "")
    challenge = params.get("hub.challenge")
    if (
        expected is not None
        and params.get("hub.mode") == "subscribe"
        and challenge is not None
        and hmac.compare_digest(token.encode(), str(expected).encode())
    ):
        return PlainTextResponse(challenge)
    return JSON(ErrorBody(error="Webhook verification failed", code="forbidden"), status_code=403)


class ReceiveEvent:
    """POST /api/webhook: signed, durable in the inbox (unread), then 200.

    A plain ASGI endpoint rather than a Request handler: it is the service's hot path,
    and skipping the Request/Response objects and the per-route exception wrapper is a
    measurable share of its cost (bench/webhook.py). Errors are ServiceErrors, answered
    by the app's handler like everywhere else.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found: Services = scope["state"]["services"]
        counter = found.metrics.webhook_received
        settings = found.settings
        try:
            if settings.fb_app_secret is None:
                raise WebhookNotConfigured("Webhook app secret (FB_APP_SECRET) is not configured")
            signature = None
            for name, value in scope["headers"]:
                if name == _SIGNATURE_HEADER:
                    signature = value.decode("latin-1")
                elif name == b"content-length" and value.isdigit() and int(value) > settings.max_body_bytes:
                    raise PayloadTooLarge(f"Body larger than {settings.max_body_bytes} bytes")
            body = await _read_body(receive, settings.max_body_bytes)
            if not verify(str(settings.fb_app_secret).encode(), body, signature):
                raise Unauthorized("Missing or invalid X-Hub-Signature-256")
            # Stored unread, whatever its shape: the applier reads it (and keeps it if it cannot).
            assert found.inbox is not None  # the HTTP app always runs its inbox writer
            await found.inbox.submit(InboxBody(body=body, body_sha256=hashlib.sha256(body).hexdigest()))
        except ServiceError as exc:
            counter.labels(exc.code).inc()
            raise
        except ClientDisconnect:  # Meta hung up before sending the body: nothing to answer
            counter.labels("disconnected").inc()
            return
        counter.labels("accepted").inc()
        # A fresh list: middleware may append to it (app.RequestContext adds x-request-id).
        await send({"type": "http.response.start", "status": 200, "headers": list(_RECEIVED_HEADERS)})
        await send({"type": "http.response.body", "body": _RECEIVED})


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


routes = [
    Route("/api/webhook", verify_subscription, methods=["GET"]),
    Route("/api/webhook", ReceiveEvent(), methods=["POST"]),
]
