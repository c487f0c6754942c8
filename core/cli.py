"""The command line: ``python app.py COMMAND`` (app.py's ``main()`` delegates here).

    serve [--host H] [--port P]      the HTTP service (uvicorn app:app with routes/limits.py's
                                     SERVER_OPTIONS; forwarded headers trusted only from
                                     FORWARDED_ALLOW_IPS, default 127.0.0.1)
    worker                           scheduler, housekeeping and webhook applier, no HTTP API,
                                     until SIGTERM or SIGINT (then running syncs stop at their
                                     last saved page and give their leases back)
    status                           every page's sync status, as a table
    sync PAGE_ID [--mode M]          sync a page from the terminal until it is done
    replay-webhooks                  apply failed and invalid inbox rows again
    migrate                          apply pending migrations
    api-keys create USER             a new key for USER (stored hashed; the key alone on the last line)
    api-keys list                    stored keys and API_KEYS entries (never a key)
    api-keys revoke ID               delete a stored key: it answers 401 at once, on every replica
    create-api-key USER              the same as api-keys create (the older name)

Every command reads the settings once, configures logging (LOG_FORMAT), and works on storage that
``core.services.opened_storage`` opens, migrates and closes: the one way a command gets storage.
Exit codes: 0 done, 1 the command failed (its message on stderr), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from core.logging import configure_logging
from core.services import opened_storage, running_services
from core.settings import ConfigError, Settings
from storage import Storage

log = logging.getLogger("messenger_sync")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="Messenger Sync Service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (uvicorn app:app)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes (>1: /metrics sums them, through PROMETHEUS_MULTIPROC_DIR)",
    )
    sub.add_parser("worker", help="run the scheduler, housekeeping and the webhook applier (no HTTP API)")
    sub.add_parser("status", help="print every page's sync status as a table")
    sync_cmd = sub.add_parser("sync", help="sync a page from the terminal, resuming until done")
    sync_cmd.add_argument("page_id", help="the pageId returned by POST /api/pages")
    sync_cmd.add_argument("--mode", choices=["incremental", "full"], default=None)
    sub.add_parser("replay-webhooks", help="apply failed and invalid inbox rows again")
    sub.add_parser("migrate", help="apply pending database migrations")
    keys = sub.add_parser("api-keys", help="create, list or revoke stored API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a user (shown once, on the last line)")
    create.add_argument("user")
    keys_sub.add_parser("list", help="list stored keys and the API_KEYS entries")
    revoke = keys_sub.add_parser("revoke", help="delete a stored key by its id")
    revoke.add_argument("key_id", help="the id `api-keys list` shows")
    alias = sub.add_parser("create-api-key", help="the same as `api-keys create USER`")
    alias.add_argument("user")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (see the module docstring); returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    command = args.command
    if command == "serve":
        return _serve(args.host, args.port, args.workers)
    if command == "worker":
        return asyncio.run(run_worker(settings))
    if command == "status":
        return asyncio.run(_status(settings))
    if command == "sync":
        return asyncio.run(_sync(settings, args.page_id, args.mode))
    if command == "replay-webhooks":
        return asyncio.run(_replay(settings))
    if command == "migrate":
        return asyncio.run(_migrate(settings))
    if command == "create-api-key":
        return asyncio.run(_keys(settings, "create", args.user))
    argument = getattr(args, "user", None) or getattr(args, "key_id", None)
    return asyncio.run(_keys(settings, args.keys_command, argument))


# ---- serve ------------------------------------------------------------------------------------


def _serve(host: str, port: int, workers: int = 1) -> int:
    import uvicorn

    from routes.limits import SERVER_OPTIONS

    if workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1:
        _fresh_metrics_dir()
    # No forwarded_allow_ips here: uvicorn then reads FORWARDED_ALLOW_IPS (default 127.0.0.1), so
    # X-Forwarded-For/-Proto are believed only from the proxy the deployment names, never from '*'.
    uvicorn.run("app:app", host=host, port=port, proxy_headers=True, workers=workers, **SERVER_OPTIONS)
    return 0


def _fresh_metrics_dir() -> None:
    """Several workers: /metrics must sum them, so give them an empty PROMETHEUS_MULTIPROC_DIR
    (the one configured, emptied: files of an earlier run would count again; else a new one).
    Set before uvicorn starts the workers, which read it when they import prometheus-client."""
    import tempfile
    from pathlib import Path

    from core.metrics import MULTIPROC_ENV, multiprocess_dir

    configured = multiprocess_dir()
    directory = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="messenger-sync-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    log.info("/metrics sums every worker through %s=%s", MULTIPROC_ENV, directory)


# ---- worker -----------------------------------------------------------------------------------


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Scheduler, housekeeping and applier in this process until SIGTERM/SIGINT (or `stop`)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        log.info("worker starting: %s", settings.describe())
        async with running_services(settings, http_api=False, worker=True):
            log.info(
                "worker running: scheduler %s, housekeeping on, applier on",
                "on" if settings.sync_interval_seconds > 0 else "off (SYNC_INTERVAL_SECONDS=0)",
            )
            await stop.wait()
            log.info("worker stopping: running syncs save their cursor and release their leases")
        log.info("worker stopped")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


# ---- status, sync, replay, migrate --------------------------------------------------------------


async def _status(settings: Settings) -> int:
    from sync.status import run_status_command

    async with opened_storage(settings) as storage:
        return await run_status_command(storage, settings)


async def _sync(settings: Settings, page_id: str, mode: str | None) -> int:
    from sync.command import run_sync_command

    async with opened_storage(settings) as storage:
        return await run_sync_command(settings, storage, page_id, mode)


async def _replay(settings: Settings) -> int:
    from webhook.applier import replay_webhooks

    async with opened_storage(settings) as storage:
        return await replay_webhooks(storage, settings)


async def _migrate(settings: Settings) -> int:
    from core.services import storage_from_settings

    # Not opened_storage: this command is the migration, and says what it applied.
    storage = await storage_from_settings(settings)
    try:
        applied = await storage.migrate()
    finally:
        await storage.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


# ---- api keys -------------------------------------------------------------------------------------


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def _keys(settings: Settings, action: str, argument: str | None) -> int:
    async with opened_storage(settings) as storage:
        if action == "create":
            assert argument is not None
            return await _create_key(storage, argument)
        if action == "list":
            return await _list_keys(storage, settings)
        assert argument is not None
        return await _revoke_key(storage, settings, argument)


async def _create_key(storage: Storage, user: str) -> int:
    from routes.auth import hash_key, new_key

    user = user.strip()
    if not user or "\x00" in user or ":" in user or "," in user:
        print("error: USER must be a non-empty name without ':' or ','", file=sys.stderr)
        return 2
    key = new_key()
    row = await storage.create_api_key(user, hash_key(key))
    print(f"API key {row.id} for {user}; it is stored hashed and will not be shown again:", file=sys.stderr)
    print(key)  # alone on the last line of stdout, for scripts: KEY=$(python app.py api-keys create u)
    return 0


async def _list_keys(storage: Storage, settings: Settings) -> int:
    rows = [("ID", "USER", "SOURCE", "CREATED", "LAST USED")]
    for key in await storage.list_api_keys():
        rows.append((str(key.id), key.user_id, "database", _when(key.created_at), _when(key.last_used_at)))
    for user in sorted(settings.api_keys.values()):
        rows.append(("-", user, "API_KEYS", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    if len(rows) == 1:
        print("(no keys: create one with `python app.py api-keys create USER`, or set API_KEYS)")
    return 0


async def _revoke_key(storage: Storage, settings: Settings, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        hint = ""
        if raw in settings.api_keys.values() or raw in settings.api_keys:
            hint = "; keys from API_KEYS are revoked by removing them from API_KEYS and restarting"
        # Not echoed: what was typed may be a key itself.
        print(f"error: ID must be a stored key's number (see `api-keys list`){hint}", file=sys.stderr)
        return 2
    revoked = await storage.revoke_api_key(int(raw))
    if revoked is None:
        print(f"error: no stored key with id {raw} (see `api-keys list`)", file=sys.stderr)
        return 1
    print(f"revoked key {revoked.id} of {revoked.user_id}: it answers 401 from now on")
    return 0
