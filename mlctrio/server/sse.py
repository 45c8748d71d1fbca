"""Server-sent events framing, exactly as the OpenAI API sends it."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8 (as OpenAI sends it)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def event(obj: Any) -> bytes:
    """One `data: {json}\\n\\n` event. JSON never contains a raw newline, so one line suffices."""
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"
