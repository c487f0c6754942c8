"""GET /openapi.json covers every route of the app, and what the routes really answer validates
against it (jsonschema, draft 2020-12, as OpenAPI 3.1 uses); GET /docs serves Swagger UI from the
service itself under a Content-Security-Policy."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import httpx
import respx
from jsonschema import Draft202012Validator
from starlette.routing import Mount, Route

from app import create_app
from core.settings import Settings
from routes.docs import openapi_document
from storage import Storage
from tests.helpers import APP_SECRET, auth_headers, running_app
from tests.helpers.sync import PAGE_FB_ID, WALK, FakeGraph, chain


def test_every_route_of_the_app_is_in_the_document(settings: Settings) -> None:
    app = create_app(settings)
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    seen = set()
    for route in app.routes:
        if isinstance(route, Mount):  # static files (the dashboard's, Swagger UI's)
            continue
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method == "HEAD":
                continue
            seen.add((method, route.path))
            operation = document["paths"].get(route.path, {}).get(method.lower())
            assert operation is not None, f"{method} {route.path} is not in /openapi.json"
            errors = [s for s in operation["responses"] if s[0] in "45"]
            assert errors and all(
                operation["responses"][s]["content"]["application/json"]["schema"]["$ref"]
                == "#/components/schemas/ErrorBody"
                for s in errors
            )
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert documented == seen  # and nothing that is not a route
    Draft202012Validator.check_schema({**document["components"]["schemas"]["PageBody"]})


class Checker:
    """Validates real responses against the document the app serves."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: set[tuple[str, str, int]] = set()

    def __call__(self, response: httpx.Response, template: str) -> httpx.Response:
        method = response.request.method
        operation = self.document["paths"][template][method.lower()]
        documented = operation["responses"]
        status = str(response.status_code)
        assert status in documented, f"{method} {template} answered {status}, not documented: {response.text}"
        content = documented[status].get("content")
        if response.status_code == 204:
            assert content is None and response.content == b""
        else:
            media = response.headers["content-type"].split(";")[0]
            assert media in content, (media, content)
            schema = content[media]["schema"]
            if media == "application/json" and schema:
                root = {**schema, "components": self.document["components"]}
                Draft202012Validator(root).validate(response.json())
        self.checked.add((method, template, response.status_code))
        return response


async def test_real_responses_validate_against_the_document(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    FakeGraph(graph, chain(*WALK))
    alice, bob = auth_headers(), auth_headers("bob")
    async with running_app(settings, graph) as http:
        check = Checker((await http.get("/openapi.json")).json())
        registration = {"facebookPageId": PAGE_FB_ID, "accessToken": "EAAB-token-alice", "name": "Acme"}
        page_id = check(await http.post("/api/pages", json=registration, headers=alice), "/api/pages").json()[
            "pageId"
        ]
        check(await http.post("/api/pages", json=registration, headers=alice), "/api/pages")  # 200
        check(
            await http.post("/api/pages", json={"facebookPageId": "x y"}, headers=alice), "/api/pages"
        )  # 400
        check(await http.get("/api/pages", headers={"Authorization": "Bearer nope"}), "/api/pages")  # 401
        sync_body = {"pageId": page_id, "facebookPageId": PAGE_FB_ID}
        synced = check(
            await http.post("/api/conversations/sync", json=sync_body, headers=alice),
            "/api/conversations/sync",
        )
        assert synced.status_code == 200 and synced.json()["synced"] == 12
        check(
            await http.post("/api/conversations/sync-fixed", json=sync_body, headers=bob),
            "/api/conversations/sync-fixed",
        )
        check(await http.get("/api/pages", headers=alice), "/api/pages")
        check(await http.get(f"/api/pages/{page_id}", headers=alice), "/api/pages/{page_id}")
        check(await http.get(f"/api/pages/{page_id}", headers=bob), "/api/pages/{page_id}")  # 404
        check(
            await http.get(f"/api/pages/{page_id}/activity", headers=alice), "/api/pages/{page_id}/activity"
        )
        listed = check(
            await http.get(f"/api/conversations?pageId={page_id}&limit=5", headers=alice),
            "/api/conversations",
        ).json()
        check(await http.get("/api/conversations?pageId=x&limit=0", headers=alice), "/api/conversations")
        conversation = listed["conversations"][0]["id"]
        events = f"/api/conversations/{conversation}/events"
        check(
            await http.get(f"{events}?limit=2", headers=alice), "/api/conversations/{conversation_id}/events"
        )
        check(await http.get("/api/sync/active", headers=alice), "/api/sync/active")
        check(await http.get("/api/sync/stats", headers=alice), "/api/sync/stats")
        check(await http.post("/api/sync/locks/cleanup", headers=alice), "/api/sync/locks/cleanup")
        check(await http.get("/api/me", headers=alice), "/api/me")
        check(await http.get("/api/admin/inbox", headers=alice), "/api/admin/inbox")  # 403
        check(await http.post("/api/admin/inbox/replay", headers=alice), "/api/admin/inbox/replay")  # 403
        check(await http.get("/healthz"), "/healthz")
        check(await http.get("/readyz"), "/readyz")
        check(await http.get("/metrics"), "/metrics")
        body = b'{"object":"page","entry":[]}'
        signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
        check(
            await http.post("/api/webhook", content=body, headers={"X-Hub-Signature-256": signature}),
            "/api/webhook",
        )
        check(await http.post("/api/webhook", content=body), "/api/webhook")  # 401
        check(await http.get("/api/webhook?hub.mode=subscribe"), "/api/webhook")  # 403
        path = "/api/conversations/{conversation_id}"
        check(await http.delete(f"/api/conversations/{conversation}", headers=bob), path)  # 404
        check(await http.delete(f"/api/conversations/{conversation}", headers=alice), path)  # 204
        check(await http.delete(f"/api/pages/{page_id}", headers=alice), "/api/pages/{page_id}")  # 204
        check(await http.get("/"), "/")
        check(await http.get("/openapi.json"), "/openapi.json")
        check(await http.get("/docs"), "/docs")

    statuses = {(m, t): s for m, t, s in check.checked}
    assert ("POST", "/api/pages", 201) in check.checked and ("POST", "/api/pages", 200) in check.checked
    assert ("DELETE", "/api/pages/{page_id}", 204) in check.checked
    assert statuses[("GET", "/api/admin/inbox")] == 403
    assert len({t for _, t, _ in check.checked}) >= 20


async def test_docs_are_served_from_the_service_under_a_csp(settings: Settings) -> None:
    async with running_app(settings) as http:
        page = await http.get("/docs")
        assets = [
            await http.get(path)
            for path in (
                "/docs/assets/swagger-ui-bundle.js",
                "/docs/assets/swagger-ui.css",
                "/static/docs.js",
            )
        ]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-eval" not in csp and "default-src 'self'" in csp
    assert "<script>" not in page.text  # no inline script: the initializer is a file
    for src in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/static/docs.js"):
        assert src in page.text
    assert [a.status_code for a in assets] == [200, 200, 200]
    assert "SwaggerUIBundle" in assets[0].text and "/openapi.json" in assets[2].text
