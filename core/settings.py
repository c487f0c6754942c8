"""Settings, read once from the environment (and a `.env` file), typed, with the SPEC's defaults.

Secrets are held as `starlette.config.Secret`, whose repr never shows the value; a secret that
is set but empty counts as unset. A bad value raises `ConfigError`, whose message is one line
naming the variable (never its value when the variable is a secret); `python app.py` and
`uvicorn app:app` print that line and exit non-zero.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from starlette.config import Config
from starlette.datastructures import Secret

DEFAULT_DATABASE_URL = "sqlite:///./data/messenger.db"
DEFAULT_GRAPH_API_URL = "https://graph.facebook.com/v25.0"
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A configuration value the service cannot start with; the message names the variable."""


def _number(text: str) -> float:
    """A finite float (`inf` and `nan` are not durations)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_api_keys(raw: str) -> dict[str, str]:
    """`user:key,user2:key2` -> {key: user}. Malformed items raise ConfigError (at start-up)."""
    keys: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, key = item.partition(":")
        if not sep or not user.strip() or not key.strip():
            raise ConfigError("API_KEYS must look like user:key,user2:key2")
        keys[key.strip()] = user.strip()
    return keys


def redact_url(url: str) -> str:
    """A database URL fit for a log line: the password (if any) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with. Build with `Settings.from_env()`."""

    database_url: str = DEFAULT_DATABASE_URL
    database_direct_url: str | None = field(default=None, repr=False)
    database_statement_cache: bool = False
    graph_api_url: str = DEFAULT_GRAPH_API_URL
    fb_app_secret: Secret | None = None
    fb_verify_token: Secret | None = None
    # {key: user}; a dict of Secrets would be awkward to look up, so keep the dict out of repr.
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    admin_keys: frozenset[str] = field(default_factory=frozenset, repr=False)
    sync_lock_ttl_seconds: float = 300.0
    sync_time_budget_seconds: float = 50.0
    sqlite_synchronous: str = "NORMAL"
    sync_page_size: int = 100
    # Autopilot (SPEC semantics 12 and 13).
    sync_interval_seconds: float = 900.0
    sync_concurrency: int = 16
    background_work: bool = True
    webhook_retention_days: float = 30.0
    graph_page_calls_per_second: float = 2.0
    log_format: str = "text"
    max_body_bytes: int = 1024 * 1024
    # A request's body must have arrived this long after the request started (408 otherwise).
    body_timeout_seconds: float = 30.0
    # Webhook group commit: at most this many bodies per transaction, waiting at most this long.
    webhook_batch_max: int = 256
    webhook_batch_wait_seconds: float = 0.0
    # Background applier: inbox rows per transaction, and how often it looks for work it was not told of.
    applier_batch_size: int = 200
    applier_poll_seconds: float = 0.25
    # While a burst saturates the intake, the applier yields to it for at most this long in a row.
    applier_max_yield_seconds: float = 30.0
    run_applier: bool = True

    @property
    def applier_enabled(self) -> bool:
        """Whether this process runs the background webhook applier."""
        return self.background_work and self.run_applier

    @property
    def scheduler_enabled(self) -> bool:
        """Whether this process runs background syncs (housekeeping runs with background work)."""
        return self.background_work and self.sync_interval_seconds > 0

    @property
    def engine_name(self) -> str:
        """`sqlite` or `postgresql`, from the URL scheme."""
        scheme = urlsplit(self.database_url).scheme
        return "postgresql" if scheme == "postgres" else scheme

    def describe(self) -> str:
        """One start-up line saying what is in use; never a secret (the password is redacted)."""

        def on(flag: bool) -> str:
            return "on" if flag else "off"

        return (
            f"engine={self.engine_name} database={redact_url(self.database_url)} "
            f"direct_connection={'set' if self.database_direct_url else 'unset'} "
            f"graph={self.graph_api_url} "
            f"webhook_secret={'set' if self.fb_app_secret is not None else 'unset'} "
            f"verify_token={'set' if self.fb_verify_token is not None else 'unset'} "
            f"api_keys={len(self.api_keys)} admin_keys={len(self.admin_keys)} "
            f"scheduler={on(self.scheduler_enabled)} applier={on(self.applier_enabled)} "
            f"housekeeping={on(self.background_work)}"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> Settings:
        """Read the SPEC's variables from `environ` (default: os.environ), then `env_file`.

        Raises ConfigError naming the first variable whose value cannot be used.
        """
        if env_file is not None and not os.path.exists(env_file):
            env_file = None
        config = Config(env_file=env_file, environ=environ if environ is not None else os.environ)

        def get(
            name: str, cast: Callable[[str], _T], default: _T, check: Callable[[_T], bool], rule: str
        ) -> _T:
            raw = config(name, default=None)
            if raw is None or str(raw).strip() == "":
                return default
            try:
                value = cast(str(raw).strip())
            except ValueError:
                raise ConfigError(f"{name} must be {rule} (got {str(raw)[:40]!r})") from None
            if not check(value):
                raise ConfigError(f"{name} must be {rule} (got {str(raw)[:40]!r})")
            return value

        def secret(name: str) -> Secret | None:
            raw = config(name, default=None)
            return None if raw is None or str(raw) == "" else Secret(str(raw))

        def flag(text: str) -> bool:
            lowered = text.lower()
            if lowered in ("on", "true", "1", "yes"):
                return True
            if lowered in ("off", "false", "0", "no"):
                return False
            raise ValueError(text)

        database_url = str(config("DATABASE_URL", default="") or DEFAULT_DATABASE_URL).strip()
        scheme = urlsplit(database_url).scheme
        if scheme not in DATABASE_SCHEMES:
            raise ConfigError(
                f"DATABASE_URL has an unsupported scheme {scheme!r}: use sqlite:///path or postgresql://..."
            )
        direct = str(config("DATABASE_DIRECT_URL", default="") or "").strip() or None
        if direct is not None and urlsplit(direct).scheme not in ("postgresql", "postgres"):
            raise ConfigError("DATABASE_DIRECT_URL must be a postgresql:// URL")
        positive = "a number greater than 0"
        return cls(
            database_url=database_url,
            database_direct_url=direct,
            database_statement_cache=get(
                "DATABASE_STATEMENT_CACHE", flag, False, lambda v: True, "on or off"
            ),
            graph_api_url=str(config("GRAPH_API_URL", default="") or DEFAULT_GRAPH_API_URL)
            .strip()
            .rstrip("/"),
            fb_app_secret=secret("FB_APP_SECRET"),
            fb_verify_token=secret("FB_VERIFY_TOKEN"),
            api_keys=parse_api_keys(str(config("API_KEYS", default=""))),
            admin_keys=frozenset(
                k.strip() for k in str(config("ADMIN_KEYS", default="")).split(",") if k.strip()
            ),
            sync_lock_ttl_seconds=get("SYNC_LOCK_TTL_SECONDS", _number, 300.0, lambda v: v > 0, positive),
            sync_time_budget_seconds=get(
                "SYNC_TIME_BUDGET_SECONDS", _number, 50.0, lambda v: v > 0, positive
            ),
            sqlite_synchronous=get(
                "SQLITE_SYNCHRONOUS", str.upper, "NORMAL", lambda v: v in ("NORMAL", "FULL"), "NORMAL or FULL"
            ),
            sync_page_size=get(
                "SYNC_PAGE_SIZE", int, 100, lambda v: 1 <= v <= 100, "an integer from 1 to 100"
            ),
            sync_interval_seconds=get(
                "SYNC_INTERVAL_SECONDS", _number, 900.0, lambda v: v >= 0, "a number of seconds, 0 or more"
            ),
            sync_concurrency=get("SYNC_CONCURRENCY", int, 16, lambda v: v >= 1, "an integer of at least 1"),
            background_work=get("BACKGROUND_WORK", flag, True, lambda v: True, "on or off"),
            webhook_retention_days=get(
                "WEBHOOK_RETENTION_DAYS", _number, 30.0, lambda v: v >= 0, "a number of days, 0 or more"
            ),
            graph_page_calls_per_second=get(
                "GRAPH_PAGE_CALLS_PER_SECOND", _number, 2.0, lambda v: v > 0, positive
            ),
            log_format=get("LOG_FORMAT", str.lower, "text", lambda v: v in ("text", "json"), "text or json"),
        )
