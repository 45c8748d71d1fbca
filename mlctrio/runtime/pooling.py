"""How a model's hidden states become one embedding: its pooling, read from the model's files.

Rules: GGUF files say it in `{arch}.pooling_type` (llama.cpp's enum: 1 mean, 2 cls, 3 last);
a sentence-transformers checkpoint in `1_Pooling/config.json` (`pooling_mode_*_token(s)`).
Anything else (a plain causal LM, an unknown value) pools with the mean, which is what
sentence-transformers does for a model it knows nothing about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..engine.types import Pooling

_GGUF_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls", 3: "last"}
_ST_MODES: tuple[tuple[str, Pooling], ...] = (
    ("pooling_mode_lasttoken", "last"),
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
)


def detect_pooling(path: Path, gguf_metadata: dict[str, Any] | None = None) -> Pooling:
    """The pooling of the model at `path` (a checkpoint directory or a GGUF file)."""
    if gguf_metadata is not None:
        arch = gguf_metadata.get("general.architecture", "")
        value = gguf_metadata.get(f"{arch}.pooling_type")
        return _GGUF_POOLING.get(int(value), "mean") if isinstance(value, int) else "mean"
    config = path / "1_Pooling" / "config.json"
    try:
        modes = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean"
    if isinstance(modes, dict):
        for key, pooling in _ST_MODES:
            if modes.get(key) is True:
                return pooling
    return "mean"
