"""API keys: `Authorization: Bearer <key>`, from API_KEYS or created by `python app.py api-keys create`.

Keys are compared by their SHA-256 (keys are long random strings, so a fast hash is the
right tool); the database holds only hashes, and a new key is shown once. A stored key is looked
up in the database on every request (no cache), so a revoked key answers 401 at once on every
replica; its last use is recorded at most once a minute (core.services.KeyUse).

An admin key (ADMIN_KEYS) is a valid key that is also listed there, by the key itself or, for a
stored key, by its id; it sees the operator views (the inbox holds every tenant's bodies).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Mapping

from starlette.requests import Request

from core.errors import ServiceError, Unauthorized
from routes.common import services

log = logging.getLogger(__name__)


class AdminOnly(ServiceError):
    """403 admin_only: a valid key that ADMIN_KEYS does not list asked for an operator view."""

    status_code = 403
    code = "admin_only"


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "msk_" + secrets.token_urlsafe(32)


def hashed_env_keys(api_keys: Mapping[str, str]) -> dict[str, str]:
    """{key: user} from API_KEYS -> {hash: user}, so lookups never hold plain keys."""
    return {hash_key(key): user for key, user in api_keys.items()}


def _bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing bearer API key")
    return key.strip()


async def require_user(request: Request) -> str:
    """The user the request's bearer key belongs to; raises Unauthorized (401) otherwise."""
    digest = hash_key(_bearer_key(request))
    found = services(request)
    user = found.env_keys.get(digest)
    if user is not None:
        return user
    user = await found.storage.user_for_key_hash(digest)
    if user is None:
        raise Unauthorized("Invalid API key")
    if found.key_use.due(digest, time.monotonic()):
        try:
            await found.storage.touch_api_key(digest, int(found.key_use.every_seconds * 1000))
        except Exception as exc:  # a missed "last used" is not worth failing the request for
            log.warning("could not record an API key's last use: %s", type(exc).__name__)
    return user


async def is_admin(request: Request) -> bool:
    """Whether the request's key (already known valid) is listed in ADMIN_KEYS, itself or by its id."""
    admin_keys = services(request).settings.admin_keys
    if not admin_keys:
        return False
    key = _bearer_key(request)
    if key in admin_keys:
        return True
    # Only stored keys have ids; one query, and only when ADMIN_KEYS is set and the key is not in it.
    key_id = await services(request).storage.api_key_id(hash_key(key))
    return key_id is not None and str(key_id) in admin_keys


async def require_admin(request: Request) -> str:
    """The user of a valid admin key; 401 without a valid key, 403 admin_only for any other key."""
    user = await require_user(request)
    if not await is_admin(request):
        raise AdminOnly("This view needs an admin key (ADMIN_KEYS)")
    return user
