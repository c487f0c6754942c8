"""PLACEHOLDER until the sync engine lands."""
from __future__ import annotations

from typing import Any


class SyncEngine:
    def __init__(self, *a: Any, **k: Any) -> None: ...
