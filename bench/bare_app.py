"""The benchmark's yardstick: a bare Starlette endpoint that checks the signature and decodes.

    FB_APP_SECRET=... uvicorn bench.bare_app:app --port 8001

It does what the real POST /api/webhook must do before anything durable happens (read the
body, verify X-Hub-Signature-256 over the raw bytes, decode it with the same msgspec schema)
and answers 200 at once: no inbox, no database, no middleware.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhook.parse import decode_webhook  # noqa: E402
from webhook.signature import SIGNATURE_HEADER, verify  # noqa: E402

SECRET = os.environ.get("FB_APP_SECRET", "bench-secret").encode()


async def webhook(request: Request) -> Response:
    """Verify, decode, answer."""
    body = await request.body()
    if not verify(SECRET, body, request.headers.get(SIGNATURE_HEADER)):
        return Response(b"bad signature", status_code=401)
    try:
        decode_webhook(body)
    except msgspec.DecodeError:
        return Response(b"bad body", status_code=400)
    return Response(b"EVENT_RECEIVED", media_type="text/plain")


app = Starlette(routes=[Route("/api/webhook", webhook, methods=["POST"])])
