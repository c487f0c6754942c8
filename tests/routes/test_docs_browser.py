"""GET /docs in a real browser (Debian's chromium, headless, driven by playwright): Swagger UI
renders every operation of /openapi.json from the service's own files, under its
Content-Security-Policy, with nothing refused and no request to another origin. Skipped, saying
why, only where chromium or playwright is absent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from routes.docs import openapi_document

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extras install it
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def chromium() -> Iterator[Any]:
    if sync_playwright is None:
        pytest.skip("playwright for Python is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


def test_docs_render_every_operation_under_the_csp(
    settings: Settings, chromium: Any, serve_in_thread: Callable[..., Any], engine: str
) -> None:
    if engine != "sqlite":
        pytest.skip("the page is the same on both engines")
    operations = sum(len(ops) for ops in openapi_document()["paths"].values())
    with serve_in_thread(settings) as base_url:
        page = chromium.new_page()
        problems: list[str] = []
        foreign: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(base_url) else foreign.append(r.url))
        page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(f"{base_url}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        shown = page.locator(".opblock").count()
        title = page.locator(".info .title").inner_text()
        page.close()
    assert shown == operations, (shown, operations)
    assert "Messenger Sync Service" in title
    assert problems == [] and foreign == []
