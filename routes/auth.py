"""API keys: `Authorization: Bearer <key>`, from API_KEYS or created by `create-api-key`.

Keys are compared by their SHA-256 (keys are long random strings, so a fast hash is the
right tool); the database holds only hashes, and a new key is shown once.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from starlette.requests import Request

from core.errors import Unauthorized


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "msk_" + secrets.token_urlsafe(32)


def hashed_env_keys(api_keys: Mapping[str, str]) -> dict[str, str]:
    """{key: user} from API_KEYS -> {hash: user}, so lookups never hold plain keys."""
    return {hash_key(key): user for key, user in api_keys.items()}


async def require_user(request: Request) -> str:
    """The user the request's bearer key belongs to; raises Unauthorized (401) otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing bearer API key")
    digest = hash_key(key.strip())
    user = request.state.env_keys.get(digest)
    if user is None:
        user = await request.state.storage.user_for_key_hash(digest)
    if user is None:
        raise Unauthorized("Invalid API key")
    return user
