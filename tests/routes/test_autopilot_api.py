"""The autopilot through the API: pages fill up with no sync call, their status shows each phase,
pages and conversations can be deleted, and `python app.py worker` does the background work for
an API-only app.

Graph is the stand-in behind its limits (bench/standin_limits.py, which records every request)
over httpx.ASGITransport, with /me answered by the `GraphMe` stand-in so that pages are registered
through POST /api/pages, their tokens verified, as in production. Waits are bounded; what is
asserted is what the API shows and what the stand-in and the database recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.standin_limits import Fault, StandinLimits, bench_page_ids
from core.records import ConversationRecord, EventRecord
from storage import Storage
from tests.helpers import KEYS, ROOT, GraphMe, auth_headers, free_port, page_token, running_app
from tests.helpers.autopilot import autopilot_settings, limited_standin, wait_until
from tests.helpers.storage import write_conversations

CONVERSATIONS = 5  # with SYNC_PAGE_SIZE=2: three Graph calls per page
HOUR_MS = 3_600_000


class GraphStandin(httpx.AsyncBaseTransport):
    """Graph for the app: /me from GraphMe (a token names its Page), the rest from the stand-in."""

    def __init__(self, standin: StandinLimits) -> None:
        self.me = GraphMe()
        self.standin = standin
        self._asgi = httpx.ASGITransport(app=standin)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.rstrip("/").endswith("/me"):
            return await self.me(request)
        return await self._asgi.handle_async_request(request)


async def register(http: httpx.AsyncClient, fb_page_id: str, user: str = "alice") -> str:
    response = await http.post(
        "/api/pages",
        json={"facebookPageId": fb_page_id, "accessToken": page_token(fb_page_id, user)},
        headers=auth_headers(user),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["pageId"])


async def pages(http: httpx.AsyncClient, user: str = "alice") -> dict[str, dict[str, Any]]:
    response = await http.get("/api/pages", headers=auth_headers(user))
    assert response.status_code == 200, response.text
    return {p["pageId"]: p for p in response.json()["pages"]}


async def test_registered_pages_complete_by_themselves(db_url: str) -> None:
    settings = autopilot_settings(db_url)  # scheduler on, SYNC_INTERVAL_SECONDS=3600
    graph = GraphStandin(limited_standin(CONVERSATIONS))
    fb_ids = bench_page_ids(20)
    async with running_app(settings, transport=graph) as http:
        ids = [await register(http, fb) for fb in fb_ids]  # and nobody calls the sync API

        async def all_idle() -> bool:
            shown = await pages(http)
            return all(
                shown[i]["sync"]["phase"] == "idle" and shown[i]["sync"]["conversations"] == CONVERSATIONS
                for i in ids
            )

        async def describe() -> str:
            return str([p["sync"] for p in (await pages(http)).values()][:3])

        await wait_until(all_idle, 60, describe)
        shown = await pages(http)
        one = (await http.get(f"/api/pages/{ids[0]}", headers=auth_headers())).json()
        metrics = (await http.get("/metrics")).text

    for page_id, fb in zip(ids, fb_ids, strict=True):
        sync = shown[page_id]["sync"]
        assert sync["progress"] == {"sessionId": sync["progress"]["sessionId"], "synced": 5, "complete": True}
        assert (sync["lastError"], sync["until"]) == (None, None)
        assert sync["nextRun"] - sync["lastCompleteSync"] == HOUR_MS  # the next incremental sync
        assert graph.standin.max_in_flight[fb] == 1  # never walked by two syncs at once
        assert len(graph.standin.requests[fb]) == 3  # each walked once
    assert graph.standin.refused == {}
    assert one == shown[ids[0]]
    assert 'autopilot_syncs_total{outcome="complete"} 20.0' in metrics
    assert "graph_pool_calls_total" in metrics and "autopilot_scheduler_lag_seconds_count" in metrics


async def test_each_phase_shows_through_the_api(db_url: str) -> None:
    settings = autopilot_settings(db_url)
    standin = limited_standin(7, latency_ms=150)  # four calls a page, slow enough to be seen running
    token_fb, error_fb, limited_fb, ok_fb = bench_page_ids(4)
    standin.fail_at(token_fb, 2, Fault(190))
    standin.fail_at(error_fb, 1, Fault(100))  # an error retries cannot cure
    standin.fail_at(limited_fb, 1, Fault(80006, regain_seconds=600))
    graph = GraphStandin(standin)
    async with running_app(settings, transport=graph) as http:
        ids = {fb: await register(http, fb) for fb in (token_fb, error_fb, limited_fb, ok_fb)}
        first = (await pages(http))[ids[ok_fb]]["sync"]

        async def ok_running() -> bool:
            sync = (await pages(http))[ids[ok_fb]]["sync"]
            return sync["running"] and sync["progress"] is not None and not sync["progress"]["complete"]

        await wait_until(ok_running, 30, "the page never showed a running backfill")
        running = (await pages(http))[ids[ok_fb]]["sync"]

        expected = {
            token_fb: "paused_token_invalid",
            error_fb: "error",
            limited_fb: "rate_limited",
            ok_fb: "idle",
        }

        async def settled() -> bool:
            shown = await pages(http)
            return all(
                shown[ids[fb]]["sync"]["phase"] == phase for fb, phase in expected.items()
            ) and not any(p["sync"]["running"] for p in shown.values())

        async def describe() -> str:
            return str({fb: (await pages(http))[ids[fb]]["sync"] for fb in expected})

        await wait_until(settled, 30, describe)
        shown = {fb: (await pages(http))[ids[fb]]["sync"] for fb in expected}
        single = (await http.get(f"/api/pages/{ids[error_fb]}", headers=auth_headers())).json()["sync"]

    assert first["phase"] == "backfilling" and first["lastCompleteSync"] is None
    assert running["phase"] == "backfilling" and running["nextRun"] is None  # none while it runs
    paused = shown[token_fb]
    assert paused["nextRun"] is None and "190" in (paused["lastError"] or "")
    assert (
        paused["progress"]["synced"] == 2
        and not paused["progress"]["complete"]
        and paused["conversations"] == 2
    )
    error = shown[error_fb]
    assert error["until"] is not None and error["nextRun"] == error["until"]  # the backoff's next try
    assert "graph_request" in (error["lastError"] or "")
    limited = shown[limited_fb]
    assert limited["until"] is not None and limited["until"] - error["until"] > 60_000  # regain: 10 min
    assert shown[ok_fb]["conversations"] == 7 and shown[ok_fb]["lastError"] is None
    assert single == error


async def test_deleting_a_page_or_a_conversation_removes_only_its_rows(db_url: str, storage: Storage) -> None:
    settings = autopilot_settings(db_url, sync_interval_seconds=0.0)  # no background syncs here
    graph = GraphStandin(limited_standin(0))
    mine_fb, other_fb = bench_page_ids(2)

    def record(sender: str, mid: str) -> ConversationRecord:
        event = EventRecord(event_type="message_received", message_id=mid, event_timestamp=1_732_900_000_000)
        return ConversationRecord(sender_id=sender, events=[event], last_message="hi")

    async with running_app(settings, transport=graph) as http:
        mine = await register(http, mine_fb)
        other = await register(http, other_fb)
        bobs = await register(http, mine_fb, user="bob")  # bob's row of the same Page
        for page_id in (mine, other, bobs):
            await write_conversations(storage, page_id, [record("7701", "m_1"), record("7702", "m_2")])
        listed = (await http.get(f"/api/conversations?pageId={mine}", headers=auth_headers())).json()
        doomed, kept = (c["id"] for c in listed["conversations"])

        async def status(method: str, path: str, user: str = "alice") -> int:
            return (await http.request(method, path, headers=auth_headers(user))).status_code

        assert await status("DELETE", f"/api/conversations/{doomed}", "bob") == 404  # not bob's
        assert await status("DELETE", f"/api/conversations/{doomed}") == 204
        assert await status("DELETE", f"/api/conversations/{doomed}") == 404  # gone
        assert await status("GET", f"/api/conversations/{doomed}/events") == 404
        assert await status("GET", f"/api/conversations/{kept}/events") == 200
        for missing in ("999999999", "-1", "abc"):
            assert await status("DELETE", f"/api/conversations/{missing}") == 404
        left = (await http.get(f"/api/conversations?pageId={mine}", headers=auth_headers())).json()

        assert await status("DELETE", f"/api/pages/{mine}", "bob") == 404  # not bob's
        assert await status("DELETE", f"/api/pages/{mine}") == 204
        assert await status("DELETE", f"/api/pages/{mine}") == 404
        assert await status("GET", f"/api/pages/{mine}") == 404
        assert await status("GET", f"/api/conversations?pageId={mine}") == 404
        assert await status("GET", f"/api/conversations/{kept}/events") == 404  # went with its page
        assert await status("DELETE", "/api/pages/no-such-page") == 404
        remaining = await pages(http)
        bob_left = (await http.get(f"/api/conversations?pageId={bobs}", headers=auth_headers("bob"))).json()
        other_left = (await http.get(f"/api/conversations?pageId={other}", headers=auth_headers())).json()

    assert [c["id"] for c in left["conversations"]] == [kept]
    assert list(remaining) == [other]
    assert len(other_left["conversations"]) == 2 and len(bob_left["conversations"]) == 2
    for page_id in (other, bobs):
        (conversation, *_) = await storage.list_conversations(page_id, 10, None)
        assert len(await storage.list_events(conversation.id, 10, None)) == 1


# ---- the worker as a process of its own ------------------------------------------------------------


class Process:
    """A child process whose stderr is drained by a thread (kept for failure messages)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def log(self) -> str:
        return "".join(self.err)[-3000:]

    async def describe(self) -> str:
        """The end of its log (a wait's failure message)."""
        return self.log()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code (SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.close()
        return self.proc.returncode

    def close(self) -> None:
        """Kill it if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.close()


async def test_the_worker_command_finishes_pages_an_api_only_app_serves(
    db_url: str, storage: Storage, processes: list[Process]
) -> None:
    conversations = 300  # with SYNC_PAGE_SIZE=1: 300 calls a page, so SIGTERM lands mid-backfill
    port = free_port()
    standin = Process(
        [
            sys.executable,
            "bench/standin_limits.py",
            "--port",
            str(port),
            "--conversations",
            str(conversations),
            "--page-calls-per-second",
            "100000",
            "--app-calls-per-second",
            "100000",
        ],
        dict(os.environ),
    )
    processes.append(standin)
    graph_url = f"http://127.0.0.1:{port}/v25.0"

    async def standin_up() -> bool:
        assert standin.proc.poll() is None, standin.log()
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"http://127.0.0.1:{port}/_limits/stats")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_until(standin_up, 30, standin.describe)
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "GRAPH_API_URL": graph_url,
        "API_KEYS": ",".join(f"{user}:{key}" for user, key in KEYS.items()),
        "SYNC_INTERVAL_SECONDS": "3600",
        "SYNC_PAGE_SIZE": "1",
        "GRAPH_PAGE_CALLS_PER_SECOND": "100000",
        "BACKGROUND_WORK": "off",  # the worker runs its work whatever this says
    }
    api_settings = autopilot_settings(db_url, background_work=False, sync_page_size=1)
    fb_ids = bench_page_ids(3)
    for fb in fb_ids:  # as POST /api/pages stores them (the stand-in's /me names one Page only)
        await storage.register_page("alice", fb, f"EAAB-alice-{fb}", f"Page {fb}")

    async with running_app(api_settings, transport=httpx.AsyncHTTPTransport()) as http:
        before = await pages(http)
        assert all(p["sync"]["progress"] is None for p in before.values())  # nothing runs without a worker

        worker = Process([sys.executable, "app.py", "worker"], env)
        processes.append(worker)

        async def some_progress() -> bool:
            assert worker.proc.poll() is None, worker.log()
            return any(p["sync"]["running"] and p["sync"]["progress"] for p in (await pages(http)).values())

        await wait_until(some_progress, 60, worker.describe)
        assert worker.stop() == 0, worker.log()
        stopped = await pages(http)
        async with storage.engine.reader() as conn:
            held = await conn.fetch("SELECT page_id FROM sync_locks WHERE locked_by IS NOT NULL")

        again = Process([sys.executable, "app.py", "worker"], env)
        processes.append(again)

        async def all_idle() -> bool:
            assert again.proc.poll() is None, again.log()
            shown = await pages(http)
            return all(p["sync"]["phase"] == "idle" for p in shown.values())

        await wait_until(all_idle, 120, again.describe)
        done = await pages(http)
        assert again.stop() == 0, again.log()

    assert held == []  # the stopped worker gave its leases back
    assert any(not p["sync"]["running"] and p["sync"]["progress"] for p in stopped.values())
    assert "worker stopped" in worker.log()
    for page in done.values():
        assert page["sync"]["conversations"] == conversations and page["sync"]["progress"]["complete"]
    # The stopped sessions were continued, not restarted: one session per page, completed once.
    for page_id, page in done.items():
        unfinished = stopped[page_id]["sync"]["progress"]
        if unfinished is not None and not unfinished["complete"]:
            assert page["sync"]["progress"]["sessionId"] == unfinished["sessionId"]
