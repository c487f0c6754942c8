"""X-Hub-Signature-256: signing and constant-time verification."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from webhook.signature import sign, verify

SECRET = b"app-secret-0123456789abcdef"
BODY = b'{"object":"page","entry":[{"id":"104325188712345","time":1,"messaging":[]}]}'


def test_sign_matches_hmac_sha256() -> None:
    expected = hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY) == f"sha256={expected}"


def test_round_trip() -> None:
    assert verify(SECRET, BODY, sign(SECRET, BODY))


def test_wrong_secret() -> None:
    assert not verify(b"another-secret", BODY, sign(SECRET, BODY))


def test_tampered_body() -> None:
    header = sign(SECRET, BODY)
    assert not verify(SECRET, BODY.replace(b'"time":1', b'"time":2'), header)
    assert not verify(SECRET, BODY + b" ", header)


def test_uppercase_hex_is_accepted() -> None:
    header = sign(SECRET, BODY)
    assert verify(SECRET, BODY, "sha256=" + header.removeprefix("sha256=").upper())


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha256=zz",
        "sha256=" + "g" * 64,
        "sha256=" + "é" * 64,
        "sha256=" + "0" * 63,
        "sha256=" + "0" * 66,
        "sha1=" + "0" * 40,
        "garbage",
    ],
)
def test_missing_or_garbage_header(header: str | None) -> None:
    assert not verify(SECRET, BODY, header)


def test_other_algorithm_prefix_with_right_digest_is_rejected() -> None:
    digest = sign(SECRET, BODY).removeprefix("sha256=")
    assert not verify(SECRET, BODY, "sha1=" + digest)
    assert not verify(SECRET, BODY, digest)
