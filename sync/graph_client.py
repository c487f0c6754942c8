"""The Graph API client: one page of a Page's Messenger conversations per call, faults handled.

Retry policy of ``fetch_conversations`` (SPEC semantics 8); no wait ever goes past ``deadline``:

* codes 1 and 2, HTTP 5xx, timeouts, transport errors and bodies that are not a Graph
  listing: retried after a full-jitter exponential backoff, ``uniform(0, min(cap, base * 2**n))``,
  up to ``max_attempts`` requests in all, then ``GraphUnavailable``;
* code 1 "reduce the amount of data": ``limit`` is halved (down to 1) and the request retried at once;
* rate limits (codes 4, 17, 32, 613, 80001, 80006; HTTP 429): wait what the server says (a
  ``Retry-After`` header, in seconds or as an HTTP date) or the usage headers say
  (``estimated_time_to_regain_access``; a fixed wait when X-App-Usage is at 100%), at least a
  backoff; ``GraphRateLimited`` with ``retryAfter`` when that passes the deadline or attempts run out;
* a ``Retry-After`` on any other retried answer (a 503) is honoured the same way, and is the
  ``retryAfter`` of the ``GraphUnavailable`` when the wait passes the deadline;
* 190: ``GraphAuthError`` at once; 100 about the ``after`` cursor: ``GraphCursorRejected``;
  other 100, 10, 200-299 and other 4xx: ``GraphRequestError``, never retried.

A listing whose ``paging.next`` gives no ``after`` cursor (neither in ``paging.cursors`` nor
in the ``next`` URL's query) comes back with ``paging_problem`` set: the caller must not take
it for the last page.

Usage headers above ``pacing_threshold`` percent delay the next request proportionally, so the
client slows down before Graph refuses. The access token travels only in the Authorization
header and is redacted from every error message and log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random as _random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from urllib.parse import quote

import httpx
import msgspec

from core.errors import (
    GraphAuthError,
    GraphCursorRejected,
    GraphError,
    GraphRateLimited,
    GraphRequestError,
    GraphUnavailable,
)
from schema.graph import (
    CONVERSATION_FIELDS,
    Conversation,
    ConversationList,
    EnvelopeError,
    GraphErrorDetail,
    decode_app_usage,
    decode_business_usage,
    decode_conversation_list,
    decode_error,
)

logger = logging.getLogger(__name__)

# Timeouts of the service's Graph HTTP client: Graph can take seconds to assemble a page.
GRAPH_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, 80001, 80006})
TRANSIENT_CODES = frozenset({1, 2})
AUTH_CODE = 190
_MAX_MESSAGE_CHARS = 500
MAX_RETRY_AFTER_SECONDS = 86_400.0  # a Retry-After beyond a day is taken as a day
_DELAY_SECONDS = re.compile(r"^\s*(\d{1,12})(\.\d*)?\s*$")
NO_NEXT_CURSOR = (
    "Graph's paging announces a next page but gives no cursor to it (no paging.cursors.after, "
    "no after parameter in paging.next); the sync stopped rather than skip the rest"
)


class ConversationsPage(msgspec.Struct, frozen=True, kw_only=True):
    """One fetched page: valid conversations, skipped (json_path, error) pairs and the next cursor."""

    records: list[Conversation]
    skipped: list[tuple[str, str]]
    next_cursor: str | None  # paging.cursors.after, only when Graph gives a paging.next
    limit_used: int  # the limit of the request that succeeded (halved on "reduce the amount of data")
    paging_problem: str | None = None  # set when paging.next gives no cursor: not the last page


class _Fault(Exception):
    """A failed attempt that may be retried."""

    def __init__(
        self,
        message: str,
        *,
        graph_code: int | None = None,
        rate_limited: bool = False,
        reduce_data: bool = False,
        wait: float = 0.0,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.graph_code = graph_code
        self.rate_limited = rate_limited
        self.reduce_data = reduce_data
        self.retry_after = retry_after  # the Retry-After header, in seconds, when the answer had one
        # The least wait the server asks for (Retry-After, usage headers), in seconds.
        self.wait = max(wait, retry_after or 0.0)


class GraphClient:
    """Calls the Graph API through an ``httpx.AsyncClient`` whose base_url is ``GRAPH_API_URL``.

    The HTTP client (and so its transport and timeouts) is created and closed by the caller.
    ``sleep``, ``random``, ``clock`` and ``wall_clock`` (epoch seconds, for a Retry-After given as
    an HTTP date) are injectable so that tests neither sleep nor guess.
    Pacing state (how long to hold back after high usage) lives on the instance.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        rate_limit_backoff_base: float = 5.0,
        usage_exhausted_wait: float = 60.0,
        pacing_threshold: float = 75.0,
        pacing_max_delay: float = 10.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rate_limit_backoff_base = rate_limit_backoff_base
        self._usage_exhausted_wait = usage_exhausted_wait
        self._pacing_threshold = pacing_threshold
        self._pacing_max_delay = pacing_max_delay
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._wall_clock = wall_clock
        self._app_not_before = 0.0
        self._page_not_before: dict[str, float] = {}

    async def fetch_conversations(
        self,
        facebook_page_id: str,
        access_token: str,
        *,
        after: str | None,
        limit: int,
        deadline: float,
    ) -> ConversationsPage:
        """Fetch one page of conversations (newest first) after the cursor ``after``.

        ``deadline`` is a ``time.monotonic()`` value: no backoff or pacing wait goes past it.
        Raises a ``GraphError`` subclass when retries cannot cure the failure.
        """
        limit = max(1, limit)
        failures = 0
        while True:
            await self._pace(facebook_page_id, deadline)
            try:
                listing = await self._attempt(facebook_page_id, access_token, after, limit)
            except _Fault as fault:
                if fault.reduce_data and limit > 1:
                    limit = max(1, limit // 2)
                    logger.warning(
                        "Graph asked page %s for less data; retrying with limit %d",
                        facebook_page_id,
                        limit,
                    )
                    continue
                failures += 1
                wait = self._wait_for(fault, failures)
                if failures >= self._max_attempts:
                    raise self._give_up(fault, wait, f"after {failures} attempts") from None
                if self._clock() + wait > deadline:
                    raise self._give_up(fault, wait, "no time left to retry") from None
                logger.warning(
                    "Graph fetch for page %s failed (attempt %d/%d): %s; retrying in %.2fs",
                    facebook_page_id,
                    failures,
                    self._max_attempts,
                    fault.message,
                    wait,
                )
                await self._sleep(wait)
                continue
            for path, message in listing.skipped:
                logger.warning(
                    "Skipped an invalid conversation of page %s at %s: %s",
                    facebook_page_id,
                    path,
                    message,
                )
            next_cursor = listing.next_cursor
            problem = None
            if next_cursor is None and listing.has_next:
                problem = NO_NEXT_CURSOR
                logger.warning("Graph listing of page %s: %s", facebook_page_id, problem)
            return ConversationsPage(
                records=listing.conversations,
                skipped=listing.skipped,
                next_cursor=next_cursor,
                limit_used=limit,
                paging_problem=problem,
            )

    async def _attempt(
        self, page_id: str, access_token: str, after: str | None, limit: int
    ) -> ConversationList:
        params = {
            "platform": "messenger",
            "fields": CONVERSATION_FIELDS,
            "limit": str(limit),
        }
        if after is not None:
            params["after"] = after
        try:
            response = await self._http.get(
                f"/{quote(page_id, safe='')}/conversations",
                params=params,
                headers={"Authorization": f"Bearer {access_token}"},
            )
        except httpx.TimeoutException as exc:
            raise _Fault(f"Graph API timed out ({type(exc).__name__})") from None
        except httpx.RequestError as exc:
            raise _Fault(f"Graph API unreachable ({type(exc).__name__})") from None
        regain = self._observe_usage(page_id, response.headers)
        if response.status_code == 200:
            try:
                return decode_conversation_list(response.content)
            except EnvelopeError:
                error = decode_error(response.content)
                if error is None:
                    raise _Fault("Graph API answered with an unexpected body") from None
                raise self._classify(error, 200, after, access_token, regain, None) from None
        retry_after = parse_retry_after(response.headers.get("retry-after"), self._wall_clock())
        error = decode_error(response.content)
        if error is not None:
            raise self._classify(error, response.status_code, after, access_token, regain, retry_after)
        status = response.status_code
        if status == 429:
            raise _Fault(
                "Graph API rate limit (HTTP 429)",
                rate_limited=True,
                wait=regain,
                retry_after=retry_after,
            )
        if status >= 500 or status == 408:
            raise _Fault(f"Graph API answered HTTP {status}", retry_after=retry_after)
        raise GraphRequestError(f"Graph API answered HTTP {status}")

    def _classify(
        self,
        error: GraphErrorDetail,
        status: int,
        after: str | None,
        access_token: str,
        regain: float,
        retry_after: float | None,
    ) -> Exception:
        """The exception for a Graph error body: a ``_Fault`` to retry, or a final ``GraphError``."""
        code = error.code
        text = _describe(error, access_token)
        lowered = error.message.lower()
        if code == AUTH_CODE:
            return GraphAuthError(text, graph_code=code)
        if code in RATE_LIMIT_CODES or status == 429:
            return _Fault(text, graph_code=code, rate_limited=True, wait=regain, retry_after=retry_after)
        if code == 1 and "reduce the amount of data" in lowered:
            return _Fault(text, graph_code=code, reduce_data=True)
        if code in TRANSIENT_CODES:
            return _Fault(text, graph_code=code, retry_after=retry_after)
        if code == 100 and after is not None and ("cursor" in lowered or "after" in lowered):
            return GraphCursorRejected(text, graph_code=code)
        if code in (10, 100) or 200 <= code <= 299:
            return GraphRequestError(text, graph_code=code)
        if error.is_transient or status >= 500:
            return _Fault(text, graph_code=code, retry_after=retry_after)
        return GraphRequestError(text, graph_code=code)

    def _wait_for(self, fault: _Fault, failures: int) -> float:
        """Seconds to wait before the next attempt: full-jitter backoff, or what usage headers ask."""
        base = self._rate_limit_backoff_base if fault.rate_limited else self._backoff_base
        backoff = self._random() * min(self._backoff_cap, base * 2.0 ** (failures - 1))
        return max(fault.wait, backoff)

    def _give_up(self, fault: _Fault, wait: float, why: str) -> GraphError:
        # retryAfter (the SPEC's camelCase) tells the caller when trying again is worth it.
        if fault.rate_limited:
            return GraphRateLimited(
                f"{fault.message} ({why})",
                graph_code=fault.graph_code,
                retryAfter=max(1, math.ceil(wait)),
            )
        if fault.retry_after is not None:  # the server named a time: pass it on
            return GraphUnavailable(
                f"{fault.message} ({why})",
                graph_code=fault.graph_code,
                retryAfter=max(1, math.ceil(wait)),
            )
        return GraphUnavailable(f"{fault.message} ({why})", graph_code=fault.graph_code)

    def _observe_usage(self, page_id: str, headers: httpx.Headers) -> float:
        """Record pacing from the usage headers; return the wait they ask for after a refusal."""
        now = self._clock()
        app = decode_app_usage(headers.get("x-app-usage"))
        page = decode_app_usage(headers.get("x-page-usage"))
        business = decode_business_usage(headers.get("x-business-use-case-usage"))
        if app is not None:
            self._app_not_before = now + self._pacing_delay(app.percent)
        page_percents = [entry.percent for entry in business]
        if page is not None:
            page_percents.append(page.percent)
        if page_percents:
            self._page_not_before[page_id] = now + self._pacing_delay(max(page_percents))
        regain_minutes = max((e.estimated_time_to_regain_access for e in business), default=0.0)
        if regain_minutes > 0:
            return regain_minutes * 60.0
        if max([app.percent if app else 0.0, *page_percents]) >= 100:
            return self._usage_exhausted_wait
        return 0.0

    def _pacing_delay(self, percent: float) -> float:
        if percent <= self._pacing_threshold:
            return 0.0
        share = (percent - self._pacing_threshold) / (100.0 - self._pacing_threshold)
        return self._pacing_max_delay * min(1.0, share)

    async def _pace(self, page_id: str, deadline: float) -> None:
        """Hold back after high usage, never past ``deadline``."""
        now = self._clock()
        not_before = max(self._app_not_before, self._page_not_before.get(page_id, 0.0))
        wait = min(not_before, deadline) - now
        if wait > 0:
            logger.info("Pacing Graph requests for page %s: waiting %.2fs", page_id, wait)
            await self._sleep(wait)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), or None.

    ``now`` is the wall clock (epoch seconds) an HTTP date is measured from; a date in the
    past is no wait. Waits beyond ``MAX_RETRY_AFTER_SECONDS`` are cut to it; a header that is
    neither form is ignored.
    """
    if not value:
        return None
    match = _DELAY_SECONDS.match(value)
    if match is not None:
        seconds = float(match.group(1) + (match.group(2) or "").rstrip("."))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _describe(error: GraphErrorDetail, access_token: str) -> str:
    """A message safe to show API users: Graph's own message and code, never the token."""
    code = f"code {error.code}"
    if error.error_subcode is not None:
        code += f", subcode {error.error_subcode}"
    message = error.message or "no message"
    if access_token:
        message = message.replace(access_token, "[redacted]")
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "..."
    return f"Graph API error ({code}): {message}"
