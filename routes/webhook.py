"""The Messenger webhook: subscription check (GET) and event intake (POST).

POST checks the signature over the raw bytes, validates the body, and answers 200
``EVENT_RECEIVED`` only once the raw body is committed to the inbox (``webhook_intake``);
the background applier (``applier``) turns it into rows later. A signed body that fails
validation is kept in the inbox as ``invalid`` (replayable after a schema fix) and answered
400 with msgspec's message and JSON path.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from errors import BadRequest, ServiceError, ServiceUnavailable, Unauthorized, ValidationFailed
from routes.common import JSON, read_body
from signature import SIGNATURE_HEADER, verify
from storage.base import InboxBody
from webhook_parse import decode_webhook

log = logging.getLogger(__name__)

_RECEIVED = b"EVENT_RECEIVED"


async def verify_subscription(request: Request) -> Response:
    """GET /api/webhook: echo hub.challenge when mode and verify token match; 403 otherwise."""
    params = request.query_params
    expected = request.state.settings.fb_verify_token
    token = params.get("hub.verify_token", "")
    challenge = params.get("hub.challenge")
    if (
        expected is not None
        and params.get("hub.mode") == "subscribe"
        and challenge is not None
        and hmac.compare_digest(token.encode(), str(expected).encode())
    ):
        return PlainTextResponse(challenge)
    return JSON(
        {"success": False, "error": "Webhook verification failed", "code": "forbidden"},
        status_code=403,
    )


async def receive_event(request: Request) -> Response:
    """POST /api/webhook: signed, validated, durable in the inbox, then 200."""
    state = request.state
    counter = state.metrics.webhook_received
    secret = state.settings.fb_app_secret
    try:
        if secret is None:
            raise ServiceUnavailable("Webhook app secret is not configured")
        body = await read_body(request, state.settings.max_body_bytes)
        if not verify(str(secret).encode(), body, request.headers.get(SIGNATURE_HEADER)):
            raise Unauthorized("Missing or invalid X-Hub-Signature-256")
        digest = hashlib.sha256(body).hexdigest()
        try:
            decode_webhook(body)
        except msgspec.DecodeError as exc:  # ValidationError included: both keep the JSON path
            await _keep_invalid(request, body, digest, exc)
        await state.inbox.submit(InboxBody(body=body, body_sha256=digest))
    except ServiceError as exc:
        counter.labels(exc.code).inc()
        raise
    counter.labels("accepted").inc()
    return Response(_RECEIVED, media_type="text/plain")


async def _keep_invalid(request: Request, body: bytes, digest: str, exc: msgspec.DecodeError) -> None:
    """Store a signed but invalid body as `invalid` (once per distinct body), then raise 400."""
    if isinstance(exc, msgspec.ValidationError):
        error: BadRequest = ValidationFailed(f"Invalid webhook body: {exc}")
    else:
        error = BadRequest(f"Malformed webhook body: {exc}")
    log.warning("webhook body %s rejected: %s", digest[:12], exc)
    await request.state.inbox.submit(
        InboxBody(body=body, body_sha256=digest, status="invalid", error=error.message[:2000])
    )
    raise error


routes = [
    Route("/api/webhook", verify_subscription, methods=["GET"]),
    Route("/api/webhook", receive_event, methods=["POST"]),
]
