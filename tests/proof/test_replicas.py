"""Three replicas on one PostgreSQL (issue 11 item 4): real `python app.py serve` processes sharing a
database, a Graph stand-in process, and an audit of every lock and sync_state change the database
committed (tests/helpers/replicas.py).

* Manual syncs of the same pages on all three replicas at once, again and again, while their
  schedulers sync the same pages: one holder at a time, every other caller answered 409
  `sync_in_progress` in the SPEC's shape, fencing tokens that only grow, complete and exact data.
* The same signed webhook bodies posted to all three at once: one inbox row per distinct body, one
  event per message.
* A replica paused (SIGSTOP) while it holds a page: another takes the page over once the lease expired
  on the database's clock, and the paused one, resumed, writes nothing and answers 409 `lease_lost`.
* A replica killed (-9) mid-backfill: the other two finish its pages after its leases expired, from the
  saved cursors.

Each test prints its figures (run with -s to see them) and the seed (REPLICAS_SEED replays a run).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from storage import Storage
from tests.helpers import APP_SECRET
from tests.helpers.autopilot import wait_until
from tests.helpers.replicas import (
    MESSAGES,
    Cluster,
    Page,
    Replica,
    audited_states,
    check_lock_audit,
    check_state_audit,
    cluster,
    pid_of,
    sample_locks,
    seed,
)
from tests.helpers.sync import assert_seed_checks
from tests.helpers.webhook import message_body
from webhook.signature import SIGNATURE_HEADER, sign

pytestmark = pytest.mark.postgres_only

SEED = seed()
RESULT_KEYS = {
    "success", "synced", "inserted", "updated", "unchanged", "skipped", "eventsInserted", "hasMore",
    "resumeSession", "syncSessionId", "durationMs",
}  # fmt: skip
BUSY = {"success": False, "error": "Sync already in progress", "code": "sync_in_progress"}


def replay() -> str:
    return f"(REPLICAS_SEED={SEED} replays this run)"


async def assert_data_complete(c: Cluster, storage: Storage) -> None:
    """Every page complete with what the stand-in serves, each message once (the seed's checks)."""
    await assert_seed_checks(storage)
    rows = await c.db.fetch(
        "SELECT p.id, (SELECT count(*) FROM messenger_conversations m WHERE m.page_id = p.id) AS convs, "
        "(SELECT count(*) FROM contact_interaction_events e WHERE e.page_id = p.id) AS events, "
        "s.is_complete FROM facebook_pages p LEFT JOIN sync_state s ON s.page_id = p.id"
    )
    want = c.standin_conversations
    got = {r["id"]: (r["convs"], r["events"], r["is_complete"]) for r in rows}
    assert got == {p.page_id: (want, want * MESSAGES, True) for p in c.pages}, replay()


async def scheduled_steps(c: Cluster) -> dict[str, Counter[str]]:
    """{replica: scheduled sync steps by outcome} from each live replica's /metrics."""
    steps: dict[str, Counter[str]] = {}
    for replica in c.replicas:
        if not replica.alive:
            continue
        samples = await replica.metrics()
        counts: Counter[str] = Counter()
        for name, value in samples.items():
            if name.startswith('autopilot_syncs_total{outcome="'):
                counts[name.split('"')[1]] += int(value)
        steps[replica.name] = counts
    return steps


async def test_concurrent_manual_and_scheduled_syncs_have_one_holder_at_a_time(
    db_url: str, direct_db_url: str, storage: Storage, tmp_path: Path
) -> None:
    """Every replica asks to sync every page at once, round after round (continuing the backfill, then
    full re-syncs), while the three schedulers sync the same pages (every second, 1 s steps).

    The database's record of every lock change shows one holder at a time (a lease acquired only once
    released or expired), tokens growing by one, every sync_state write made by the current holder;
    every answer is a result or the SPEC's 409 with the holder's expiresAt; the data ends complete:
    each page's conversations and messages exactly as the stand-in serves them, nothing twice.
    """
    print(f"\nREPLICAS_SEED={SEED}")
    started = time.monotonic()
    rng = random.Random(SEED)
    env = {"SYNC_INTERVAL_SECONDS": "1", "SYNC_TIME_BUDGET_SECONDS": "1", "SYNC_LOCK_TTL_SECONDS": "3"}
    async with cluster(
        db_url, tmp_path, conversations=120, latency_ms=30, env=env, direct_url=direct_db_url
    ) as c:
        pages = await c.register(3)  # their schedulers start backfilling them at once
        answers: list[tuple[str, Page, int, dict[str, Any]]] = []

        async def everyone_syncs_everything(**body: Any) -> None:
            calls = [(r, p) for p in pages for r in c.replicas]
            rng.shuffle(calls)  # who asks first changes from round to round
            responses = await asyncio.gather(*(r.sync(p, maxDurationMs=500, **body) for r, p in calls))
            answers.extend(
                (r.name, p, a.status_code, a.json()) for (r, p), a in zip(calls, responses, strict=True)
            )

        async def until_complete(least: int) -> None:
            deadline = time.monotonic() + 30
            rounds = 0
            while rounds < least or not await c.all_complete():
                assert time.monotonic() < deadline, f"not complete within 30 s:\n{await c.progress()}"
                await everyone_syncs_everything()
                rounds += 1

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_locks(db_url, stop))
        try:
            await until_complete(least=3)  # the backfill, resumed by whoever holds the lock
            for _ in range(3):  # full re-syncs, started by whichever replica wins
                await everyone_syncs_everything(mode="full")
            await until_complete(least=1)
        finally:
            stop.set()
            samples = await sampler
        await assert_data_complete(c, storage)
        audit = await c.lock_audit()
        locks = check_lock_audit(audit, c.names)
        states = check_state_audit(await c.state_audit(), c.names)
        steps = await scheduled_steps(c)
        sync_runs = {r.name: await r.metrics() for r in c.replicas}

    # Every answer is the SPEC's: a result, or 409 naming the holder's lease.
    refused: Counter[str] = Counter()
    for name, page, status, body in answers:
        assert status in (200, 409), (name, status, body)
        if status == 200:
            assert set(body) == RESULT_KEYS and body["success"] is True, body
        else:
            assert {k: v for k, v in body.items() if k != "expiresAt"} == BUSY, body
            # expiresAt is when the holder's lease ends: one the audit saw this page's lease have
            assert body["expiresAt"] in locks.expiries[page.page_id], (body, page)
            refused[name] += 1
    # The sampler saw nothing the audit missed (the audit is every committed state).
    assert samples <= audited_states(audit)
    # The scenario happened: contention, and sessions carried on by another replica than their starter.
    assert sum(refused.values()) > 0
    assert len(locks.acquisitions) >= 2 and max(len(w) for w in states.writers.values()) >= 2
    for name, counts in steps.items():
        assert counts["error"] == 0, (name, counts)
    assert sum(sum(c.values()) for c in steps.values()) > 0, "the schedulers never synced"
    for name, samples_of in sync_runs.items():
        outcomes = {k.split('"')[1] for k in samples_of if k.startswith("sync_runs_total{")}
        assert outcomes <= {"complete", "partial", "sync_in_progress"}, (name, outcomes)

    print(
        "figures: concurrent syncs",
        f"wall={time.monotonic() - started:.1f}s manual requests={len(answers)}",
    )
    for name in sorted({a[0] for a in answers}):
        mine = [a for a in answers if a[0] == name]
        print(
            f"  {name}: manual attempted={len(mine)} answered 200={sum(a[2] == 200 for a in mine)} "
            f"409={refused[name]} complete={sum(a[2] == 200 and not a[3]['hasMore'] for a in mine)}; "
            f"scheduled steps {dict(steps.get(name, {}))}; lease acquisitions={locks.acquisitions[name]} "
            f"sync_state writes={states.writes[name]}"
        )
    sessions = {p: len(s) for p, s in states.sessions.items()}
    print(
        f"  leases: acquisitions={sum(locks.acquisitions.values())} releases={locks.releases} "
        f"extensions={locks.extensions} takeovers={len(locks.takeovers)} cleanups={locks.cleanups} "
        f"last tokens={sorted(locks.last_token.values())}; sessions per page={sorted(sessions.values())}; "
        f"lock samples={len(samples)}"
    )


def signed(body: bytes) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(APP_SECRET.encode(), body), "Content-Type": "application/json"}


def webhook_bodies(
    rng: random.Random, fb_pages: list[str]
) -> tuple[list[bytes], dict[str, tuple[str, str, str]]]:
    """Distinct bodies, and {mid: (facebook page, contact, event type)} of every message they carry.

    One-message bodies (some echoes), two-message bodies that repeat a mid of another body (the same
    message delivered twice, in different bodies), and re-encodings of a body (other bytes, same
    messages): each distinct body is one inbox row, each mid one event.
    """
    contacts = [str(7_700_000_000_000_000 + rng.randrange(10**12)) for _ in range(6)]
    mids: dict[str, tuple[str, str, str]] = {}
    bodies: list[bytes] = []
    base = 1_764_421_200_000
    received: dict[str, tuple[int, str]] = {}  # messages from a contact: mid -> (timestamp, text)
    for i in range(48):
        mid = f"m_replica_{SEED}_{i}"
        page, contact = rng.choice(fb_pages), rng.choice(contacts)
        echo = rng.random() < 0.2
        mids[mid] = (page, contact, "message_sent" if echo else "message_received")
        if not echo:
            received[mid] = (base + i * 1000, f"hello {i}")
        bodies.append(message_body(mid, f"hello {i}", base + i * 1000, contact, page, echo=echo))
    for j in range(6):
        old = rng.choice(sorted(received))
        page, contact, _ = mids[old]
        new = f"m_replica_{SEED}_pair_{j}"
        mids[new] = (page, contact, "message_received")
        received[new] = (base + 100_000 + j, f"pair {j}")
        items = [
            {"sender": {"id": contact}, "recipient": {"id": page}, "timestamp": received[m][0],
             "message": {"mid": m, "text": received[m][1]}}
            for m in (old, new)
        ]  # fmt: skip
        entry = {"id": page, "time": received[new][0], "messaging": items}
        bodies.append(msgspec.json.encode({"object": "page", "entry": [entry]}))
    for body in rng.sample(bodies[:48], 6):
        bodies.append(msgspec.json.format(body, indent=2))  # the same JSON, other bytes
    assert len(set(bodies)) == len(bodies)
    return bodies, mids


async def test_the_same_webhook_bodies_posted_to_every_replica_are_stored_once(
    db_url: str, direct_db_url: str, storage: Storage, tmp_path: Path
) -> None:
    """Each signed body posted to the three replicas at the same moment (as Meta's retries may land):
    every post answered 200, one inbox row per distinct body, applied once by one of the replicas'
    appliers, and one event per message, even for a message repeated inside another body or in a
    re-encoded copy of its body."""
    print(f"\nREPLICAS_SEED={SEED}")
    started = time.monotonic()
    rng = random.Random(SEED)
    env = {"SYNC_INTERVAL_SECONDS": "0"}  # no syncs: only webhooks write
    async with cluster(db_url, tmp_path, conversations=1, env=env, direct_url=direct_db_url) as c:
        pages = await c.register(2)
        fb_to_page = {p.facebook_page_id: p.page_id for p in pages}
        bodies, mids = webhook_bodies(rng, list(fb_to_page))
        rng.shuffle(bodies)
        gate = asyncio.Semaphore(8)  # bodies in flight at once, each to the three replicas

        async def post_everywhere(body: bytes) -> list[tuple[int, str]]:
            async with gate:
                answers = await asyncio.gather(
                    *(r.http.post("/api/webhook", content=body, headers=signed(body)) for r in c.replicas)
                )
            return [(a.status_code, a.text) for a in answers]

        answers = await asyncio.gather(*(post_everywhere(body) for body in bodies))

        async def inbox() -> dict[str, int]:
            rows = await c.db.fetch("SELECT status, count(*) AS n FROM webhook_events GROUP BY status")
            return {r["status"]: int(r["n"]) for r in rows}

        async def nothing_pending() -> bool:
            return "pending" not in await inbox()

        async def still_pending() -> str:
            return f"inbox rows by status: {await inbox()}"

        await wait_until(nothing_pending, 20, still_pending)
        rows = await inbox()
        events = await c.db.fetch(
            "SELECT e.message_id, e.event_type, m.sender_id, p.facebook_page_id "
            "FROM contact_interaction_events e JOIN messenger_conversations m ON m.id = e.conversation_id "
            "JOIN facebook_pages p ON p.id = e.page_id"
        )
        conversations = await c.db.fetchval("SELECT count(*) FROM messenger_conversations")
        await assert_seed_checks(storage)
        applied_by = {
            r.name: int((await r.metrics()).get('webhook_inbox_rows_total{status="applied"}', 0))
            for r in c.replicas
        }

    posted = len(bodies) * len(c.replicas)
    statuses = Counter(status for group in answers for status, _ in group)
    assert statuses == {200: posted}, (statuses, replay())
    assert all(text == "EVENT_RECEIVED" for group in answers for _, text in group)
    # An exact repeat of a body is one inbox row (body_sha256 is unique): one row per distinct body.
    assert rows == {"applied": len(bodies)}, (rows, replay())
    # One event per message, of its kind, on the conversation of its page and contact; nothing else.
    stored = Counter(r["message_id"] for r in events)
    assert stored == dict.fromkeys(mids, 1), replay()
    found = {r["message_id"]: (r["facebook_page_id"], r["sender_id"], r["event_type"]) for r in events}
    assert found == mids, replay()
    assert conversations == len({(page, contact) for page, contact, _ in mids.values()})
    # The replicas' appliers shared the rows: each row applied once in all.
    assert sum(applied_by.values()) == len(bodies), applied_by

    print(
        f"figures: webhooks wall={time.monotonic() - started:.1f}s posted={posted} "
        f"(distinct bodies={len(bodies)}, each to {len(c.replicas)} replicas) answered 200={statuses[200]} "
        f"inbox rows={len(bodies)} events stored={len(events)} (messages={len(mids)}) "
        f"conversations={conversations} rows applied by replica={applied_by}"
    )


async def test_a_paused_holder_is_taken_over_after_expiry_and_cannot_write(
    db_url: str, direct_db_url: str, storage: Storage, tmp_path: Path
) -> None:
    """SIGSTOP a replica while its manual sync holds the page and waits on Graph: the others are refused
    (409) until the lease expires on the database's clock, then one takes the page over and goes on with
    the session. Resumed while the new holder is mid-sync, the paused sync gets its Graph answer, but
    its write is refused (fencing): it answers 409 lease_lost and the page ends as if it never woke."""
    print(f"\nREPLICAS_SEED={SEED}")
    started = time.monotonic()
    # No background syncs, so that only the test's requests hold the page.
    env = {"SYNC_INTERVAL_SECONDS": "0", "SYNC_LOCK_TTL_SECONDS": "2", "SYNC_TIME_BUDGET_SECONDS": "30"}
    async with cluster(
        db_url, tmp_path, conversations=100, latency_ms=10, env=env, direct_url=direct_db_url
    ) as c:
        (page,) = await c.register(1)
        paused, others = c.replicas[0], c.replicas[1:]
        fb = page.facebook_page_id

        async def waits_on_call(call: int, synced: int) -> bool:
            """Graph's answer `call` is held, and the holder has written `synced` conversations."""
            held = [fb, call] in (await c.standin.stats())["held"]
            state = (await c.states()).get(page.page_id)
            return held and state is not None and state["total_synced"] == synced

        # The first sync writes Graph pages 1-3 (calls 1-3) and waits for call 4.
        await c.standin.hold(fb, 4)
        first = asyncio.create_task(paused.sync(page, maxDurationMs=20_000))
        await wait_until(lambda: waits_on_call(4, 30), 20, c.progress)
        lease = (await c.locks())[page.page_id]
        assert pid_of(lease["locked_by"]) == paused.pid

        # Pause it just after a heartbeat (one every TTL/3): a pause inside the heartbeat's transaction
        # would keep the lock row locked, and every takeover waiting, until the resume.
        async def beat() -> bool:
            return bool((await c.locks())[page.page_id]["expires_at"] != lease["expires_at"])

        await wait_until(beat, 5, "no heartbeat")
        paused.signal(signal.SIGSTOP)
        paused_at = await c.db_now()

        # The others ask in turn: 409 while the paused lease runs, then one takes the page over. Its
        # sync goes on from the saved cursor (call 5 fetches Graph page 4 again), then waits for call 6.
        await c.standin.hold(fb, 6)

        async def try_to_take_over(replica: Replica) -> asyncio.Task[httpx.Response] | None:
            """Ask `replica` to sync the page: None when refused, else its sync, holding the page."""
            attempt = asyncio.create_task(replica.sync(page, maxDurationMs=20_000))

            async def answered_or_holding() -> bool:
                return attempt.done() or await waits_on_call(6, 40)

            await wait_until(answered_or_holding, 20, c.progress)
            if not attempt.done():
                return attempt
            answer = attempt.result()
            assert answer.status_code == 409, answer.text
            refused.append(answer.json())
            return None

        refused: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while (holding := await try_to_take_over(others[len(refused) % 2])) is None:
            assert time.monotonic() < deadline, "never taken over"
        taker = others[len(refused) % 2]

        # The paused holder wakes up with its Graph answer in hand, while the taker holds the page.
        await c.standin.release(fb, 4)
        paused.signal(signal.SIGCONT)
        resumed = await asyncio.wait_for(first, 30)
        await c.standin.release(fb, 6)
        taken = await asyncio.wait_for(holding, 30)
        await assert_data_complete(c, storage)
        final = (await c.states())[page.page_id]
        locks = check_lock_audit(await c.lock_audit(), c.names)
        states = check_state_audit(await c.state_audit(), c.names)

    # The paused holder was refused: it had lost its lease, and wrote nothing after its pause.
    assert resumed.status_code == 409, resumed.text
    body = resumed.json()
    assert body == {"success": False, "error": body["error"], "code": "lease_lost"}, body
    assert states.writes[paused.name] == 4  # the session's start and its first three pages, no more
    (takeover,) = locks.takeovers
    assert (takeover.previous, takeover.by) == (paused.name, taker.name)
    assert takeover.at >= takeover.expired_at >= paused_at  # after expiry on the database's clock
    # Until then every other caller was told the page is busy, until the paused lease's end.
    assert refused and all({k: v for k, v in r.items() if k != "expiresAt"} == BUSY for r in refused)
    assert max(r["expiresAt"] for r in refused) == takeover.expired_at, (refused, takeover)
    # The taker went on with the paused holder's session from its saved cursor, to the end.
    assert taken.status_code == 200, taken.text
    result = taken.json()
    assert len(states.sessions[page.page_id]) == 1, states.sessions
    (session,) = states.sessions[page.page_id]
    assert (result["syncSessionId"], result["synced"], result["hasMore"]) == (session, 70, False)
    assert (final["sync_session_id"], final["total_synced"], final["is_complete"]) == (session, 100, True)
    assert states.writers[(page.page_id, session)] == {paused.name, taker.name}
    print(
        f"figures: paused holder wall={time.monotonic() - started:.1f}s refusals while paused={len(refused)} "
        f"taken over by {taker.name} {takeover.at - takeover.expired_at} ms after expiry, "
        f"{takeover.at - paused_at} ms after the pause; the resumed holder answered {resumed.status_code} "
        f"{body['code']}; sync_state writes by replica={dict(states.writes)} "
        f"acquisitions={dict(locks.acquisitions)}"
    )


async def test_a_killed_replicas_pages_are_finished_by_the_others_after_its_leases_expire(
    db_url: str, direct_db_url: str, storage: Storage, tmp_path: Path
) -> None:
    """kill -9 a replica whose scheduler holds pages mid-backfill: the survivors' schedulers take each
    of them over once its lease expired on the database's clock, carry on with the victim's session
    from its saved cursor, and every page ends complete."""
    print(f"\nREPLICAS_SEED={SEED}")
    started = time.monotonic()
    rng = random.Random(SEED)
    env = {
        "SYNC_INTERVAL_SECONDS": "60",  # one backfill each, no incremental reruns during the test
        "SYNC_CONCURRENCY": "2",  # so that the pages spread over the replicas
        "SYNC_TIME_BUDGET_SECONDS": "30",  # a replica keeps a page's lease for the whole backfill
        "SYNC_LOCK_TTL_SECONDS": "2",
    }
    async with cluster(
        db_url, tmp_path, conversations=150, latency_ms=50, env=env, direct_url=direct_db_url
    ) as c:
        await c.register(3)
        order = list(c.replicas)
        rng.shuffle(order)
        victim_pages: list[str] = []
        victims: list[Replica] = []

        async def someone_mid_backfill() -> bool:
            locks, states = await c.locks(), await c.states()
            for replica in order:  # a replica holding a page with some written and more to come
                held = [p for p, lock in locks.items() if pid_of(lock["locked_by"]) == replica.pid]
                if any(p in states and 20 <= states[p]["total_synced"] < 110 for p in held):
                    victim_pages.extend(held)  # every page it holds
                    victims.append(replica)
                    return True
            return False

        await wait_until(someone_mid_backfill, 20, c.progress)
        (victim,) = victims
        victim.kill()
        killed_at = await c.db_now()
        at_kill = await c.states()

        await wait_until(c.all_complete, 30, c.progress)
        await assert_data_complete(c, storage)
        final = await c.states()
        locks = check_lock_audit(await c.lock_audit(), c.names)
        states = check_state_audit(await c.state_audit(), c.names)
        calls = (await c.standin.stats())["calls"]
        survivors = {r.name for r in c.replicas if r is not victim}

    # Each page the victim held was taken over by a survivor, only once its lease had expired.
    taken = {t.page_id: t for t in locks.takeovers if t.previous == victim.name}
    assert set(taken) >= set(victim_pages), (victim_pages, locks.takeovers, replay())
    for page_id in victim_pages:
        takeover = taken[page_id]
        assert takeover.by in survivors
        assert takeover.at >= takeover.expired_at, takeover
        # On with the victim's session from its saved cursor: one session, in which each conversation
        # was counted once (no page written twice), written by the victim and then by a survivor.
        assert len(states.sessions[page_id]) == 1, (page_id, states.sessions[page_id], replay())
        (session,) = states.sessions[page_id]
        assert final[page_id]["total_synced"] == 150 and final[page_id]["completed_syncs"] == 1
        if page_id in at_kill:  # (else it was killed before it started the session)
            assert session == at_kill[page_id]["sync_session_id"] == final[page_id]["sync_session_id"]
            assert states.writers[(page_id, session)] >= {victim.name, takeover.by}
    print(
        f"figures: killed replica wall={time.monotonic() - started:.1f}s victim={victim.name} "
        f"held {len(victim_pages)} page(s) mid-backfill "
        f"(synced {[at_kill[p]['total_synced'] if p in at_kill else 0 for p in victim_pages]} of 150)"
    )
    for t in locks.takeovers:
        print(
            f"  takeover of {t.page_id} (token {t.token}) from {t.previous} by {t.by}: "
            f"{t.at - t.expired_at} ms after its lease expired, {t.at - killed_at} ms after the kill"
        )
    print(
        f"  acquisitions by replica={dict(locks.acquisitions)} takeovers={len(locks.takeovers)} "
        f"sync_state writes by replica={dict(states.writes)} "
        f"Graph calls per page={sorted(calls.values())} (15 without a kill)"
    )
