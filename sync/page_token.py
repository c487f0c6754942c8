"""Page-token verification: a Page is registered only with a token that belongs to it.

    GET {GRAPH_API_URL}/me?fields=id,name        Authorization: Bearer <token>

Graph answers ``/me`` with whoever the token was issued for: a Page access token with the Page's
own id, a user token with the user's id, another Page's token with that Page's id. Without this
check anyone with an API key could claim any Page id and read its customers' messages
(SPEC: POST /api/pages). ``verify_page_token`` returns the Page's identity when ``/me`` answers
the id being registered, and raises otherwise:

    not printable ASCII (checked before any call)    InvalidToken             400 invalid_token
    /me answers another id (another Page, a user)    PageTokenMismatch        403 page_token_mismatch
    Graph code 190                                   InvalidToken             400 invalid_token
    Graph codes 10, 200-299                          InsufficientPermissions  400 insufficient_permissions
    codes 4, 17, 32, 613, 80001, 80006; HTTP 429     GraphRateLimited         502 graph_rate_limited
    anything else: 5xx, timeout, unreachable, junk   GraphUnavailable         502 graph_unavailable

One attempt, bounded by ``VERIFY_TIMEOUT_SECONDS`` in all (connecting, sending and reading the
whole answer): a user is waiting on the request, so a hanging Graph answers 502 at once and the
retry is the user's. The token travels only in the Authorization header (never in the URL, which
httpx logs) and is redacted from Graph's messages before they reach an error body or a log.
"""

from __future__ import annotations

import asyncio
import math
import re

import httpx
import msgspec

from core.errors import (
    GraphRateLimited,
    GraphUnavailable,
    InsufficientPermissions,
    InvalidToken,
    PageTokenMismatch,
    ServiceError,
)
from schema.graph import GraphErrorDetail, decode_error

# A user waits on the registration: a few seconds, not the sync client's 30 s read timeout.
VERIFY_TIMEOUT_SECONDS = 5.0

AUTH_CODE = 190
PERMISSION_CODES = frozenset({10, *range(200, 300)})
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, 80001, 80006})
_MAX_NAME_CHARS = 512  # the bound RegisterPage puts on a name given in the request
_MAX_MESSAGE_CHARS = 500

# Visible ASCII (0x21-0x7E): an OAuth bearer token (RFC 6750 b64token) never holds a space or a
# control character, and anything else would fail in the Authorization header (or, with U+0000,
# in PostgreSQL) long after the 201.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


class MeAnswer(msgspec.Struct, kw_only=True, gc=False):
    """The answer of ``GET /me?fields=id,name``. Graph may send the id as a JSON number; msgspec
    keeps an int exact whatever its size, and the id is compared as a string."""

    id: int | str
    name: str | None = None


class PageIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """The verified Page: its id (the one registered) and the name Graph gave, if any."""

    facebook_page_id: str
    name: str | None


_me_decoder = msgspec.json.Decoder(MeAnswer)


def check_token_format(access_token: str) -> None:
    """Refuse a token that is not printable ASCII (no space, no control character) with 400."""
    if _TOKEN_CHARS.fullmatch(access_token) is None:
        raise InvalidToken("accessToken must be printable ASCII (no spaces or control characters)")


async def verify_page_token(
    http: httpx.AsyncClient, facebook_page_id: str, access_token: str
) -> PageIdentity:
    """Ask Graph's ``/me`` whose token this is; the Page's identity if it is ``facebook_page_id``'s.

    ``http`` is the app's shared client (its base_url is ``GRAPH_API_URL``). Raises the
    ``ServiceError`` of the module docstring's table otherwise.
    """
    check_token_format(access_token)
    bound = VERIFY_TIMEOUT_SECONDS
    try:
        async with asyncio.timeout(bound):
            response = await http.get(
                "/me",
                params={"fields": "id,name"},
                headers={"Authorization": f"Bearer {access_token}"},
            )
    except TimeoutError:
        raise GraphUnavailable(f"Graph API did not answer /me within {bound:g} s") from None
    except httpx.TimeoutException as exc:
        raise GraphUnavailable(f"Graph API timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        # Only the class name: an exception's text may carry the request it failed on.
        raise GraphUnavailable(f"Graph API unreachable ({type(exc).__name__})") from None
    return _identity(response, facebook_page_id, access_token)


def _identity(response: httpx.Response, facebook_page_id: str, access_token: str) -> PageIdentity:
    if response.status_code == 200:
        try:
            me = _me_decoder.decode(response.content)
        except msgspec.DecodeError:
            me = None
        if me is not None:
            if str(me.id) != facebook_page_id:
                raise PageTokenMismatch(
                    f"The access token is not a Page access token of Page {facebook_page_id}: "
                    "Graph says it belongs to someone else (a user, or another Page)"
                )
            return PageIdentity(facebook_page_id=facebook_page_id, name=_clean_name(me.name))
    error = decode_error(response.content)
    if error is not None:
        raise _classify(error, response, access_token)
    if response.status_code == 429:
        raise GraphRateLimited("Graph API rate limit (HTTP 429)", **_retry_after(response))
    if response.status_code == 200:
        raise GraphUnavailable("Graph API answered /me with an unexpected body")
    raise GraphUnavailable(f"Graph API answered /me with HTTP {response.status_code}")


def _classify(error: GraphErrorDetail, response: httpx.Response, access_token: str) -> ServiceError:
    text = _describe(error, access_token)
    if error.code == AUTH_CODE:
        return InvalidToken(f"The access token is not valid: {text}")
    if error.code in PERMISSION_CODES:
        return InsufficientPermissions(f"The access token lacks a permission: {text}")
    if error.code in RATE_LIMIT_CODES or response.status_code == 429:
        return GraphRateLimited(text, graph_code=error.code, **_retry_after(response))
    return GraphUnavailable(text, graph_code=error.code)


def _retry_after(response: httpx.Response) -> dict[str, int]:
    """``retryAfter`` (seconds) when Graph sent a numeric Retry-After header."""
    raw = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(raw)
    except ValueError:
        return {}
    if not math.isfinite(seconds) or seconds < 0:
        return {}
    return {"retryAfter": max(1, math.ceil(seconds))}


def _clean_name(name: str | None) -> str | None:
    """Graph's name as stored: U+0000 removed (PostgreSQL cannot hold it), bounded like a request's."""
    if name is None:
        return None
    name = name.replace("\x00", "")[:_MAX_NAME_CHARS]
    return name or None


def _describe(error: GraphErrorDetail, access_token: str) -> str:
    """Graph's own message and code, safe to show: never the token, never unbounded."""
    code = f"code {error.code}"
    if error.error_subcode is not None:
        code += f", subcode {error.error_subcode}"
    message = (error.message or "no message").replace(access_token, "[redacted]")
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "..."
    return f"Graph API error ({code}): {message}"
