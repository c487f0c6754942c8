"""What the service runs on, built in one place: the lifespan, ``python app.py worker`` and the
commands all open their resources here.

    storage_from_settings(settings)      the storage engine the settings name (not migrated)
    opened_storage(settings)             async with: storage opened, migrated, closed on exit
    running_services(settings, ...)      async with: a typed ``Services`` with everything started
                                         that the settings turn on, stopped in order on exit

``Services`` is the one object the lifespan yields (``request.state.services``; handlers read it
through ``routes.common.services(request)``). Nothing here is a module-level global: every app
and every command builds its own.

What starts where:

    component      uvicorn app:app                         python app.py worker
    inbox writer   always (the webhook's group commit)     no (no HTTP API)
    applier        settings.applier_enabled                 yes
    scheduler      settings.scheduler_enabled (syncs)       yes, with housekeeping
                   and settings.background_work (housekeeping)

Every Graph call goes through the rate-limit pool (``sync.pool.PooledTransport`` under the
Graph client's ``httpx.AsyncClient``), so replicas and the worker share one quota.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from core.metrics import Metrics
from core.settings import Settings
from routes.stream import StreamSlots
from storage import Storage, open_storage
from sync.engine import SyncEngine
from sync.graph_client import GRAPH_TIMEOUT, GraphClient
from sync.pool import PooledTransport, PoolPolicy, RatePool
from sync.scheduler import AutopilotMetrics, Scheduler
from webhook.applier import Applier
from webhook.intake import InboxWriter

log = logging.getLogger(__name__)


async def storage_from_settings(settings: Settings) -> Storage:
    """Open (not migrate) the storage engine the settings name."""
    return await open_storage(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        direct_url=settings.database_direct_url,
        statement_cache=settings.database_statement_cache,
    )


@contextlib.asynccontextmanager
async def opened_storage(settings: Settings) -> AsyncIterator[Storage]:
    """Storage opened and migrated for the block, closed after it (every command uses this)."""
    storage = await storage_from_settings(settings)
    try:
        await storage.migrate()
        yield storage
    finally:
        await storage.close()


@dataclass
class KeyUse:
    """When this process last recorded each stored key's use (monotonic seconds, by key hash).

    A key's ``last_used_at`` is written at most once a minute per key: a request checks here
    first, and the UPDATE itself is conditional on the stored time being a minute old, so
    several replicas together also write it about once a minute.
    """

    every_seconds: float = 60.0
    _written: dict[str, float] = field(default_factory=dict)

    def due(self, key_hash: str, now: float) -> bool:
        """Whether the key's use should be written now (and note that it is)."""
        last = self._written.get(key_hash)
        if last is not None and now - last < self.every_seconds:
            return False
        if len(self._written) > 10_000:  # a bound, not a cache: forgetting only means one more write
            self._written.clear()
        self._written[key_hash] = now
        return True


@dataclass
class Services:
    """Everything a request handler or a background task of this process may use."""

    settings: Settings
    metrics: Metrics
    autopilot_metrics: AutopilotMetrics
    storage: Storage
    http: httpx.AsyncClient  # Graph's base URL, through the rate-limit pool
    pool: RatePool
    graph: GraphClient
    sync: SyncEngine
    applier: Applier
    scheduler: Scheduler
    inbox: InboxWriter | None  # None in the worker (no HTTP API)
    streams: StreamSlots = field(default_factory=StreamSlots)
    env_keys: dict[str, str] = field(default_factory=dict)  # {sha256 of an API_KEYS key: user}
    key_use: KeyUse = field(default_factory=KeyUse)


@contextlib.asynccontextmanager
async def running_services(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    graph_transport: httpx.AsyncBaseTransport | None = None,
    http_api: bool = True,
    worker: bool = False,
) -> AsyncIterator[Services]:
    """Open storage (migrated), the Graph client and the background work; stop them in order.

    ``http_api`` runs the webhook's inbox writer; ``worker`` runs the scheduler, housekeeping and
    the applier whatever BACKGROUND_WORK says (``python app.py worker``). ``graph_transport``
    stands in for the Graph API at the httpx layer (tests).
    """
    from routes.auth import hashed_env_keys  # the HTTP layer's key hashing, one definition

    metrics = metrics or Metrics()
    autopilot = AutopilotMetrics(metrics.registry)
    async with opened_storage(settings) as storage:
        pool = RatePool(storage, PoolPolicy.from_settings(settings), metrics=autopilot)
        inner = graph_transport or httpx.AsyncHTTPTransport()
        async with httpx.AsyncClient(
            base_url=settings.graph_api_url, timeout=GRAPH_TIMEOUT, transport=PooledTransport(inner, pool)
        ) as http:
            # The pool paces the app across replicas: the client's own pacing would pace twice.
            graph = GraphClient(http, pacing_max_delay=0.0)
            engine = SyncEngine(storage, graph, settings, metrics)
            inbox = InboxWriter(storage, settings, metrics) if http_api else None
            applier = Applier(
                storage, settings, metrics, intake_saturated=inbox.saturated if inbox is not None else None
            )
            scheduler = Scheduler(storage, engine, settings, pool=pool, metrics=autopilot)
            services = Services(
                settings=settings,
                metrics=metrics,
                autopilot_metrics=autopilot,
                storage=storage,
                http=http,
                pool=pool,
                graph=graph,
                sync=engine,
                applier=applier,
                scheduler=scheduler,
                inbox=inbox,
                env_keys=hashed_env_keys(settings.api_keys),
            )
            if inbox is not None:
                inbox.on_commit = applier.notify
                await inbox.start()
            try:
                if worker or settings.applier_enabled:
                    await applier.start()
                # One task pair: syncs (only when SYNC_INTERVAL_SECONDS > 0) and housekeeping.
                if worker or settings.background_work:
                    await scheduler.start()
                yield services
            finally:
                # Before storage closes: scheduled and running syncs stop and give their locks
                # back, instead of leaving their pages locked for the lease's whole TTL.
                await scheduler.stop()
                await engine.aclose()
                await applier.stop()
                if inbox is not None:
                    await inbox.stop()
