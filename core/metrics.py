"""Prometheus metrics, one registry per app (no process-wide globals).

Across the workers of one server (``uvicorn --workers N``): with PROMETHEUS_MULTIPROC_DIR set
(an empty directory, one per server start, writable by every worker) prometheus-client keeps
each process's values in files there, and ``render()`` answers /metrics with the sum over every
worker, whichever worker serves the request (MultiProcessCollector). Without it each process
counts alone, which is right for one worker per container (scale with replicas; the monitoring
system adds replicas up). Gauges say how to combine: a gauge every worker reads from the same
database (the inbox backlog) takes the most recent reading.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, if it is on in this process."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


class Metrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
            registry=r,
        )
        self.sync_runs = Counter("sync_runs", "Sync requests by outcome", ["outcome"], registry=r)
        self.sync_conversations = Counter(
            "sync_conversations", "Conversations written by sync", ["result"], registry=r
        )
        self.graph_requests = Counter(
            "graph_requests", "Graph API requests by outcome", ["outcome"], registry=r
        )
        self.webhook_received = Counter(
            "webhook_received", "Webhook POSTs by outcome", ["outcome"], registry=r
        )
        self.webhook_batch_size = Histogram(
            "webhook_commit_batch_size",
            "Bodies per inbox group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.webhook_applied = Counter(
            "webhook_inbox_rows",
            "Inbox rows processed by the applier, by the status they ended in (invalid: unreadable)",
            ["status"],
            registry=r,
        )
        self.webhook_unknown_items = Counter(
            "webhook_unknown_items",
            "Webhook items of a kind not stored (or without a contact), counted and left in the inbox",
            registry=r,
        )
        self.webhook_skipped_items = Counter(
            "webhook_skipped_items",
            "Webhook items that could not be read (wrong type, out of range), listed on their inbox row",
            registry=r,
        )
        self.webhook_apply_lag = Histogram(
            "webhook_apply_lag_seconds",
            "From inbox commit to applied",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
            registry=r,
        )
        self.webhook_pending = Gauge(
            "webhook_inbox_pending",
            "Pending inbox rows seen by the applier",
            registry=r,
            multiprocess_mode="livemostrecent",
        )

    def render(self) -> bytes:
        """The Prometheus text of every metric: this process's, or every worker's (see above)."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        _multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(combined)

    def close(self) -> None:
        """This process stops: its live gauges leave the multiprocess files (a no-op otherwise)."""
        if multiprocess_dir() is not None:
            _multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # untyped upstream
