"""Wake-ups after commits: this process' subscribers, by channel and key.

A write transaction calls `conn.notify(channel, key)`; once it commits, the engine publishes the
wake-up here, and on PostgreSQL also sends it with `pg_notify` in the same transaction, so the
other replicas' listeners (a LISTEN on the direct connection, `DATABASE_DIRECT_URL`) publish it
in their process too. Subscribers still poll: a wake-up only cuts the wait short, so a missed
one (no direct connection, a listener reconnecting, SQLite's other processes) costs latency,
never an event. (procrastinate, pgqueuer, encode/broadcaster's postgres backend)

Channels: `inbox` (key "": rows were committed to the webhook inbox) and `events` (key: the page
row id whose events were written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

INBOX = "inbox"
EVENTS = "events"
CHANNELS = (INBOX, EVENTS)


class Subscription:
    """One subscriber's wake-ups: set by a commit, cleared by `wait`. Close it when done."""

    def __init__(self, notifier: Notifier, channel: str, key: str) -> None:
        self._notifier = notifier
        self.channel = channel
        self.key = key
        self.event = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for a wake-up; True if one came (it is then consumed)."""
        if not self.event.is_set():
            try:
                await asyncio.wait_for(self.event.wait(), seconds)
            except TimeoutError:
                return False
        self.event.clear()
        return True

    def close(self) -> None:
        """Stop receiving wake-ups."""
        self._notifier._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Notifier:
    """This process' subscribers; `publish` runs on the event loop's thread."""

    def __init__(self) -> None:
        self._subscribers: dict[tuple[str, str], set[Subscription]] = {}
        # Whether other processes' commits reach this one (a PostgreSQL listener is connected).
        self.shared = False

    def subscribe(self, channel: str, key: str = "") -> Subscription:
        """A subscription to `channel` wake-ups for `key`."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        subscription = Subscription(self, channel, key)
        self._subscribers.setdefault((channel, key), set()).add(subscription)
        return subscription

    def publish(self, channel: str, key: str = "") -> None:
        """Wake the subscribers of `channel` for `key`."""
        for subscription in self._subscribers.get((channel, key), ()):
            subscription.event.set()

    def publish_all(self, notes: Iterable[tuple[str, str]]) -> None:
        """`publish` each (channel, key)."""
        for channel, key in notes:
            self.publish(channel, key)

    def wake_everyone(self) -> None:
        """Wake every subscriber (wake-ups may have been missed, e.g. while a listener reconnected)."""
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription.event.set()

    def _remove(self, subscription: Subscription) -> None:
        key = (subscription.channel, subscription.key)
        subscriptions = self._subscribers.get(key)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscribers[key]
