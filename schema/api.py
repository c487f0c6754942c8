"""Request bodies of the HTTP API. Unknown fields are ignored; types and bounds are checked."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class RegisterPage(msgspec.Struct, rename="camel"):
    """POST /api/pages."""

    facebook_page_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_.-]+$")]
    access_token: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    name: Annotated[str, msgspec.Meta(max_length=512)] | None = None


class SyncRequest(msgspec.Struct, rename="camel"):
    """POST /api/conversations/sync."""

    page_id: NonEmpty
    facebook_page_id: NonEmpty
    resume_session: NonEmpty | None = None
    max_duration_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] | None = None
    mode: Literal["incremental", "full"] | None = None
