"""Graph's rate limits in front of the Graph stand-in, and a record of every request it saw.

    StandinLimits(app, page_calls_per_second=2, app_calls_per_second=40)   ASGI middleware
    PagesStandin(conversations=500)       one bench/graph_standin.py app per page id, made on demand
    python bench/standin_limits.py --port 8099 --pages 200 --conversations 500

Every Graph request counts against the app's window; a conversations request also against its
page's. Windows slide over the last ``window_seconds``. A request beyond a limit is refused as
Graph refuses it: code 4 (the app's) or 80006 (the page's, Messenger's business use case), and
the app or the page then stays throttled until its window has room again (refused calls count
too, as Graph's do). Every answer carries usage headers shaped like Graph's, as percentages of
these windows (``X-App-Usage``; ``X-Business-Use-Case-Usage`` with the page's
``estimated_time_to_regain_access`` in minutes, fractional here since the windows are short).

For tests: ``fail_at(page, n, fault)`` answers a page's n-th request with a fault (code 190, or a
throttle with a regain time), ``refuse_token(token)``; ``requests[page]`` holds the arrival times
of a page's requests, ``afters[page]`` their ``after`` cursors, ``max_in_flight[page]`` the most
requests of one page answered at once; ``GET /_limits/stats`` gives the summary as JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.graph_standin import create_standin  # noqa: E402

_encode = msgspec.json.Encoder().encode
STATS_PATH = "/_limits/stats"


def bench_page_ids(count: int) -> list[str]:
    """Distinct Facebook page ids, the same in every process."""
    return [str(108_000_000_000_000 + i * 17) for i in range(count)]


@dataclass(frozen=True)
class Fault:
    """What the stand-in answers instead of a listing: a bad token (190) or a throttle (80006/4)."""

    code: int
    regain_seconds: float = 0.0  # throttles: how long the page stays throttled


def _page_of(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if len(parts) >= 2 and parts[-1] == "conversations":
        return unquote(parts[-2])
    return None


class PagesStandin:
    """The stand-in for many pages: bench/graph_standin.py's app per page id, created when first asked."""

    def __init__(
        self,
        conversations: int | Mapping[str, int],
        messages: int = 3,
        latency_ms: float = 0,
        me_page: str = "104325188712345",
    ) -> None:
        self.conversations = conversations
        self.messages = messages
        self.latency_ms = latency_ms
        self.me_page = me_page
        self._apps: dict[str, ASGIApp] = {}

    def _app(self, page: str) -> ASGIApp:
        app = self._apps.get(page)
        if app is None:
            total = (
                self.conversations if isinstance(self.conversations, int) else self.conversations.get(page, 0)
            )
            app = self._apps[page] = create_standin(total, page, self.messages, self.latency_ms)
        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        page = _page_of(scope.get("path", "")) if scope["type"] == "http" else None
        await self._app(page or self.me_page)(scope, receive, send)


class StandinLimits:
    """ASGI middleware enforcing per-page and app-wide call limits (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        page_calls_per_second: int = 2,
        app_calls_per_second: int = 40,
        window_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.page_limit = page_calls_per_second
        self.app_limit = app_calls_per_second
        self.window = window_seconds
        self.clock = clock
        self.requests: dict[str, list[float]] = defaultdict(list)
        self.afters: dict[str, list[str | None]] = defaultdict(list)
        self.app_requests: list[float] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.refused: Counter[tuple[str, int]] = Counter()  # (page or "", code)
        self.while_throttled: Counter[str] = Counter()  # calls that arrived while the page was throttled
        self._app_window: deque[float] = deque()
        self._page_windows: dict[str, deque[float]] = defaultdict(deque)
        self._page_throttled: dict[str, float] = {}
        self._app_throttled = 0.0
        self._faults: dict[tuple[str, int], Fault] = {}
        self._refused_tokens: set[str] = set()

    # ---- test controls ---------------------------------------------------------------------------

    def fail_at(self, page: str, call: int, fault: Fault) -> None:
        """Answer the page's `call`-th request (1-based) with `fault`."""
        self._faults[(page, call)] = fault

    def refuse_token(self, token: str) -> None:
        """Answer code 190 to every request carrying this token from now on."""
        self._refused_tokens.add(token)

    def max_in_window(self, page: str, seconds: float | None = None) -> int:
        """The most requests of one page that arrived within any `seconds` (default: the window)."""
        span = self.window if seconds is None else seconds
        times = sorted(self.requests.get(page, []))
        best, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= span:
                start += 1
            best = max(best, end - start + 1)
        return best

    def stats(self) -> dict[str, Any]:
        """A summary of what the stand-in saw (the bench reads it over HTTP)."""
        times = sorted(self.app_requests)
        per_second: Counter[int] = Counter(int(t - times[0]) for t in times) if times else Counter()
        pages = list(self.requests)
        return {
            "calls": len(times),
            "first": times[0] if times else None,
            "last": times[-1] if times else None,
            "per_second": [per_second.get(i, 0) for i in range(max(per_second, default=-1) + 1)],
            "refused": {f"{page or 'app'}:{code}": n for (page, code), n in self.refused.items()},
            "refused_total": sum(self.refused.values()),
            "pages": len(pages),
            "max_in_flight": max(self.max_in_flight.values(), default=0),
            "max_page_calls_in_window": max((self.max_in_window(p) for p in pages), default=0),
            "while_throttled": sum(self.while_throttled.values()),
        }

    # ---- ASGI ------------------------------------------------------------------------------------

    def _slide(self, window: deque[float], now: float) -> None:
        while window and window[0] <= now - self.window:
            window.popleft()

    def _regain(self, window: deque[float], limit: int, now: float) -> float:
        """Seconds until the window holds fewer than `limit` calls again."""
        if len(window) < limit:
            return 0.0
        return max(0.0, window[len(window) - limit] + self.window - now)

    def _usage_headers(self, page: str | None, now: float, regain: float) -> list[tuple[bytes, bytes]]:
        app_pct = round(100 * len(self._app_window) / self.app_limit)
        headers = [
            (
                b"x-app-usage",
                _encode({"call_count": app_pct, "total_cputime": app_pct // 2, "total_time": app_pct // 2}),
            )
        ]
        if page is not None:
            page_pct = round(100 * len(self._page_windows[page]) / self.page_limit)
            entry = {
                "type": "messenger",
                "call_count": page_pct,
                "total_cputime": page_pct // 2,
                "total_time": page_pct // 2,
                "estimated_time_to_regain_access": math.ceil(regain / 60 * 100_000) / 100_000
                if regain > 0
                else 0,
            }
            headers.append((b"x-business-use-case-usage", _encode({page: [entry]})))
        return headers

    async def _answer(
        self, send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> None:
        payload = _encode(body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _error(self, code: int, page: str | None) -> dict[str, Any]:
        messages = {
            4: "(#4) Application request limit reached",
            80006: "(#80006) There have been too many messenger api calls to this Page account. "
            "Wait a bit and try again.",
            100: "(#100) Unsupported get request.",
            190: "Error validating access token: The session has been invalidated.",
        }
        self.refused[(page or "", code)] += 1
        return {
            "error": {
                "message": messages.get(code, f"(#{code}) Rate limited"),
                "type": "OAuthException",
                "code": code,
                "fbtrace_id": "AStandInLimits",
            }
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == STATS_PATH:
            await self._answer(send, 200, self.stats(), [])
            return
        now = self.clock()
        page = _page_of(path)
        self.app_requests.append(now)
        self._slide(self._app_window, now)
        self._app_window.append(now)
        token = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                token = value.decode("latin-1").partition(" ")[2]
        if page is not None:
            self.requests[page].append(now)
            after = parse_qs(scope.get("query_string", b"").decode()).get("after")
            self.afters[page].append(after[0] if after else None)
            window = self._page_windows[page]
            self._slide(window, now)
            window.append(now)
            fault = self._faults.pop((page, len(self.requests[page])), None)
            if fault is not None and fault.code == 190:
                self._refused_tokens.add(token)
            elif fault is not None:
                if fault.code == 4:
                    self._app_throttled = max(self._app_throttled, now + fault.regain_seconds)
                else:
                    self._page_throttled[page] = max(
                        self._page_throttled.get(page, 0.0), now + fault.regain_seconds
                    )
                headers = self._usage_headers(page, now, fault.regain_seconds)
                await self._answer(send, 400, self._error(fault.code, page), headers)
                return
        if token in self._refused_tokens:
            await self._answer(send, 400, self._error(190, page), self._usage_headers(page, now, 0))
            return
        if page is not None and self._page_throttled.get(page, 0.0) > now:
            regain = self._page_throttled[page] - now
            self.while_throttled[page] += 1
            await self._answer(send, 400, self._error(80006, page), self._usage_headers(page, now, regain))
            return
        if self._app_throttled > now or len(self._app_window) > self.app_limit:
            self._app_throttled = max(
                self._app_throttled, now + self._regain(self._app_window, self.app_limit, now)
            )
            regain = self._app_throttled - now
            await self._answer(send, 400, self._error(4, page), self._usage_headers(page, now, regain))
            return
        if page is not None and len(self._page_windows[page]) > self.page_limit:
            regain = self._regain(self._page_windows[page], self.page_limit, now)
            self._page_throttled[page] = now + regain
            await self._answer(send, 400, self._error(80006, page), self._usage_headers(page, now, regain))
            return
        extra = self._usage_headers(page, now, 0)

        async def send_with_usage(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if page is not None:
            self.in_flight[page] += 1
            self.max_in_flight[page] = max(self.max_in_flight[page], self.in_flight[page])
        try:
            await self.app(scope, receive, send_with_usage)
        finally:
            if page is not None:
                self.in_flight[page] -= 1


def main(argv: list[str] | None = None) -> None:
    """Serve the limited stand-in for many pages with uvicorn (the autopilot bench runs it)."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python bench/standin_limits.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--conversations", type=int, default=500, help="conversations of every page")
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--page-calls-per-second", type=int, default=2)
    parser.add_argument("--app-calls-per-second", type=int, default=40)
    args = parser.parse_args(argv)
    app = StandinLimits(
        PagesStandin(args.conversations, args.messages),
        page_calls_per_second=args.page_calls_per_second,
        app_calls_per_second=args.app_calls_per_second,
    )
    print(f"GRAPH_API_URL=http://{args.host}:{args.port}/v25.0", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
