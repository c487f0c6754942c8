"""Small helpers the route modules share: JSON bodies, query integers, opaque cursors."""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.errors import BadRequest, PayloadTooLarge, ValidationFailed

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


class JSON(Response):
    """A JSON response encoded by msgspec (faster than the stdlib, and exact for big ints)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body; 400 with msgspec's message (and JSON path) otherwise."""
    if not body.strip():
        raise BadRequest("Request body must be a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(f"Invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Malformed JSON: {exc}") from None


async def read_json(request: Request, type_: type[T]) -> T:
    """Read, bound and decode a JSON request body."""
    return decode_json(await read_body(request, request.state.settings.max_body_bytes), type_)


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}")
    return value


def encode_cursor(position: tuple[int, int]) -> str:
    """An opaque keyset cursor."""
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[int, int] | None:
    """The keyset position a cursor stands for; 400 for one we did not make."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        a, b = msgspec.json.decode(raw, type=tuple[int, int])
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest("Invalid cursor") from None
    return a, b
