"""A local stand-in for the Graph API (one Page: its conversations and `/me`), for benchmarks and tests.

    python bench/graph_standin.py --port 8099 --conversations 5000
    GRAPH_API_URL=http://127.0.0.1:8099/v25.0 python app.py ...

It serves one Page, ``--page-id``, and prints the GRAPH_API_URL to use at start:

* ``GET [/{version}]/me?fields=id,name`` answers ``{"id": <page id>, "name": <page name>}`` for a
  token of that Page, as Graph does for a Page access token, so ``POST /api/pages`` can verify the
  token. Which tokens are the Page's: by default every token (any ``Authorization: Bearer ...``);
  with ``--tokens a,b`` only those, and any other token is refused with Graph's code 190 (invalid
  token), on ``/me`` and on the listing alike. A request without a token gets code 104.
  Registering another Page id with a token the stand-in accepts is refused (403
  ``page_token_mismatch``): ``/me`` answers the stand-in's Page, not the one claimed.
* ``GET [/{version}]/{page_id}/conversations`` serves deterministic, synthesized conversations
  shaped like Graph's (newest first, ``t_...`` ids, ``m_...`` mids, 16-digit PSIDs). The ``after``
  cursor is an opaque base64 offset and ``paging.next`` is present until the last page. Each page
  is generated on the fly, so memory stays flat in the total size.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import time
from typing import Any
from urllib.parse import urlencode

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# 2025-06-01T12:00:00+0000: conversation i was last updated i minutes before this.
_NEWEST_EPOCH_S = 1_748_779_200
_DEFAULT_LIMIT = 25
_MAX_LIMIT = 100
_MAX_MESSAGES = 20  # Graph details only the 20 most recent messages
_encoder = msgspec.json.Encoder()


def _graph_time(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(epoch_s))


def encode_cursor(offset: int) -> str:
    """The opaque ``after`` cursor for a position in the listing."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    """The position a cursor stands for, or None when it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    prefix, _, number = text.partition(":")
    if prefix != "offset" or not number.isdigit():
        return None
    return int(number)


def synthesize_conversation(
    index: int, page: dict[str, str], messages_per_conversation: int
) -> dict[str, Any]:
    """Conversation number ``index`` (0 is the newest), the same on every call."""
    psid = str(5_000_000_000_000_000 + index * 7_919)
    contact = {
        "name": f"Contact {index}",
        "email": f"{psid}@facebook.com",
        "id": psid,
    }
    updated = _NEWEST_EPOCH_S - index * 60
    count = max(1, messages_per_conversation)
    messages = []
    for n in range(min(count, _MAX_MESSAGES)):  # newest first, 10 s apart
        from_page = n % 2 == 1
        sender, recipient = (page, contact) if from_page else (contact, page)
        messages.append(
            {
                "id": f"m_standin{index:09d}x{n:03d}",
                "created_time": _graph_time(updated - n * 10),
                "from": sender,
                "to": {"data": [recipient]},
                "message": f"Message {n} of conversation {index}",
            }
        )
    return {
        "id": f"t_{10_160_000_000_000_000 + index}",
        "updated_time": _graph_time(updated),
        "message_count": count,
        "unread_count": index % 3,
        "participants": {"data": [contact, page]},
        "messages": {"data": messages},
    }


def _error(status: int, message: str, code: int) -> Response:
    body = {
        "error": {
            "message": message,
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": "AStandInTrace",
        }
    }
    return Response(_encoder.encode(body), status, media_type="application/json")


def create_standin(
    total_conversations: int,
    page_fb_id: str,
    messages_per_conversation: int = 3,
    latency_ms: float = 0,
    *,
    tokens: frozenset[str] | None = None,
    page_name: str = "Stand-in Page",
) -> Starlette:
    """A Starlette app serving ``total_conversations`` synthesized conversations of one page, and
    ``/me`` for its tokens: ``tokens``, or every token when ``tokens`` is None."""
    page = {
        "name": page_name,
        "email": f"{page_fb_id}@facebook.com",
        "id": page_fb_id,
    }

    def refuse_token(request: Request) -> Response | None:
        """Graph's answer to a request whose token is missing or not one of the page's, else None."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return _error(400, "An active access token must be used to query information.", 104)
        if tokens is not None and token not in tokens:
            return _error(400, "Invalid OAuth access token - Cannot parse access token", 190)
        return None

    async def me(request: Request) -> Response:
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        refused = refuse_token(request)
        if refused is not None:
            return refused
        fields = request.query_params.get("fields", "id,name").split(",")  # Graph's default for /me
        body = {k: v for k, v in (("id", page_fb_id), ("name", page_name)) if k in fields}
        return Response(_encoder.encode(body), media_type="application/json")

    async def conversations(request: Request) -> Response:
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        if request.path_params["page_id"] != page_fb_id:
            return _error(400, "(#100) Unsupported get request.", 100)
        refused = refuse_token(request)
        if refused is not None:
            return refused
        query = request.query_params
        try:
            limit = min(_MAX_LIMIT, max(1, int(query.get("limit", _DEFAULT_LIMIT))))
        except ValueError:
            return _error(400, "(#100) Param limit must be an integer", 100)
        offset = 0
        if "after" in query:
            decoded = decode_cursor(query["after"])
            if decoded is None:
                return _error(400, "(#100) Invalid cursor parameter", 100)
            offset = decoded
        end = min(total_conversations, offset + limit)
        data = [synthesize_conversation(i, page, messages_per_conversation) for i in range(offset, end)]
        body: dict[str, Any] = {"data": data}
        if data:
            paging: dict[str, Any] = {
                "cursors": {
                    "before": encode_cursor(offset),
                    "after": encode_cursor(end),
                }
            }
            if end < total_conversations:
                params = {k: v for k, v in query.items() if k != "after"}
                params.update(limit=str(limit), after=encode_cursor(end))
                paging["next"] = f"{request.url.replace(query='')}?{urlencode(params)}"
            body["paging"] = paging
        return Response(_encoder.encode(body), media_type="application/json")

    # /me before /{version}/{page_id}/...: "me" is never a version, but keep the order obvious.
    routes = [
        Route("/me", me, methods=["GET"]),
        Route("/{version}/me", me, methods=["GET"]),
        Route("/{page_id}/conversations", conversations, methods=["GET"]),
        Route("/{version}/{page_id}/conversations", conversations, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` describes each option)."""
    parser = argparse.ArgumentParser(
        prog="python bench/graph_standin.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8099, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--conversations",
        type=int,
        default=5000,
        help="conversations the page has in all (default: %(default)s)",
    )
    parser.add_argument(
        "--page-id",
        default="104325188712345",
        help="the one Page served: its listing, and the id /me answers (default: %(default)s)",
    )
    parser.add_argument(
        "--page-name", default="Stand-in Page", help="the name /me answers (default: %(default)s)"
    )
    parser.add_argument(
        "--tokens",
        default="",
        help="comma-separated access tokens of the page; any other token is refused with code 190 "
        "(default: every token is the page's)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=3,
        help="messages per conversation; Graph details at most 20 (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0,
        help="delay before each answer, in milliseconds (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the stand-in with uvicorn."""
    import uvicorn

    args = parse_args(argv)
    tokens = frozenset(t.strip() for t in args.tokens.split(",") if t.strip()) or None
    app = create_standin(
        args.conversations,
        args.page_id,
        args.messages,
        args.latency_ms,
        tokens=tokens,
        page_name=args.page_name,
    )
    accepted = f"{len(tokens)} token(s) given by --tokens" if tokens else "any token"
    print(
        f"Graph stand-in: GRAPH_API_URL=http://{args.host}:{args.port}/v25.0 "
        f"(page {args.page_id}, {args.conversations} conversations; /me accepts {accepted})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
