"""Small helpers the route modules share: JSON bodies, ids and integers from the URL, opaque cursors.

Whatever arrives in a URL or a body is checked here before it reaches a query, so a bad value is a
400 (or a 404), never a 500: integers are ASCII digits within 64 bits (`"١٢".isdigit()` is true,
and `int("²")` raises), ids carry no U+0000 (PostgreSQL text cannot hold it), and JSON nested too
deep for the decoder is refused like any other malformed body.
"""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.errors import BadRequest, PayloadTooLarge, ValidationFailed

if TYPE_CHECKING:  # core.services imports the route modules' helpers: no import cycle at run time
    from core.services import Services

T = TypeVar("T")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_ASCII_INT = re.compile(r"-?[0-9]{1,19}")
# Keyset positions are database integers: a cursor naming one outside 64 bits is not ours.
_Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]

_encoder = msgspec.json.Encoder()


class JSON(Response):
    """A JSON response encoded by msgspec (faster than the stdlib, and exact for big ints)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def services(request: Request) -> Services:
    """What the lifespan provides (core.services.Services), for a request handler."""
    return cast("Services", request.state.services)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `limit` bytes."""
    declared = ascii_int(request.headers.get("content-length"))
    if declared is not None and declared > limit:
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
    except RecursionError:  # msgspec's answer to JSON nested thousands deep
        raise BadRequest("Malformed JSON: nested too deeply") from None


async def read_json(request: Request, type_: type[T]) -> T:
    """Read, bound and decode a JSON request body."""
    return decode_json(await read_body(request, services(request).settings.max_body_bytes), type_)


def ascii_int(raw: str | None) -> int | None:
    """`raw` as a 64-bit integer if it is written in ASCII digits (an optional `-`), else None."""
    if raw is None or not _ASCII_INT.fullmatch(raw):
        return None
    value = int(raw)
    return value if INT64_MIN <= value <= INT64_MAX else None


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    value = ascii_int(raw)
    if value is None or not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}")
    return value


def check_id(value: str, name: str) -> str:
    """An id as sent by the client, refused with 400 when it holds U+0000 (never stripped)."""
    if "\x00" in value:
        raise BadRequest(f"{name} must not contain U+0000")
    return value


def query_id(request: Request, name: str) -> str:
    """A required id query parameter: 400 when it is missing, empty or holds U+0000."""
    raw = request.query_params.get(name)
    if not raw:
        raise BadRequest(f"{name} is required")
    return check_id(raw, name)


def path_int_id(request: Request, name: str) -> int | None:
    """A numeric path id (a row id): None when it is not a positive 64-bit ASCII integer, so the
    route answers 404 as for an id that does not exist."""
    raw = request.path_params[name]
    value = ascii_int(raw) if raw[:1] != "-" else None
    return value if value is not None and value > 0 else None


def encode_cursor(position: tuple[int, int]) -> str:
    """An opaque keyset cursor."""
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[int, int] | None:
    """The keyset position a cursor stands for; 400 for one we did not make."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        a, b = msgspec.json.decode(raw, type=tuple[_Int64, _Int64])
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise BadRequest("Invalid cursor") from None
    return a, b
