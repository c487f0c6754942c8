"""Request bodies of the HTTP API. Unknown fields are ignored; types and bounds are checked."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


# U+0000 is refused, never stripped: PostgreSQL cannot store it, and a silently altered id or
# name is not what the user sent.
_NO_NUL = r"^[^\x00]*$"


class RegisterPage(msgspec.Struct, rename="camel"):
    """POST /api/pages. The token is verified with Graph before anything is stored (sync/page_token.py)."""

    facebook_page_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_.-]+$")]
    # Only bounded here: a token that is not printable ASCII is 400 invalid_token, which the route
    # answers (check_token_format) rather than a generic validation_error.
    access_token: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=4096,
            description="A Page access token of facebookPageId; printable ASCII (else 400 invalid_token)",
        ),
    ]
    name: Annotated[str, msgspec.Meta(max_length=512, pattern=_NO_NUL)] | None = None


class SyncRequest(msgspec.Struct, rename="camel"):
    """POST /api/conversations/sync."""

    page_id: NonEmpty
    facebook_page_id: NonEmpty
    resume_session: NonEmpty | None = None
    max_duration_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] | None = None
    mode: Literal["incremental", "full"] | None = None
