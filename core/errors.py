"""The service's exceptions, and the one place that turns them into JSON.

ServiceError                   status, code, message -> {"success": false, "error", "code"}
├── BadRequest                 400 bad_request (and subclasses with their own code)
│   ├── ValidationFailed       400 validation_error (msgspec's message, with its JSON path)
│   └── InvalidResumeSession   400 invalid_resume_session
├── Unauthorized               401 unauthorized
├── NotFound                   404 not_found
├── SyncInProgress             409 sync_in_progress (+ expiresAt)
├── PayloadTooLarge            413 payload_too_large
├── ServiceUnavailable         503 service_unavailable
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


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


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
