"""The dashboard (GET /), over HTTP and end to end in headless Chromium.

The browser tests run the real service (uvicorn, SQLite in a temporary directory, the background
applier on) and bench/graph_standin.py as Graph, both as local processes on free loopback ports,
and drive Debian's chromium (`apt-get install chromium`) with playwright for Python, never a
browser playwright downloads. They are skipped, saying why, only where /usr/bin/chromium or
playwright is missing. Screenshots go to test-artifacts/dashboard/ (the test prints the path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from starlette.testclient import TestClient

from routes.dashboard import CONTENT_SECURITY_POLICY, STATIC
from storage import open_storage
from storage.base import SyncProgress
from tests.helpers import ROOT
from webhook.signature import sign

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # the skip below says so
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
PAGE_ID = "104325188712345"  # the stand-in's one Page
CONVERSATIONS = 600
SECRET = "browser-test-app-secret"
KEYS = {"alice": "key-alice-browser-0123456789", "bob": "key-bob-browser-0123456789"}
XSS = '<img src=x onerror="window.__xss=1">'
EXPECTED_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


# ---- the page over HTTP (no browser needed) -------------------------------------------------------


class _Markup(HTMLParser):
    """What the CSP would have to forgive: inline scripts, inline styles, event handler attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [f"{tag}[{n}]" for n in names if n == "style" or n.startswith("on")]
        urls = [n for n, v in attrs if (v or "").strip().lower().startswith("javascript:")]
        self.inline += [f"{tag}[{n}=javascript:]" for n in urls]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline <script> body")


def test_dashboard_is_served_with_a_strict_csp_and_no_inline_code(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == EXPECTED_CSP == CONTENT_SECURITY_POLICY
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    markup = _Markup()
    markup.feed(response.text)
    assert markup.inline == []
    assert [s.get("src") for s in markup.scripts] == ["/static/dashboard.js"]
    assert '<link rel="stylesheet" href="/static/dashboard.css">' in response.text


def test_static_files_are_the_services_own(client: TestClient) -> None:
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["x-content-type-options"] == "nosniff"
    style = client.get("/static/dashboard.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert client.get("/static/nothing.js").status_code == 404
    for escape in ("/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e/dashboard.py"):
        assert client.get(escape).status_code == 404, escape
    # Nothing the script shows is ever parsed as HTML or code.
    source = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, sink
    # The key travels as a header, never in a URL; EventSource could not send it.
    assert "EventSource(" not in source and "Bearer" in source


# ---- the browser test: processes ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """The running service and its Graph stand-in."""

    url: str
    database_url: str
    logs: list[Path]

    def api(self, method: str, path: str, user: str = "alice", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEYS[user]}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 60  # a bound for a broken start, not a timing check
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service on SQLite with the background applier, Graph stood in for by bench/graph_standin.py."""
    work = tmp_path_factory.mktemp("dashboard")
    graph_port, port = _free_port(), _free_port()
    standin_log, service_log = work / "graph_standin.log", work / "service.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with standin_log.open("wb") as out:
            # Each Graph answer takes 250 ms, so a sync of 12 pages needs several 2-second calls.
            standin = subprocess.Popen(
                [sys.executable, "bench/graph_standin.py", "--port", str(graph_port), "--page-id", PAGE_ID,
                 "--conversations", str(CONVERSATIONS), "--latency-ms", "250"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(standin)
        _wait_ready(f"http://127.0.0.1:{graph_port}/v25.0/me", standin, standin_log, token="EAAB-ready")
        database_url = f"sqlite:///{work}/dashboard.db"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "GRAPH_API_URL": f"http://127.0.0.1:{graph_port}/v25.0",
            "FB_APP_SECRET": SECRET,
            "FB_VERIFY_TOKEN": "browser-verify",
            "API_KEYS": ",".join(f"{user}:{key}" for user, key in KEYS.items()),
            "ADMIN_KEYS": KEYS["alice"],
            "BACKGROUND_WORK": "on",  # the applier: webhooks reach the tables, then the feed
            # Syncs run only when the dashboard asks; the test takes the lease itself as a scheduler would.
            "SYNC_INTERVAL_SECONDS": "0",
            "SYNC_PAGE_SIZE": "50",
            "GRAPH_PAGE_CALLS_PER_SECOND": "50",
            "LOG_FORMAT": "text",
        }
        with service_log.open("wb") as out:
            app = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(app)
        _wait_ready(f"http://127.0.0.1:{port}/readyz", app, service_log)
        yield Service(f"http://127.0.0.1:{port}", database_url, [service_log, standin_log])
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, driven by playwright (never a downloaded browser)."""
    if sync_playwright is None:
        pytest.skip("playwright for Python is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def artifacts(request: pytest.FixtureRequest) -> Path:
    """Where the screenshots go; printed in the run's output even when output is captured."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\ndashboard screenshots: {ARTIFACTS}", flush=True)
    return ARTIFACTS


class Watch:
    """Console errors, page errors and requests of one browser page, checked at the end."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message: Any) -> None:
        # The browser logs every answer >= 400 (the 403 and 409 the test provokes); a CSP violation
        # or a script error is what counts.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)


def _open(browser: Browser, service: Service, width: int, height: int) -> tuple[Any, Page, Watch]:
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(30_000)
    page = context.new_page()
    watch = Watch(page)
    page.goto(service.url + "/")
    return context, page, watch


def _sign_in(page: Page, user: str) -> None:
    page.fill("#key", KEYS[user])
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#app:not([hidden])")
    assert page.text_content("#who-user") == f"Signed in as {user}"


def _register(page: Page, fb_page_id: str, token: str, name: str = "") -> None:
    page.fill("#reg-page-id", fb_page_id)
    page.fill("#reg-token", token)
    page.fill("#reg-name", name)
    page.click("#reg-submit")


def _no_script_ran(page: Page) -> None:
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.evaluate("document.querySelectorAll('img').length") == 0


def _webhook(service: Service, mid: str, text: str, sender: str) -> None:
    now = int(time.time() * 1000)
    item = {"sender": {"id": sender}, "recipient": {"id": PAGE_ID}, "timestamp": now,
            "message": {"mid": mid, "text": text}}  # fmt: skip
    entry = {"id": PAGE_ID, "time": now, "messaging": [item]}
    body = msgspec.json.encode({"object": "page", "entry": [entry]})
    headers = {"X-Hub-Signature-256": sign(SECRET.encode(), body), "Content-Type": "application/json"}
    response = httpx.post(service.url + "/api/webhook", content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def _run_async(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine function to its end in a thread of its own (playwright's sync API runs a loop here)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fn()).result()


def _hold_lease(service: Service, page_id: str, synced: int) -> Any:
    """Take the page's sync lease the way the scheduler does, with some progress written."""

    async def hold() -> Any:
        storage = await open_storage(service.database_url)
        try:
            lease = await storage.acquire_sync_lock(page_id, "scheduler-stand-in", 120)
            assert lease is not None
            await storage.start_sync_session(lease, "alice", "held-session", "full")
            await storage.save_sync_progress(lease, SyncProgress(None, synced, None))
            return lease
        finally:
            await storage.close()

    return _run_async(hold)


def _release_lease(service: Service, lease: Any) -> None:
    async def release() -> None:
        storage = await open_storage(service.database_url)
        try:
            assert await storage.release_sync_lock(lease)
        finally:
            await storage.close()

    _run_async(release)


# ---- the browser test -------------------------------------------------------------------------------


def test_dashboard_end_to_end(browser: Browser, service: Service, artifacts: Path) -> None:
    context, page, watch = _open(browser, service, 1280, 900)
    try:
        page.screenshot(path=artifacts / "01-sign-in.png")
        _sign_in(page, "alice")
        assert page.is_visible("#inbox-card") and page.is_visible("#who-admin")

        # A token that is not the claimed Page's: the API's refusal shows, and stays until dismissed.
        _register(page, "999999999999999", "EAAB-stand-in-token")
        page.wait_for_selector("#reg-result.bad")
        assert "page_token_mismatch" in (page.text_content("#reg-result") or "")
        banner = page.locator("#errors .error", has_text="page_token_mismatch")
        banner.wait_for()
        page.wait_for_function("() => document.querySelector('#pages-status').textContent !== ''")
        page.screenshot(path=artifacts / "02-registration-refused.png")
        banner.locator("button").click()
        assert banner.count() == 0

        # A name is the operator's text, shown as text.
        _register(page, PAGE_ID, "EAAB-stand-in-token", name="Shop & <b>Co</b>")
        page.wait_for_selector("#reg-result.good")
        card = page.locator(".page[data-page-id] >> text=Shop & <b>Co</b>")
        card.wait_for()
        registered = service.api("GET", "/api/pages").json()["pages"]
        assert [p["facebookPageId"] for p in registered] == [PAGE_ID]
        page_id = registered[0]["pageId"]
        card_root = page.locator(f'.page[data-page-id="{page_id}"]')

        # Sync to the end: progress moves call after call, then the result stays.
        page.evaluate(
            """() => {
                window.__runs = [];
                new MutationObserver(() => {
                  const run = document.querySelector('.run');
                  if (run && run.dataset.state) window.__runs.push([run.dataset.state, +run.dataset.synced]);
                }).observe(document.body, {subtree: true, attributes: true,
                                           attributeFilter: ['data-state', 'data-synced']});
            }"""
        )
        card_root.locator(".sync-button").click()
        page.wait_for_selector('.run[data-state="running"]:not([data-synced="0"])')
        page.screenshot(path=artifacts / "03-sync-progress.png")
        page.wait_for_selector('.run[data-state="done"]', timeout=120_000)
        runs = page.evaluate("window.__runs")
        during = [synced for state, synced in runs if state == "running"]
        assert any(0 < n < CONVERSATIONS for n in during), runs  # it showed progress before the end
        assert during == sorted(during)
        assert runs[-1] == ["done", CONVERSATIONS]
        result = card_root.locator(".run-text").text_content() or ""
        assert f"{CONVERSATIONS} synced" in result and "synced to the end" in result
        before = page.text_content("#pages-status")
        page.wait_for_function(f"() => document.querySelector('#pages-status').textContent !== {before!r}")
        assert card_root.locator(".run-text").text_content() == result  # still there after a refresh
        status = service.api("GET", "/api/pages").json()["pages"][0].get("sync")
        if status is not None:  # the scheduler's page status, where it exists
            card_root.locator(".conversations-count", has_text=f"{CONVERSATIONS}").wait_for()
        page.screenshot(path=artifacts / "04-sync-done.png", full_page=True)

        # The chart: one bar per minute of the last hour, this minute's holding the synced events.
        page.wait_for_function("() => document.querySelectorAll('#chart svg rect').length === 60")
        page.wait_for_selector("#chart svg rect.bar:not(.zero)")

        # A webhook whose text is markup arrives live, as text; nothing in it runs.
        _webhook(service, "m_dashboard_xss", XSS, sender="7712345678901234")
        live = page.locator("#feed li", has_text=XSS)
        live.wait_for()
        assert live.locator(".content").text_content() == XSS
        _no_script_ran(page)
        page.screenshot(path=artifacts / "05-live-webhook.png", full_page=True)

        # The conversation browser: newest first (the webhook's), "More", then one conversation's events.
        newest = page.locator("#conversations li").first
        newest.filter(has_text=XSS).wait_for()
        assert page.locator("#conversations li").count() == 25
        page.click("#conversations-more")
        page.wait_for_function("() => document.querySelectorAll('#conversations li').length === 50")
        newest.click()
        page.wait_for_selector("#events-view:not([hidden])")
        event = page.locator("#events li", has_text=XSS)
        event.wait_for()
        assert event.locator(".type").text_content() == "message_received"
        _no_script_ran(page)
        page.screenshot(path=artifacts / "06-conversation.png", full_page=True)
        page.click("#back")
        page.locator("#conversations li").nth(1).click()
        page.wait_for_function("() => document.querySelectorAll('#events li').length > 0")
        assert "Message 0 of conversation 0" in (page.text_content("#events") or "")

        # A sync already holds the page (as a scheduled one would): the dashboard says so and shows
        # that sync's progress, then that it ended.
        lease = _hold_lease(service, page_id, synced=42)
        card_root.locator(".sync-button").click()
        page.wait_for_selector('.run[data-state="held"]')
        held = card_root.locator(".run-text")
        held.filter(has_text="42 synced").wait_for()
        assert "Another sync holds this page" in (held.text_content() or "")
        card_root.locator(".running").wait_for()
        page.screenshot(path=artifacts / "07-sync-held.png")
        _release_lease(service, lease)
        page.wait_for_selector('.run[data-state="held-done"]')

        # Inbox health for an admin key: the webhook was applied; replay finds nothing to requeue.
        page.wait_for_function("() => Number(document.querySelector('#inbox-applied').textContent) >= 1")
        assert page.text_content("#inbox-pending") == "0"
        page.click("#replay")
        page.locator("#replay-result", has_text="0 rows back to pending").wait_for()
        page.locator("#inbox-card").screenshot(path=artifacts / "08-inbox.png")
        _no_script_ran(page)
        assert watch.errors == []
        assert not any(KEYS["alice"] in url for url in watch.requests)  # the key is never in a URL
    finally:
        context.close()


def test_dashboard_at_420px_admin_and_plain_key(browser: Browser, service: Service, artifacts: Path) -> None:
    # alice has a page (registering it again only renews its token); bob has none yet.
    body = {"facebookPageId": PAGE_ID, "accessToken": "EAAB-stand-in-token"}
    assert service.api("POST", "/api/pages", json=body).status_code in (200, 201)
    context, page, watch = _open(browser, service, 420, 860)
    try:
        _sign_in(page, "alice")
        assert page.is_visible("#inbox-card")
        page.wait_for_selector(".page[data-page-id]")
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        page.screenshot(path=artifacts / "09-narrow-admin.png", full_page=True)

        page.click("#forget")
        page.wait_for_selector("#login:not([hidden])")
        watch.requests.clear()
        _sign_in(page, "bob")
        assert not page.is_visible("#inbox-card") and not page.is_visible("#who-admin")
        page.wait_for_selector("#no-pages:not([hidden])")  # alice's page is not bob's
        _register(page, PAGE_ID, "EAAB-bobs-token", name="Bob's copy")
        page.wait_for_selector(".page[data-page-id] >> text=Bob's copy")
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        assert not page.is_visible("#inbox-card")
        assert not any("/api/admin/" in url for url in watch.requests)
        me = service.api("GET", "/api/me", user="bob").json()
        assert me == {"user": "bob", "admin": False}
        assert service.api("GET", "/api/admin/inbox", user="bob").status_code == 403
        page.screenshot(path=artifacts / "10-narrow-plain-key.png", full_page=True)
        assert watch.errors == []
    finally:
        context.close()


def test_the_key_stays_in_the_tab(browser: Browser, service: Service) -> None:
    context, page, _ = _open(browser, service, 1024, 700)
    try:
        _sign_in(page, "bob")
        assert page.evaluate("sessionStorage.getItem('msync-key')") == KEYS["bob"]
        assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
        page.reload()
        page.wait_for_selector("#app:not([hidden])")  # the same tab keeps it
        other = context.new_page()
        other.goto(service.url + "/")
        other.wait_for_selector("#login:not([hidden])")  # another tab does not
    finally:
        context.close()
