"""Settings, read once from the environment (and a `.env` file), typed, with the SPEC's defaults.

Secrets are held as `starlette.config.Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.config import Config
from starlette.datastructures import Secret

DEFAULT_DATABASE_URL = "sqlite:///./data/messenger.db"
DEFAULT_GRAPH_API_URL = "https://graph.facebook.com/v25.0"


def parse_api_keys(raw: str) -> dict[str, str]:
    """`user:key,user2:key2` -> {key: user}. Malformed items raise ValueError (at start-up)."""
    keys: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, key = item.partition(":")
        if not sep or not user.strip() or not key.strip():
            raise ValueError("API_KEYS must look like user:key,user2:key2")
        keys[key.strip()] = user.strip()
    return keys


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with. Build with `Settings.from_env()`."""

    database_url: str = DEFAULT_DATABASE_URL
    graph_api_url: str = DEFAULT_GRAPH_API_URL
    fb_app_secret: Secret | None = None
    fb_verify_token: Secret | None = None
    # {key: user}; a dict of Secrets would be awkward to look up, so keep the dict out of repr.
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    sync_lock_ttl_seconds: float = 300.0
    sync_time_budget_seconds: float = 50.0
    sqlite_synchronous: str = "NORMAL"
    sync_page_size: int = 100
    max_body_bytes: int = 1024 * 1024
    # Webhook group commit: at most this many bodies per transaction, waiting at most this long.
    webhook_batch_max: int = 256
    webhook_batch_wait_seconds: float = 0.0
    # Background applier: inbox rows per transaction, and how often it looks for work it was not told of.
    applier_batch_size: int = 200
    applier_poll_seconds: float = 0.25
    # While a burst saturates the intake, the applier yields to it for at most this long in a row.
    applier_max_yield_seconds: float = 30.0
    run_applier: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> Settings:
        """Read the SPEC's variables from `environ` (default: os.environ), then `env_file`."""
        if env_file is not None and not os.path.exists(env_file):
            env_file = None
        config = Config(env_file=env_file, environ=environ if environ is not None else os.environ)
        synchronous = config("SQLITE_SYNCHRONOUS", default="NORMAL").upper()
        if synchronous not in {"NORMAL", "FULL", "EXTRA", "OFF"}:
            raise ValueError("SQLITE_SYNCHRONOUS must be NORMAL or FULL")
        page_size = config("SYNC_PAGE_SIZE", cast=int, default=100)
        if not 1 <= page_size <= 100:
            raise ValueError("SYNC_PAGE_SIZE must be between 1 and 100")
        return cls(
            database_url=config("DATABASE_URL", default=DEFAULT_DATABASE_URL),
            graph_api_url=config("GRAPH_API_URL", default=DEFAULT_GRAPH_API_URL).rstrip("/"),
            fb_app_secret=config("FB_APP_SECRET", cast=Secret, default=None),
            fb_verify_token=config("FB_VERIFY_TOKEN", cast=Secret, default=None),
            api_keys=parse_api_keys(config("API_KEYS", default="")),
            sync_lock_ttl_seconds=config("SYNC_LOCK_TTL_SECONDS", cast=float, default=300.0),
            sync_time_budget_seconds=config("SYNC_TIME_BUDGET_SECONDS", cast=float, default=50.0),
            sqlite_synchronous=synchronous,
            sync_page_size=page_size,
        )
