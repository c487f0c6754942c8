"""The service's exceptions, and the one place that turns them into JSON.

ServiceError                   status, code, message -> {"success": false, "error", "code"}
├── BadRequest                 400 bad_request (and subclasses with their own code)
│   ├── ValidationFailed       400 validation_error (msgspec's message, with its JSON path)
│   ├── InvalidResumeSession   400 invalid_resume_session
│   ├── InvalidToken           400 invalid_token (Graph code 190, or not printable ASCII)
│   └── InsufficientPermissions 400 insufficient_permissions (Graph codes 10, 200-299)
├── Unauthorized               401 unauthorized
├── PageTokenMismatch          403 page_token_mismatch (the token is not the page's own)
├── NotFound                   404 not_found
├── RequestTimeout             408 request_timeout (the body did not arrive in time)
├── SyncInProgress             409 sync_in_progress (+ expiresAt)
├── PayloadTooLarge            413 payload_too_large
├── TooManyStreams             429 too_many_streams (an API key's open event streams)
├── HeadersTooLarge            431 headers_too_large (request headers over 64 KiB in all)
├── ServiceUnavailable         503 service_unavailable
│   ├── DatabaseUnavailable    503 database_unavailable (the database cannot be reached)
│   ├── WebhookNotConfigured   503 webhook_not_configured (no FB_APP_SECRET)
│   └── ShuttingDown           503 shutting_down (the server stopped before the request ended)
├── LeaseLost                  409 lease_lost: a sync whose lock was taken over may not write
└── GraphError                 502 graph_error: the Graph API failed in a way retries cannot cure
    ├── GraphAuthError         502 graph_auth (code 190: the page must be re-authorized)
    ├── GraphRateLimited       502 graph_rate_limited
    ├── GraphUnavailable       502 graph_unavailable (5xx, timeouts, garbage, codes 1/2 after retries)
    ├── GraphRequestError      502 graph_request (codes 100, 10, 200, ...: not retried)
    │   └── GraphCursorRejected    the `after` cursor was refused: restart the walk from the top
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error the API answers with its own status and machine code."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        """The error body the SPEC gives: success false, a message and a machine code."""
        return {"success": False, "error": self.message, "code": self.code, **self.extra}


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class ValidationFailed(BadRequest):
    code = "validation_error"


class InvalidResumeSession(BadRequest):
    code = "invalid_resume_session"


class InvalidToken(BadRequest):
    code = "invalid_token"


class InsufficientPermissions(BadRequest):
    code = "insufficient_permissions"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class PageTokenMismatch(ServiceError):
    status_code = 403
    code = "page_token_mismatch"


class RequestTimeout(ServiceError):
    status_code = 408
    code = "request_timeout"


class TooManyStreams(ServiceError):
    status_code = 429
    code = "too_many_streams"


class HeadersTooLarge(ServiceError):
    status_code = 431
    code = "headers_too_large"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class SyncInProgress(ServiceError):
    status_code = 409
    code = "sync_in_progress"


class LeaseLost(ServiceError):
    status_code = 409
    code = "lease_lost"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "service_unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class WebhookNotConfigured(ServiceUnavailable):
    code = "webhook_not_configured"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class GraphError(ServiceError):
    status_code = 502
    code = "graph_error"

    def __init__(self, message: str, *, graph_code: int | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.graph_code = graph_code


class GraphAuthError(GraphError):
    code = "graph_auth"


class GraphRateLimited(GraphError):
    code = "graph_rate_limited"


class GraphUnavailable(GraphError):
    code = "graph_unavailable"


class GraphRequestError(GraphError):
    code = "graph_request"


class GraphCursorRejected(GraphRequestError):
    code = "graph_cursor_rejected"
