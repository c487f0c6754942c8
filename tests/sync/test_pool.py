"""The rate-limit pool: one quota for every replica (two storages on one database stand for two
replicas), through PooledTransport, against the Graph stand-in behind its limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from bench.standin_limits import Fault, StandinLimits
from core.errors import GraphRateLimited
from core.metrics import Metrics
from storage.base import PoolRow
from sync.graph_client import GraphClient
from sync.pool import (
    APP_KEY,
    POOL_HEADER,
    Held,
    Observation,
    PooledTransport,
    PoolPolicy,
    RatePool,
    decide_record,
    decide_reserve,
    page_key,
)
from sync.scheduler import AutopilotMetrics
from tests.helpers import GRAPH_URL
from tests.helpers.autopilot import Store, limited_standin, open_store

PAGE, OTHER = "104325188712345", "104325188799999"
LISTING = "/{page}/conversations"


@pytest.fixture
async def stores(db_url: str) -> AsyncIterator[tuple[Store, Store]]:
    first, second = await open_store(db_url), await open_store(db_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def pooled(
    store: Store,
    standin: StandinLimits | httpx.AsyncBaseTransport,
    per_second: float,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> tuple[httpx.AsyncClient, RatePool, AutopilotMetrics]:
    metrics = AutopilotMetrics(Metrics().registry)
    pool = RatePool(store, PoolPolicy(page_calls_per_second=per_second), metrics=metrics, sleep=sleep)
    inner = standin if isinstance(standin, httpx.AsyncBaseTransport) else httpx.ASGITransport(app=standin)
    http = httpx.AsyncClient(base_url=GRAPH_URL, transport=PooledTransport(inner, pool))
    return http, pool, metrics


async def get(http: httpx.AsyncClient, page: str, limit: int = 2) -> httpx.Response:
    return await http.get(
        LISTING.format(page=page), params={"limit": str(limit)}, headers={"Authorization": "Bearer t"}
    )


def late_count(metrics: AutopilotMetrics, outcome: str) -> float:
    return metrics.graph_calls.labels(outcome)._value.get()  # type: ignore[attr-defined]


async def test_one_page_never_gets_more_than_its_ceiling_from_two_replicas(
    stores: tuple[Store, Store],
) -> None:
    standin = limited_standin(10, page_calls_per_second=5)
    (a, _, _), (b, _, _) = pooled(stores[0], standin, 5), pooled(stores[1], standin, 5)
    async with a, b:
        answers = await asyncio.gather(*(get(http, PAGE) for http in (a, b) for _ in range(4)))
    assert [r.status_code for r in answers] == [200] * 8
    assert standin.refused == {}, standin.refused
    assert len(standin.requests[PAGE]) == 8
    assert standin.max_in_window(PAGE) <= 5, sorted(standin.requests[PAGE])


async def test_a_throttled_page_is_held_on_every_replica_and_only_that_page(
    stores: tuple[Store, Store],
) -> None:
    standin = limited_standin(10)
    standin.fail_at(PAGE, 1, Fault(80006, regain_seconds=30))
    (a, _, _), (b, pool_b, metrics_b) = pooled(stores[0], standin, 1000), pooled(stores[1], standin, 1000)
    async with a, b:
        refused = await get(a, PAGE)
        assert refused.json()["error"]["code"] == 80006  # Graph's own answer, recorded by replica A

        held = await pool_b.acquire(PAGE, deadline=time.monotonic() + 1)
        assert isinstance(held, Held) and held.scope == "page" and 28 < held.seconds <= 30
        synthetic = await get(b, PAGE)
        other = await get(b, OTHER)
        client = GraphClient(b, pacing_max_delay=0.0)
        with pytest.raises(GraphRateLimited) as raised:
            await client.fetch_conversations(PAGE, "t", after=None, limit=2, deadline=time.monotonic() + 1)

    assert synthetic.status_code == 429 and synthetic.headers[POOL_HEADER] == "held"
    assert int(synthetic.headers["retry-after"]) >= 29 and synthetic.json()["error"]["code"] == 80006
    assert int(raised.value.extra.get("retryAfter", raised.value.extra.get("retry_after", 0))) >= 29
    assert other.status_code == 200  # another page goes on
    assert len(standin.requests[PAGE]) == 1  # nothing more reached Graph for the held page
    held_until = await pool_b.held_until(PAGE)
    assert held_until is not None and await pool_b.held_until(OTHER) is None
    assert late_count(metrics_b, "held") >= 2


async def test_an_app_level_throttle_holds_every_page(stores: tuple[Store, Store]) -> None:
    standin = limited_standin(10)
    standin.fail_at(PAGE, 1, Fault(4, regain_seconds=30))
    (a, _, _), (b, pool_b, _) = pooled(stores[0], standin, 1000), pooled(stores[1], standin, 1000)
    async with a, b:
        assert (await get(a, PAGE)).json()["error"]["code"] == 4
        held = await pool_b.acquire(OTHER, deadline=time.monotonic() + 1)
        me = await b.get("/me", headers={"Authorization": "Bearer t"})
    assert isinstance(held, Held) and held.scope == "app" and held.code == 4
    assert me.status_code == 429 and me.json()["error"]["code"] == 4
    assert OTHER not in standin.requests


async def test_a_reduced_page_size_is_remembered_for_the_page(stores: tuple[Store, Store]) -> None:
    limits: list[tuple[str, str | None]] = []

    def graph(request: httpx.Request) -> httpx.Response:
        limits.append((request.url.path.split("/")[-2], request.url.params.get("limit")))
        if len(limits) == 1:
            error = {"code": 1, "message": "Please reduce the amount of data you're asking for, then retry"}
            return httpx.Response(500, json={"error": error})
        return httpx.Response(200, json={"data": []})

    (a, _, _), (b, _, _) = (pooled(s, httpx.MockTransport(graph), 1000) for s in stores)
    async with a, b:
        page = await GraphClient(a, pacing_max_delay=0.0).fetch_conversations(
            PAGE, "t", after=None, limit=100, deadline=time.monotonic() + 5
        )
        assert page.limit_used == 50
        await get(b, PAGE, limit=100)  # another replica, a new walk: asks for what Graph could serve
        await get(b, OTHER, limit=100)
    assert limits == [(PAGE, "100"), (PAGE, "50"), (PAGE, "50"), (OTHER, "100")]


async def test_a_call_that_wakes_too_late_gives_its_slot_back(stores: tuple[Store, Store]) -> None:
    standin = limited_standin(10, page_calls_per_second=5)
    sleeps: list[float] = []

    async def sleepy(seconds: float) -> None:
        # The first wait runs long, as on a busy event loop: that call must not go late.
        sleeps.append(seconds)
        await asyncio.sleep(seconds + (0.2 if len(sleeps) == 1 else 0.0))

    http, _, metrics = pooled(stores[0], standin, 5, sleep=sleepy)
    async with http:
        assert (await get(http, PAGE)).status_code == 200
        # A fresh pool spaces the app's calls (slow start), so this call is granted a slot a little
        # later, oversleeps it, gives it back and is granted again.
        for _ in range(2):
            assert (await get(http, OTHER)).status_code == 200
    assert late_count(metrics, "late") >= 1  # a loaded machine may oversleep more than once
    first, second = standin.requests[OTHER]
    assert second - first >= PoolPolicy(page_calls_per_second=5).page_spacing_ms / 1000 - 0.01
    assert standin.refused == {}


# ---- the pool's rules, without a database ---------------------------------------------------------------


def fresh(*keys: str) -> dict[str, PoolRow]:
    return {key: PoolRow(key=key) for key in (APP_KEY, *keys)}


def test_a_fresh_pool_starts_slowly_and_spaces_one_pages_calls() -> None:
    policy = PoolPolicy(page_calls_per_second=2)
    rows = fresh(page_key(PAGE), page_key(OTHER))
    first = decide_reserve(policy, page_key(PAGE), 1_000_000, rows)
    again = decide_reserve(policy, page_key(PAGE), 1_000_000, rows)
    other = decide_reserve(policy, page_key(OTHER), 1_000_000, rows)
    assert first.granted and first.at == 1_000_000
    assert (
        not again.granted and again.reason == "page_slot" and again.at == 1_000_000 + policy.page_spacing_ms
    )
    assert other.granted and other.at == 1_000_000 + 1000 / policy.start_rate  # the app's slow start


def test_the_app_cap_follows_usage_and_counts_the_last_second() -> None:
    policy = PoolPolicy()
    rows = fresh(page_key(PAGE))
    now = 1_000_000
    rows[APP_KEY].recent_sends = ",".join(
        str(now - 900 + 100 * i) for i in range(10)
    )  # 10 in the last second
    decide_record(policy, page_key(PAGE), Observation(status=200, app_usage=50.0, sent_at=now), now, rows)
    assert rows[APP_KEY].rate_cap == pytest.approx(
        10 * policy.target_usage / 50
    )  # 19/s: usage settles at 95%

    decide_record(policy, page_key(PAGE), Observation(status=200, app_usage=1.0, sent_at=now), now, rows)
    # Low usage: towards 4x the last second's calls (never more), a fifth of the way per answer.
    assert rows[APP_KEY].rate_cap == pytest.approx(19 + (policy.growth * 10 - 19) * policy.rise)
    for _ in range(50):
        decide_record(policy, page_key(PAGE), Observation(status=200, app_usage=1.0, sent_at=now), now, rows)
    assert rows[APP_KEY].rate_cap == pytest.approx(policy.growth * 10, rel=1e-3)

    rows[APP_KEY].rate_cap, rows[APP_KEY].next_slot = 3.0, 0.0
    rows[APP_KEY].recent_sends = f"{now - 500},{now - 400},{now - 300}"
    held = decide_reserve(policy, None, now, rows)
    assert not held.granted and held.reason == "app_slot"  # 3 in the last second already: wait
    granted = decide_reserve(policy, None, now + 500 - 200, rows)
    assert granted.granted and granted.at == now - 500 + 1000  # the oldest of the three leaves the window

    decide_record(policy, None, Observation(status=400, error_code=4, regain_ms=60_000), now, rows)
    assert rows[APP_KEY].hold_until == now + 60_000 and rows[APP_KEY].rate_cap == pytest.approx(1.5)
