"""The rate-limit pool: one Graph quota shared by every replica (SPEC semantics 13).

    PooledTransport(inner, pool)        an httpx transport under the Graph client's AsyncClient
      GET .../{page}/conversations      RatePool.acquire(page): wait for the page's slot and the app's
      any other Graph path (/me)        RatePool.acquire(None): the app's pacing only
      a hold past the wait allowed      a synthetic 429 in Graph's shape (Retry-After, regain time),
                                        which GraphClient handles as any rate limit
      after the answer                  RatePool.record: usage headers and throttle codes

The pool is the table ``rate_limit_pool``: one row for the app (``app``) and one per Facebook Page
(``page:<facebook page id>``, shared by every user's row of that Page). Every decision is one
transaction that locks the rows it reads (``storage.update_rate_pool``), judged by the database's
clock, so replicas see one pool:

* **Per page, a window, not an average**: a call is granted a send time at least
  ``(1000 + margin) / n`` ms after the page's previous one (``n`` = GRAPH_PAGE_CALLS_PER_SECOND,
  rounded down), so any n + 1 consecutive calls span more than a second. A call never goes before
  its slot (its sleep is measured from after the database read its clock); one that wakes more
  than ``tolerance`` after it (a busy event loop, a slow commit) gives its slot back and asks
  again, so a late call never lands closer than allowed to the next one either.
* **Held**: a throttle answer holds the page (codes 17, 32, 613, 80001, 80006; HTTP 429) or the
  whole app (code 4) until its regain time (``estimated_time_to_regain_access``, Retry-After, else
  a minute); every replica waits, and the scheduler does not start a held page.
* **App-wide pacing**: the app's calls are capped at ``rate_cap`` calls a second, spaced and also
  counted over the last second (so a lower cap never lets a denser past second add up). The cap
  follows X-App-Usage: ``target / usage`` times the calls of the last second (so usage settles at
  ``target`` percent), never more than ``growth`` times the last second's calls (a slow start:
  a fresh pool begins at ``start_rate``); it falls at once and rises gradually (by ``rise`` of
  the difference per answer), and is halved on code 4. App slots are granted at most
  ``app_horizon`` ahead, so a new cap applies at once rather than after a queue drains.
* **Page size**: "reduce the amount of data" is remembered per page; later requests for that page
  ask for the reduced ``limit`` for an hour, then try the full size again.

Code 4 is the app's limit; 17 (a user's limit) is treated as the page's, since the service calls
Graph with page tokens only; 32, 613, 80001 and 80006 are the page's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httpx
import msgspec

from core.errors import DatabaseUnavailable
from core.settings import Settings
from schema.graph import decode_app_usage, decode_business_usage, decode_error
from storage import Storage
from storage.base import PoolRow

if TYPE_CHECKING:
    from sync.scheduler import AutopilotMetrics

log = logging.getLogger(__name__)

APP_KEY = "app"
APP_THROTTLE_CODES = frozenset({4})
PAGE_THROTTLE_CODES = frozenset({17, 32, 613, 80001, 80006})
# A request's extensions may carry the time.monotonic() after which it must not wait for the pool.
DEADLINE_EXTENSION = "pool_deadline"
POOL_HEADER = "x-rate-limit-pool"
WINDOW_MS = 1000.0


def page_key(facebook_page_id: str) -> str:
    """The pool row of a Facebook Page."""
    return f"page:{facebook_page_id}"


def conversations_page(path: str) -> str | None:
    """The Facebook page id of a ``[/{version}]/{page_id}/conversations`` path, else None."""
    parts = path.strip("/").split("/")
    if len(parts) >= 2 and parts[-1] == "conversations" and parts[-2]:
        return unquote(parts[-2])
    return None


class PoolUnavailable(httpx.TransportError):
    """The pool could not be consulted: the call is not sent. (A database that cannot be reached
    raises DatabaseUnavailable instead, which the API answers 503 like any route that needs it.)"""


@dataclass(frozen=True)
class PoolPolicy:
    """The pool's rules; the defaults are the service's."""

    page_calls_per_second: float = 2.0
    tolerance_ms: float = 25.0  # how late after its slot a call may still go
    margin_ms: float = 100.0  # added to each page's second: the tolerance, then stalls and network jitter
    target_usage: float = 95.0  # X-App-Usage percent the app's pacing settles at
    app_horizon_ms: float = 250.0  # app slots are granted at most this far ahead
    start_rate: float = 10.0  # app calls a second before the pool knows better
    growth: float = 4.0  # the cap is at most this many times the last second's calls
    rise: float = 0.2  # the share of a higher estimate the cap takes per answer (it falls at once)
    min_rate: float = 1.0
    default_hold_ms: int = 60_000  # a throttle answer that says nothing of its regain time
    limit_memory_ms: int = 3_600_000

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolPolicy:
        """The service's policy: GRAPH_PAGE_CALLS_PER_SECOND per page. A fresh pool starts at
        the larger of 10 calls a second and one page's ceiling, so that tests and benchmarks
        that raise the ceiling (against a local stand-in) do not wait for a slow start."""
        rate = settings.graph_page_calls_per_second
        return cls(page_calls_per_second=rate, start_rate=max(cls.start_rate, rate))

    @property
    def page_spacing_ms(self) -> float:
        """Milliseconds between two calls of one page."""
        rate = self.page_calls_per_second
        if rate >= 1:
            return (WINDOW_MS + self.margin_ms) / math.floor(rate)
        return WINDOW_MS / rate + self.margin_ms


@dataclass(frozen=True)
class Decision:
    """What the pool decided for one call (database clock, ms)."""

    granted: bool
    at: float  # granted: the send time; else when to ask again
    db_now: int
    reason: str  # free | page_slot | app_slot | page_hold | app_hold
    hold_code: int | None = None
    page_limit: int | None = None


@dataclass(frozen=True)
class Observation:
    """What a Graph answer says about the quota."""

    status: int
    app_usage: float | None = None  # X-App-Usage, the highest of its percentages
    page_usage: float | None = None  # X-Business-Use-Case-Usage / X-Page-Usage
    regain_ms: int | None = None  # estimated_time_to_regain_access
    retry_after_ms: int | None = None
    error_code: int | None = None
    reduce_data: bool = False
    limit_sent: int | None = None
    sent_at: float | None = None  # the call's granted send time (database clock, ms)


@dataclass(frozen=True)
class Grant:
    """A call may go now."""

    page_limit: int | None  # a reduced page size to ask for, if Graph asked for less data
    waited: float  # seconds
    sent_at: float  # the send time granted (database clock, ms)


@dataclass(frozen=True)
class Held:
    """The page (or the app) is held longer than the caller may wait."""

    until_ms: int  # database clock
    seconds: float
    code: int
    scope: str  # page | app


# The app row keeps its send times this long: a second for the window, and another so that an
# answer recorded late can still be matched with the calls sent in the second before it went.
SENDS_KEPT_MS = 2 * WINDOW_MS


def _sends(row: PoolRow, now: float) -> list[int]:
    return [t for t in (int(x) for x in row.recent_sends.split(",") if x) if t > now - SENDS_KEPT_MS]


def _in_second_before(sends: list[int], at: float) -> int:
    """How many sends fell in the second up to `at` (inclusive)."""
    return sum(1 for t in sends if at - WINDOW_MS < t <= at)


def decide_reserve(policy: PoolPolicy, key: str | None, now: int, rows: dict[str, PoolRow]) -> Decision:
    """Grant a send time to one call, or say when to ask again (rows are changed in place)."""
    app, page = rows[APP_KEY], rows.get(key) if key is not None else None
    holds = [(app.hold_until or 0, "app_hold", app.hold_code or 4)]
    if page is not None:
        holds.append((page.hold_until or 0, "page_hold", page.hold_code or 80006))
    until, reason, code = max(holds)
    if until > now:
        return Decision(False, float(until), now, reason, hold_code=code)
    if page is not None and page.next_slot > now + policy.tolerance_ms:
        # Not this page's turn yet. No app slot is taken meanwhile: one reserved for later would
        # leave a gap that no other page could use.
        return Decision(False, page.next_slot, now, "page_slot")
    ready = max(float(now), page.next_slot if page is not None else 0.0)
    cap = app.rate_cap or policy.start_rate
    sends = _sends(app, now)
    send = max(ready, app.next_slot)
    allowed = max(1, math.floor(cap))
    if len(sends) >= allowed:
        send = max(send, sends[-allowed] + WINDOW_MS)  # at most `allowed` in any one second
    if send > now + policy.app_horizon_ms:
        # A queue of slots granted far ahead would keep today's pace after the cap changes.
        return Decision(False, send - policy.app_horizon_ms, now, "app_slot")
    app.next_slot = send + WINDOW_MS / cap
    app.recent_sends = ",".join(str(t) for t in [*sends, math.ceil(send)])
    app.calls += 1
    limit = None
    if page is not None:
        page.next_slot = send + policy.page_spacing_ms
        page.calls += 1
        if page.page_limit is not None and now - (page.page_limit_at or 0) < policy.limit_memory_ms:
            limit = page.page_limit
    if send > ready + policy.tolerance_ms:
        reason = "app_slot"
    elif ready > now:
        reason = "page_slot"
    else:
        reason = "free"
    return Decision(True, send, now, reason, page_limit=limit)


def release_slot(policy: PoolPolicy, key: str | None, planned: float, rows: dict[str, PoolRow]) -> None:
    """Give back a slot granted at `planned` that its call woke too late to use (rows changed in
    place): its entry leaves the app's send log, and the page's next slot returns to `planned` if
    no later call of that page was granted meanwhile."""
    app = rows[APP_KEY]
    sends = [int(x) for x in app.recent_sends.split(",") if x]
    with contextlib.suppress(ValueError):
        sends.remove(math.ceil(planned))
        app.recent_sends = ",".join(str(t) for t in sends)
    page = rows.get(key) if key is not None else None
    if page is not None and abs(page.next_slot - (planned + policy.page_spacing_ms)) < 0.5:
        page.next_slot = planned


def decide_record(
    policy: PoolPolicy, key: str | None, obs: Observation, now: int, rows: dict[str, PoolRow]
) -> None:
    """Fold one Graph answer into the pool rows (changed in place)."""
    app, page = rows[APP_KEY], rows.get(key) if key is not None else None
    code = obs.error_code
    # A 429 without a Graph code is the page's when the call was a page's, else the app's.
    app_throttled = code in APP_THROTTLE_CODES or (obs.status == 429 and code is None and page is None)
    page_throttled = page is not None and (
        code in PAGE_THROTTLE_CODES or (obs.status == 429 and code not in APP_THROTTLE_CODES)
    )
    wait = obs.regain_ms or obs.retry_after_ms or policy.default_hold_ms

    sends = _sends(app, now)
    cap = max(policy.start_rate, policy.growth * _in_second_before(sends, now))
    if obs.app_usage is not None:
        app.usage_pct, app.usage_at = obs.app_usage, now
        # Usage counts the calls Graph had seen when this one arrived: compare it with the calls
        # sent in the second before this one was sent, not with those sent since.
        seen = _in_second_before(sends, obs.sent_at if obs.sent_at is not None else now)
        if obs.app_usage >= 1 and seen:
            cap = min(cap, seen * policy.target_usage / obs.app_usage)
    if app.rate_cap is not None and cap > app.rate_cap:
        # Down at once, up gradually: a call's usage is counted when it arrives, and calls granted
        # just before it may not have arrived yet, so one answer can make the limit look higher
        # than it is; a rise has to be seen again and again to be taken.
        cap = app.rate_cap + (cap - app.rate_cap) * policy.rise
    if app_throttled:
        app.hold_until = max(app.hold_until or 0, now + wait)
        app.hold_code = code or 4
        app.throttled += 1
        cap = min(cap, (app.rate_cap or cap) / 2)
    app.rate_cap = max(policy.min_rate, cap)

    if page is None:
        return
    if obs.page_usage is not None:
        page.usage_pct, page.usage_at = obs.page_usage, now
    if obs.regain_ms:  # Graph says the page is throttled for this long, whatever the answer
        page.hold_until = max(page.hold_until or 0, now + obs.regain_ms)
        page.hold_code = page.hold_code if code is None else code
    if page_throttled:
        page.hold_until = max(page.hold_until or 0, now + wait)
        page.hold_code = code or 80006
        page.throttled += 1
    if obs.reduce_data and obs.limit_sent:
        page.page_limit, page.page_limit_at = max(1, obs.limit_sent // 2), now
    elif page.page_limit is not None and now - (page.page_limit_at or 0) >= policy.limit_memory_ms:
        page.page_limit = page.page_limit_at = None  # try the full size again


def observe(
    status: int,
    headers: httpx.Headers,
    body: bytes | None,
    limit_sent: int | None = None,
    sent_at: float | None = None,
) -> Observation:
    """Read the usage headers and the error code (from an error body) of one Graph answer."""
    app = decode_app_usage(headers.get("x-app-usage"))
    page = decode_app_usage(headers.get("x-page-usage"))
    business = decode_business_usage(headers.get("x-business-use-case-usage"))
    page_percents = [e.percent for e in business] + ([page.percent] if page is not None else [])
    regain = max((e.estimated_time_to_regain_access for e in business), default=0.0)
    error = decode_error(body) if body else None
    retry_after = None
    raw = headers.get("retry-after")
    if raw is not None and raw.strip().isdigit():
        retry_after = int(raw.strip()) * 1000
    return Observation(
        status=status,
        app_usage=None if app is None else app.percent,
        page_usage=max(page_percents) if page_percents else None,
        regain_ms=math.ceil(regain * 60_000) if regain > 0 else None,
        retry_after_ms=retry_after,
        error_code=None if error is None else error.code,
        reduce_data=error is not None
        and error.code == 1
        and "reduce the amount of data" in error.message.lower(),
        limit_sent=limit_sent,
        sent_at=sent_at,
    )


class RatePool:
    """The pool as the Graph transport and the scheduler use it."""

    def __init__(
        self,
        storage: Storage,
        policy: PoolPolicy,
        *,
        metrics: AutopilotMetrics | None = None,
        max_wait_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.storage = storage
        self.policy = policy
        self.metrics = metrics
        self.max_wait_seconds = max_wait_seconds
        self._clock = clock
        self._sleep = sleep

    @staticmethod
    def _keys(facebook_page_id: str | None) -> list[str]:
        return [APP_KEY] if facebook_page_id is None else [APP_KEY, page_key(facebook_page_id)]

    async def acquire(self, facebook_page_id: str | None, deadline: float | None = None) -> Grant | Held:
        """Wait until the call may go (Grant), or say it is held past the wait allowed (Held).

        ``deadline`` is a ``time.monotonic()`` value; without it the wait for a hold is bounded
        by ``max_wait_seconds``. Slot waits (a fraction of a second) are always waited.
        """
        key = None if facebook_page_id is None else page_key(facebook_page_id)
        keys = self._keys(facebook_page_id)
        started = self._clock()
        late: float | None = None  # the send time of a grant this call woke too late for
        # Each pass sleeps until something it saw changes, so this bound is never the policy.
        for _ in range(1000):
            stamp = 0.0

            def decide(now: int, rows: dict[str, PoolRow], late: float | None = late) -> Decision:
                nonlocal stamp
                stamp = self._clock()  # after the database read its clock: never early
                if late is not None:
                    release_slot(self.policy, key, late, rows)
                return decide_reserve(self.policy, key, now, rows)

            try:
                decision = await self.storage.update_rate_pool(keys, decide)
            except DatabaseUnavailable:
                raise  # the database is away: 503 database_unavailable, as every route that needs it
            except Exception as exc:
                raise PoolUnavailable(f"rate-limit pool unavailable ({type(exc).__name__})") from exc
            late = None
            target = stamp + (decision.at - decision.db_now) / 1000
            wait = target - self._clock()
            if not decision.granted and decision.reason.endswith("hold"):
                allowed = self.max_wait_seconds
                if deadline is not None:
                    allowed = min(allowed, deadline - self._clock())
                if wait > allowed:
                    self.count("held")
                    return Held(
                        until_ms=int(decision.at),
                        seconds=wait,
                        code=decision.hold_code or 80006,
                        scope=decision.reason.removesuffix("_hold"),
                    )
            if wait > 0:
                await self._sleep(wait)
                if self.metrics is not None:
                    self.metrics.pool_wait.labels(decision.reason).observe(wait)
            if not decision.granted:
                continue
            if self._clock() - target > self.policy.tolerance_ms / 1000:
                # Woke too late (a busy loop, a slow commit): sent now, this call could land too
                # close to its page's next one. Give the slot back and ask again.
                self.count("late")
                late = decision.at
                continue
            return Grant(page_limit=decision.page_limit, waited=self._clock() - started, sent_at=decision.at)
        raise PoolUnavailable("rate-limit pool: no slot after many attempts")

    async def record(self, facebook_page_id: str | None, obs: Observation) -> None:
        """Fold a Graph answer into the pool."""
        key = None if facebook_page_id is None else page_key(facebook_page_id)

        def decide(now: int, rows: dict[str, PoolRow]) -> PoolRow:
            decide_record(self.policy, key, obs, now, rows)
            return rows[APP_KEY]

        app = await self.storage.update_rate_pool(self._keys(facebook_page_id), decide)
        if self.metrics is not None:
            if app.usage_pct is not None:
                self.metrics.pool_app_usage.set(app.usage_pct)
            if app.rate_cap is not None:
                self.metrics.pool_app_rate_cap.set(app.rate_cap)

    async def held_until(self, facebook_page_id: str) -> int | None:
        """Until when (database clock, ms) the page or the whole app is held, or None."""
        now, rows = await self.storage.rate_pool_rows(self._keys(facebook_page_id))
        holds = [r.hold_until for r in rows.values() if r.hold_until is not None and r.hold_until > now]
        return max(holds) if holds else None

    def count(self, outcome: str) -> None:
        """Count a Graph call (or a call held back) by outcome, in the metrics."""
        if self.metrics is not None:
            self.metrics.graph_calls.labels(outcome).inc()


class PooledTransport(httpx.AsyncBaseTransport):
    """Consults the pool before every Graph request and tells it what the answer said."""

    def __init__(self, inner: httpx.AsyncBaseTransport, pool: RatePool) -> None:
        self._inner = inner
        self._pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        page = conversations_page(request.url.path)
        deadline = request.extensions.get(DEADLINE_EXTENSION)
        ticket = await self._pool.acquire(page, deadline)
        if isinstance(ticket, Held):
            return held_response(request, ticket, page)
        limit_sent = _int(request.url.params.get("limit"))
        if page is not None and ticket.page_limit is not None and (limit_sent or 0) > ticket.page_limit:
            request = _with_limit(request, ticket.page_limit)
            limit_sent = ticket.page_limit
        response = await self._inner.handle_async_request(request)
        body = None
        if response.status_code != 200:
            # Error bodies are small: read them to learn the code, and hand on a fresh stream.
            raw = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
            await response.aclose()
            response = httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(raw),
                extensions=response.extensions,
                request=request,
            )
            decoded = httpx.Response(
                response.status_code, headers=response.headers, stream=httpx.ByteStream(raw)
            )
            body = await decoded.aread()
        obs = observe(response.status_code, response.headers, body, limit_sent, ticket.sent_at)
        throttled = obs.error_code in APP_THROTTLE_CODES | PAGE_THROTTLE_CODES or obs.status == 429
        self._pool.count("throttled" if throttled else "ok" if obs.status == 200 else "error")
        try:
            await self._pool.record(page, obs)
        except Exception:  # the answer still counts; the pool learns from the next one
            log.warning("could not record a Graph answer in the rate-limit pool", exc_info=True)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def held_response(request: httpx.Request, held: Held, facebook_page_id: str | None) -> httpx.Response:
    """A 429 in Graph's own shape for a call the pool holds back (marked with x-rate-limit-pool)."""
    until = datetime.fromtimestamp(held.until_ms / 1000, UTC).isoformat(timespec="seconds")
    body = {
        "error": {
            "message": f"Held back by the service's rate-limit pool until {until} ({held.scope} throttled)",
            "type": "OAuthException",
            "code": held.code,
            "fbtrace_id": "rate-limit-pool",
        }
    }
    minutes = held.seconds / 60
    usage = {facebook_page_id or "app": [{"type": "messenger", "estimated_time_to_regain_access": minutes}]}
    headers = {
        "content-type": "application/json",
        "retry-after": str(max(1, math.ceil(held.seconds))),
        "x-business-use-case-usage": msgspec.json.encode(usage).decode(),
        POOL_HEADER: "held",
    }
    return httpx.Response(429, headers=headers, content=msgspec.json.encode(body), request=request)


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _with_limit(request: httpx.Request, limit: int) -> httpx.Request:
    url = request.url.copy_set_param("limit", str(limit))
    return httpx.Request(
        request.method, url, headers=request.headers, stream=request.stream, extensions=request.extensions
    )
