"""Meta's webhook signature: ``X-Hub-Signature-256: sha256=<hex>``.

The hex digest is an HMAC-SHA256 of the raw request body keyed with the app secret.
It must be checked over the bytes exactly as received, before any decoding.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Hub-Signature-256"
_PREFIX = "sha256="


def sign(secret: bytes, body: bytes) -> str:
    """The header value Meta would send for ``body``: ``sha256=<lower-case hex>``."""
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """True when ``header`` is a valid signature of ``body`` (constant-time compare).

    Upper-case hex is accepted; a missing, malformed or wrongly prefixed header is
    False.
    """
    if not header or not header.startswith(_PREFIX):
        return False
    hex_digest = header[len(_PREFIX) :].strip()
    if len(hex_digest) != 64:
        return False
    try:
        given = bytes.fromhex(hex_digest)
    except ValueError:  # non-hex characters, including non-ASCII ones
        return False
    if len(given) != 32:
        return False
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    return hmac.compare_digest(expected, given)
