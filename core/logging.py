"""Logging, configured once when the service or a command starts (never on import of a library module).

    configure_logging("text")   readable lines: time, level, logger, message [request id]
    configure_logging("json")   one JSON object a line (python-json-logger): time, level, logger,
                                message, request_id, and whatever a call passes in ``extra``
                                (a sync step logs page, session and counts that way)

uvicorn sets up its own loggers before it imports the app; configuring ours afterwards hands
``uvicorn``, ``uvicorn.error`` and ``uvicorn.access`` to the same handler, so their lines (access
lines included) come out in the same format. Only the lines uvicorn prints before the import
keep its own format. The request id of the request being served rides in a context variable,
set by the app's middleware, and every record gets it.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# Loggers whose routine lines would drown ours (one line per Graph request).
QUIET_LOGGERS = ("httpx", "httpcore")


# Query parameters whose values are secrets (the webhook's verify token; Graph-style tokens): an
# access line shows them as [redacted].
SECRET_PARAMS = re.compile(
    r"((?:^|[?&])(?:hub\.verify_token|access_token|api_key|key)=)[^&\s]*", re.IGNORECASE
)


def redact_query(path: str) -> str:
    """`path` with the values of secret query parameters replaced by [redacted]."""
    return SECRET_PARAMS.sub(r"\1[redacted]", path) if "=" in path else path


class AccessRedactFilter(logging.Filter):
    """Access lines (uvicorn.access: client, method, path with query, version, status) without the
    values of secret query parameters: GET /api/webhook carries the verify token in its query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            if isinstance(args[2], str):
                args[2] = redact_query(args[2])
                record.args = tuple(args)
        return True


class RequestIdFilter(logging.Filter):
    """Adds the current request id (or None) to every record, and a suffix for the text format."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        record.request_id = request_id
        record.request_suffix = f" [request {request_id}]" if request_id else ""
        return True


def _json_formatter() -> logging.Formatter:
    return JsonFormatter(
        JSON_FIELDS,
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        # The text format's helper field is not worth shipping.
        reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "request_suffix"],
        json_default=str,
    )


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send every logger (ours, uvicorn's, access lines) to one stderr handler in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(AccessRedactFilter())
    if log_format == "json":
        handler.setFormatter(_json_formatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_messenger_sync", False)]:
        root.removeHandler(old)
    handler._messenger_sync = True  # type: ignore[attr-defined]  # ours, replaced on reconfiguration
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def bind_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    """Make `request_id` the current request's id for log records (returns the reset token)."""
    return request_id_var.set(request_id)
